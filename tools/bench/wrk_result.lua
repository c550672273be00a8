-- wrk script of http_load.py: one machine-readable line at the end of a run
-- (requests, duration in us, p50 and p99 latency in us, then the error counts).
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
