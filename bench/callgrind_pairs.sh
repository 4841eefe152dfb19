#!/usr/bin/env bash
# Instructions per authorize + settle pair over HTTP, counted by callgrind: the same for
# a build from run to run, whatever else the machine is doing (a VM's stolen time, say).
#
#   bench/callgrind_pairs.sh [SMALL LARGE]      # default 100 600
#
# Runs `bursar serve` (embedded store, bench/bench.toml) under valgrind twice, sends
# SMALL then LARGE pairs over one keep-alive connection, and prints
# (instructions of LARGE − instructions of SMALL) / (LARGE − SMALL): start-up and
# shutdown cancel out. Needs valgrind and python3. BURSAR_BIN runs another build;
# CG_KEEP=DIR keeps the callgrind outputs (cg-SMALL.out, cg-LARGE.out) in DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
small=${1:-100}
large=${2:-600}
if [ -z "${BURSAR_BIN:-}" ]; then cargo build --release -p bursar >/dev/null; fi
bin=${BURSAR_BIN:-./target/release/bursar}
port=18191
work=${CG_KEEP:-$(mktemp -d)}; mkdir -p "$work"
[ -n "${CG_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT

count() {
  local n=$1 data="$work/data-$1" out="$work/cg-$1.out"
  BURSAR_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" serve \
    --config bench/bench.toml --data-dir "$data" --listen "127.0.0.1:$port" \
    >"$work/server-$n.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 1; done
  python3 - "$n" "$port" <<'PY'
import http.client, json, sys
n, port = int(sys.argv[1]), int(sys.argv[2])
h = {"Authorization": "Bearer bsr_bench_member_00000000000000000",
     "Content-Type": "application/json"}
auth = json.dumps({"model": "gpt-4o-mini", "prompt_tokens": 1200, "max_tokens": 300,
                   "tags": {"campaign": "launch"}})
settle = json.dumps({"usage": {"input_tokens": 1200, "cached_input_tokens": 0,
                               "output_tokens": 200}})
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("POST", "/v1/authorizations", auth, h)
    r = c.getresponse(); body = r.read()
    assert r.status == 200, (r.status, body)
    c.request("POST", f"/v1/authorizations/{json.loads(body)['authorization_id']}/settle",
              settle, h)
    r = c.getresponse(); body = r.read()
    assert r.status == 200, (r.status, body)
PY
  kill -INT "$pid"
  wait "$pid" || true
  # The server's own total (valgrind prints one line per process it ran).
  awk '/^summary:/ {print $2}' "$out"
}

a=$(count "$small")
b=$(count "$large")
echo "instructions per authorize + settle pair: $(( (b - a) / (large - small) ))  ($bin; $small and $large pairs)"
