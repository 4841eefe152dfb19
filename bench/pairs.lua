-- wrk script: authorize + settle pairs against Bursar's authorization API.
-- Each thread keeps a queue of permitted ids; the next request settles one if there is
-- one, otherwise authorizes. Pairs/s = settles/s = requests/s ÷ 2.
-- BURSAR_IDEMPOTENCY=1 sends a fresh Idempotency-Key with every authorize.
local key = os.getenv("BURSAR_KEY") or "bsr_bench_member_00000000000000000"
local queue = {}
local authorize_body = '{"model":"gpt-4o-mini","prompt_tokens":1200,"max_tokens":300,"tags":{"campaign":"launch"}}'
local settle_body = '{"usage":{"input_tokens":1200,"cached_input_tokens":0,"output_tokens":200}}'
local headers = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
local failures = 0
local idempotent = os.getenv("BURSAR_IDEMPOTENCY") == "1"
local idem_headers = {}
for k, v in pairs(headers) do idem_headers[k] = v end
local prefix = nil
local sent = 0
local threads = 0

setup = function(thread)
  threads = threads + 1
  thread:set("thread_id", threads)
end

request = function()
  local id = table.remove(queue)
  if id then
    return wrk.format("POST", "/v1/authorizations/" .. id .. "/settle", headers, settle_body)
  end
  if idempotent then
    -- Unique across threads and runs: the run's start time and the thread, then a counter.
    prefix = prefix or string.format("%x-%d", os.time(), thread_id or 0)
    sent = sent + 1
    idem_headers["Idempotency-Key"] = prefix .. "-" .. sent
    return wrk.format("POST", "/v1/authorizations", idem_headers, authorize_body)
  end
  return wrk.format("POST", "/v1/authorizations", headers, authorize_body)
end

response = function(status, _, body)
  if status ~= 200 then
    failures = failures + 1
    return
  end
  -- A permit opens with its id and then its model; a settlement (or a finished
  -- authorization answered again) has its outcome there. Anchored, so a settlement's
  -- body is not searched through.
  local id = string.match(body, '^{"authorization_id":"([^"]+)","model"')
  if id then
    table.insert(queue, id)
  end
end

done = function(summary, latency, _)
  io.write(string.format("requests %d, non-2xx/3xx %d, pairs/s %.0f, p50 %.3f ms, p99 %.3f ms, p99.9 %.3f ms\n",
    summary.requests, summary.errors.status, summary.requests / 2 / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
