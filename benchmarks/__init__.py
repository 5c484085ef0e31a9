"""The zdlb benchmark harness (run from the repo root: python -m benchmarks.bench)."""
