-- wrk script for bench/run.py: POST one small OpenAI chat body, then print exact
-- statistics as a single machine-readable line from done().
--
-- Inputs come from the environment (not argv, so the key is not visible in `ps`):
--   BENCH_KEY   virtual key sent as "Authorization: Bearer <key>"
--   BENCH_BODY  request body (JSON)
--   BENCH_PATH  request path (default /v1/chat/completions)
--   BENCH_HEADERS  extra request headers, one "name: value" per line (a peer's routing)

wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.body = os.getenv("BENCH_BODY")
    or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key ~= nil and key ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. key
end
for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
    local name, value = string.match(line, "^([^:]+):%s*(.*)$")
    if name ~= nil then
        wrk.headers[name] = value
    end
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        "BENCH_RESULT requests=%d duration_us=%d bytes=%d"
            .. " connect=%d read=%d write=%d status=%d timeout=%d"
            .. " p50_us=%d p90_us=%d p99_us=%d p999_us=%d mean_us=%.1f max_us=%d\n",
        summary.requests, summary.duration, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99),
        latency:percentile(99.9), latency.mean, latency.max))
end
