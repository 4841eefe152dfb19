#!/usr/bin/env bash
# The first proxied call after a start: starts `bursar serve` (proxy mode, embedded
# store, bench/bench.toml with an `openai`-kind provider serving every model) on a fresh
# data directory in front of `bursar simulate`, waits for /readyz, and times two calls
# with curl. Prints the time to ready, both calls, and RSS.
# Usage: bench/first_call.sh [starts]   (default 3; BURSAR_BIN runs another build)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
bench_start
SIM=127.0.0.1:18192; GW=127.0.0.1:18193
BURSAR_LOG=warn "$bin" simulate --listen "$SIM" &
sim_pid=$!
until curl -fs "http://$SIM/healthz" >/dev/null; do sleep 0.05; done
proxy_config "$SIM" "$work/proxy.toml"
body='{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Write one line about budgets."}]}'
call() {
  curl -s -o /dev/null -w '%{time_total}' "http://$GW/v1/chat/completions" \
    -H "Authorization: Bearer bsr_bench_member_00000000000000000" -H "Content-Type: application/json" -d "$body"
}
for n in $(seq "${1:-3}"); do
  rm -rf "$work/store"
  t0=$(date +%s.%N)
  BURSAR_LOG=warn "$bin" serve --config "$work/proxy.toml" --data-dir "$work/store" --listen "$GW" &
  pid=$!
  until curl -fs "http://$GW/readyz" >/dev/null 2>&1; do sleep 0.01; done
  t1=$(date +%s.%N)
  first=$(call); second=$(call)
  echo "start $n: ready after $(echo "$t1 - $t0" | bc) s; first call $first s, second $second s; RSS $(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status)"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
done
