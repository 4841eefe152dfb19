#!/usr/bin/env bash
# Several instances on one PostgreSQL database: authorize + settle pairs (wrk, one per
# instance, 48 connections in all) with 1, 2 and 3 `bursar serve` processes sharing
# every budget of bench/bench.toml (leases; see ARCHITECTURE.md, "Several instances").
# Usage: bench/instances.sh [instance counts...]   (default: 1 2 3)
# Needs wrk and a PostgreSQL server: BURSAR_BENCH_DATABASE_URL (default
# postgres://postgres@127.0.0.1:5432/postgres); each run gets a fresh database.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
admin=${BURSAR_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
cargo build --release -p bursar >/dev/null
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for n in "${@:-1 2 3}"; do
  for count in $n; do
    db="bursar_bench_instances_$$_$count"
    psql -q "$admin" -c "CREATE DATABASE $db"
    url="${admin%/*}/$db"
    ./target/release/bursar migrate --config bench/bench.toml --database-url "$url" >/dev/null
    pids=()
    for i in $(seq 1 "$count"); do
      BURSAR_LOG=warn ./target/release/bursar serve --config bench/bench.toml --database-url "$url" --listen "127.0.0.1:$((18200 + i))" &
      pids+=($!)
    done
    for i in $(seq 1 "$count"); do
      for _ in $(seq 50); do curl -fs "http://127.0.0.1:$((18200 + i))/readyz" >/dev/null && break; sleep 0.2; done
    done
    echo "== $count instance(s): wrk -t1 -c$((48 / count)) -d15s on each"
    outs=()
    loads=()
    for i in $(seq 1 "$count"); do
      out=$(mktemp)
      outs+=("$out")
      wrk -t1 -c$((48 / count)) -d15s -s bench/pairs.lua "http://127.0.0.1:$((18200 + i))" >"$out" &
      loads+=($!)
    done
    wait "${loads[@]}"
    total=0
    for out in "${outs[@]}"; do
      tail -n 1 "$out"
      total=$((total + $(grep -o 'pairs/s [0-9]*' "$out" | awk '{print $2}')))
      rm -f "$out"
    done
    echo "total pairs/s $total"
    cleanup
    sleep 1
    ./target/release/bursar ledger verify --config bench/bench.toml --database-url "$url" | tail -n 1
    psql -q "$admin" -c "DROP DATABASE $db WITH (FORCE)"
  done
done
