#!/usr/bin/env bash
# HTTP load on loopback: authorize + settle pairs, with wrk, on the embedded store or,
# with BURSAR_BENCH_DATABASE_URL=postgres://…/postgres, on a fresh PostgreSQL database;
# with BURSAR_BENCH_REDIS_URL=redis://…, rate limits in Redis (bench.toml's limit is
# checked on every call and never reached).
# BURSAR_IDEMPOTENCY=1: every authorize carries a fresh Idempotency-Key.
# Usage: bench/http_load.sh [connections...]   (default: 16 64)
# Prints wrk's summary per run and Bursar's RSS and CPU seconds after each.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
# BURSAR_BIN runs another build (say, the one before a change) instead of this tree's.
if [ -z "${BURSAR_BIN:-}" ]; then cargo build --release -p bursar >/dev/null; fi
bin=${BURSAR_BIN:-./target/release/bursar}
data=$(mktemp -d)
store=(--data-dir "$data")
if [ -n "${BURSAR_BENCH_DATABASE_URL:-}" ]; then
  db="bursar_bench_$$"
  psql -q "$BURSAR_BENCH_DATABASE_URL" -c "CREATE DATABASE $db"
  store=(--database-url "${BURSAR_BENCH_DATABASE_URL%/*}/$db")
fi
if [ -n "${BURSAR_BENCH_REDIS_URL:-}" ]; then
  store+=(--redis-url "$BURSAR_BENCH_REDIS_URL")
fi
trap 'kill $pid 2>/dev/null && wait $pid 2>/dev/null; rm -rf "$data"; [ -n "${db:-}" ] && sleep 1 && psql -q "$BURSAR_BENCH_DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
BURSAR_LOG=warn "$bin" serve --config bench/bench.toml "${store[@]}" --migrate --listen 127.0.0.1:18181 &
pid=$!
for _ in $(seq 50); do curl -fs http://127.0.0.1:18181/readyz >/dev/null && break; sleep 0.2; done
for c in "${@:-16 64}"; do
  for conns in $c; do
    echo "== wrk -t1 -c$conns -d15s (authorize+settle pairs)"
    wrk -t1 -c"$conns" -d15s -s bench/pairs.lua http://127.0.0.1:18181 | tail -n 1
    ticks=$(awk '{print $14+$15}' /proc/$pid/stat)
    echo "bursar RSS $(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status), CPU $(echo "scale=1; $ticks/$(getconf CLK_TCK)" | bc) s so far"
  done
done
"$bin" ledger verify --config bench/bench.toml "${store[@]}" | tail -n 1
