-- Prints one machine-readable line when wrk finishes; no per-request Lua runs (no request()
-- or response() hook), so wrk's hot path is unchanged. Latencies are in microseconds.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'ZDLB_BENCH {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, '
    .. '"p50_us": %.1f, "p99_us": %.1f, "max_us": %.1f, "connect_errors": %.0f, '
    .. '"read_errors": %.0f, "write_errors": %.0f, "status_errors": %.0f, "timeouts": %.0f}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
