#!/usr/bin/env bash
# Memory: RSS with 100k API keys and 10k budgets loaded (from the store's catalog, as the
# admin API creates them), idle and under load.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bursar >/dev/null
tmp=$(mktemp -d)
pid=
trap 'kill $pid 2>/dev/null || true; rm -rf "$tmp"' EXIT
serve() {
  BURSAR_LOG=warn ./target/release/bursar serve --config bench/bench.toml --data-dir "$tmp/data" --listen 127.0.0.1:18183 &
  pid=$!
  for _ in $(seq 100); do curl -fs http://127.0.0.1:18183/readyz >/dev/null && break; sleep 0.2; done
}
serve   # creates the store
kill $pid; wait $pid 2>/dev/null || true
python3 bench/gen_big_catalog.py "$tmp/data/bursar.db"
serve
keys=$(curl -fs http://127.0.0.1:18183/metrics | awk '/^bursar_api_keys/{print $2}')
echo "loaded: $keys keys; RSS idle: $(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status)"
wrk -t1 -c64 -d20s -s bench/pairs.lua http://127.0.0.1:18183 | tail -n 1
echo "RSS after 20 s of load: $(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status) ($(awk '/RssAnon|RssFile/{printf "%s %s kB ", $1, $2}' /proc/$pid/status)), peak $(awk '/VmHWM/{print $2" "$3}' /proc/$pid/status)"
