-- wrk script: non-streamed chat completions (OpenAI shape), straight to the simulated
-- provider or through Bursar. Non-200 answers are counted and printed at the end.
local key = os.getenv("BURSAR_KEY") or "bsr_bench_member_00000000000000000"
local body = '{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Write one line about budgets."}]}'
local headers = { ["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json" }
local failures = 0

request = function()
  return wrk.format("POST", "/v1/chat/completions", headers, body)
end

response = function(status)
  if status ~= 200 then
    failures = failures + 1
  end
end

done = function(summary, latency, _)
  io.write(string.format("RESULT rps=%.0f p50_us=%d p99_us=%d requests=%d non200=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    summary.requests, summary.errors.status))
end
