#!/usr/bin/env bash
# Memory: RSS with 100k API keys and 10k budgets loaded (from the store's catalog, as the
# admin API creates them), idle and under load.
# Usage: bench/memory.sh               RSS of the release binary (mimalloc)
#        bench/memory.sh --heaptrack   the same run under heaptrack, on a build with the
#                                      system allocator (heaptrack traces malloc), then the
#                                      peak heap by the innermost Bursar function
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
# BURSAR_BIN runs another build (say, the one before a change) instead of this tree's.
# BURSAR_IDEMPOTENCY=1: every authorize of the load carries a fresh Idempotency-Key.
bin=${BURSAR_BIN:-./target/release/bursar}
tmp=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null && wait $pid 2>/dev/null; rm -rf "$tmp"' EXIT
if [ "$mode" = --heaptrack ]; then
  command -v heaptrack >/dev/null || { echo "heaptrack is needed: apt-get install heaptrack" >&2; exit 1; }
  cargo build --release -p bursar --features system-allocator >/dev/null
  cp target/release/bursar "$tmp/bursar-system-alloc"
  bin="$tmp/bursar-system-alloc"
  # Leave target/release/bursar as the other benches expect it.
  cargo build --release -p bursar >/dev/null
elif [ -z "${BURSAR_BIN:-}" ]; then
  cargo build --release -p bursar >/dev/null
fi
serve() {
  BURSAR_LOG=warn $1 "$bin" serve --config bench/bench.toml --data-dir "$tmp/data" --listen 127.0.0.1:18183 &
  pid=$!
  for _ in $(seq 200); do curl -fs http://127.0.0.1:18183/readyz >/dev/null && break; sleep 0.2; done
  # Under heaptrack, $pid is heaptrack's shell; the server is its child.
  pid=$(pgrep -f -n "$bin serve" || echo "$pid")
}
serve ""   # creates the store
kill $pid; wait 2>/dev/null || true
python3 bench/gen_big_catalog.py "$tmp/data/bursar.db"
if [ "$mode" = --heaptrack ]; then serve "heaptrack -o $tmp/heap"; else serve ""; fi
keys=$(curl -fs http://127.0.0.1:18183/metrics | awk '/^bursar_api_keys/{print $2}')
echo "loaded: $keys keys; RSS idle: $(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status)"
wrk -t1 -c64 -d20s -s bench/pairs.lua http://127.0.0.1:18183 | tail -n 1
echo "RSS after 20 s of load: $(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status) ($(awk '/RssAnon|RssFile/{printf "%s %s kB ", $1, $2}' /proc/$pid/status)$(awk '/AnonHugePages/{printf "AnonHugePages %s kB", $2}' /proc/$pid/smaps_rollup 2>/dev/null)), peak $(awk '/VmHWM/{print $2" "$3}' /proc/$pid/status)"
if [ "$mode" = --heaptrack ]; then
  kill $pid; wait 2>/dev/null || true; pid=
  heaptrack_print -f "$tmp"/heap.*zst --flamegraph-cost-type peak -F "$tmp/stacks.txt" >/dev/null
  echo "peak heap by innermost Bursar function:"
  python3 - "$tmp/stacks.txt" <<'PY'
import collections, re, sys
tot = collections.Counter()
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    frames = stack.split(";")
    pick = next((f for f in reversed(frames) if re.search(r"bursar_(core|store|server)|bursar::", f)), frames[-1])
    tot[re.sub(r"::h[0-9a-f]{16}", "", pick)[:110]] += int(n)
for k, v in tot.most_common(12):
    print(f"{v / 1e6:8.2f} MB  {k}")
PY
fi
