"""Python bytecode instructions one keep-alive request executes in zdlb, per function.

cProfile's call count (calls_per_request.sh) misses what happens inside a call; this counts
every instruction the interpreter runs for one request and its answer through the same wiring
as hotpath_micro (sticky cookie on, pooled upstream connections, transports that only count
writes). Deterministic, so a change's before/after needs one run, not a quiet machine; on this
box an instruction costs ~4.5 ns on average (a request's 1,408 took 6.5 us in hotpath_micro).
The design prototype in ../shared/reference runs ~335 for the same request (same harness).

    python -m benchmarks.opcodes            # total, then per function
    python -m benchmarks.opcodes --lines    # per source line of the functions that run
"""

from __future__ import annotations

import argparse
import collections
import sys
from types import FrameType
from typing import Any

from benchmarks.hotpath_micro import build

WARMUP_REQUESTS = 100  # fills the round-robin schedule and llhttp's parser cache first


def count(by_line: bool) -> collections.Counter[str]:
    loop, one_request = build(sticky=True)
    for _ in range(WARMUP_REQUESTS):
        one_request()
    counts: collections.Counter[str] = collections.Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            key = f"{code.co_qualname} ({code.co_filename.rsplit('/', 2)[-2]}/"
            key += f"{code.co_filename.rsplit('/', 1)[-1]}"
            counts[key + (f":{frame.f_lineno})" if by_line else ")")] += 1
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    sys.settrace(tracer)
    try:
        one_request()
    finally:
        sys.settrace(None)
        loop.close()
    # The harness's own share: the request function and the counting transports.
    for key in list(counts):
        if key.startswith(("build.<locals>.one_request", "CountingTransport.")):
            del counts[key]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", action="store_true", help="per source line")
    args = parser.parse_args()
    counts = count(args.lines)
    print(f"{sum(counts.values())} Python instructions per keep-alive request (sticky cookie)")
    for key, n in counts.most_common():
        print(f"{n:6d}  {key}")


if __name__ == "__main__":
    main()
