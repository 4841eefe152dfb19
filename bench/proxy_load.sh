#!/usr/bin/env bash
# Proxy overhead: the same wrk load straight to the simulated provider (`bursar simulate`)
# and through Bursar (proxy mode, embedded store, four budgets per call) to that same
# simulator over HTTP, in one run.
# Usage: bench/proxy_load.sh [seconds per run]   (default 10)
# For each provider latency (0 and 50 ms) and connection count (1, 16, 64) it prints RPS,
# p50 and p99 of both, the latency Bursar adds, Bursar's CPU seconds and RSS, and
# Bursar's own overhead (its bursar_proxy_overhead_seconds histogram: request time minus
# provider time) as the histogram buckets holding the p50 and p99 (and, at the fixed
# rate, the share of calls within the SPEC's 10 µs and 100 µs).
# wrk keeps each connection busy, so those runs are at the most both servers can take. The
# SPEC's overhead targets are at a given rate: with oha installed (`cargo install oha`),
# each latency also gets a run at RATE requests per second (default 5000), an open load
# whose latencies are corrected for coordinated omission, straight and through Bursar.
# LATS (default "0 50") picks the provider latencies, CONNS (default "1 16 64") the wrk
# runs' connections; CONNS= (empty) leaves only the fixed-rate runs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
secs=${1:-10}
rate=${RATE:-5000}
# BURSAR_BIN runs another build (say, the one before a change) instead of this tree's.
. bench/lib.sh
bench_start
SIM=127.0.0.1:18190; GW=127.0.0.1:18191
proxy_config "$SIM" "$work/proxy.toml"
BURSAR_LOG=warn "$bin" serve --config "$work/proxy.toml" --data-dir "$work/store" --listen "$GW" &
pid=$!
for _ in $(seq 50); do curl -fs "http://$GW/readyz" >/dev/null && break; sleep 0.2; done

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
# The percent of a histogram diff's calls at or under $3 seconds (a bucket bound): the
# buckets are coarse near the targets, this says how far from them a run is.
share() { # $1 before-file $2 after-file $3 bound
  local m=bursar_proxy_overhead_seconds
  join -a 2 -e 0 -o 0,1.2,2.2 \
       <(grep "^${m}_bucket" "$1" | sed 's/.*le="\([^"]*\)"} \(.*\)/\1 \2/' | sort) \
       <(grep "^${m}_bucket" "$2" | sed 's/.*le="\([^"]*\)"} \(.*\)/\1 \2/' | sort) |
    awk -v b="$3" '{d[$1]=$3-$2} END {printf "%.1f", (d["+Inf"] > 0 ? 100 * d[b] / d["+Inf"] : 0)}'
}
# The bucket bound (seconds) where the cumulative count of a histogram diff reaches q.
quantile() { # $1 before-file $2 after-file $3 q [$4 metric]
  local m=${4:-bursar_proxy_overhead_seconds}
  join -a 2 -e 0 -o 0,1.2,2.2 \
       <(grep "^${m}_bucket" "$1" | sed 's/.*le="\([^"]*\)"} \(.*\)/\1 \2/' | sort) \
       <(grep "^${m}_bucket" "$2" | sed 's/.*le="\([^"]*\)"} \(.*\)/\1 \2/' | sort) |
    awk -v q="$3" '{d[$1]=$3-$2; if ($1=="+Inf") tot=$3-$2} END {
      n=asorti(d, k, "@ind_num_asc"); for (i=1;i<=n;i++) if (k[i]!="+Inf" && d[k[i]]>=q*tot) {print k[i]; exit} print "+Inf" }'
}

printf '%-8s %-5s | %-28s | %-28s | %-10s | %-22s | %-22s | %s\n' latency conns "direct: rps p50 p99 (us)" "through bursar: rps p50 p99" "added p99" "bursar overhead p50/p99" "of which hold durable" "bursar CPU s, RSS"
for lat in ${LATS:-0 50}; do
  if [ -n "$sim_pid" ]; then kill "$sim_pid"; wait "$sim_pid" 2>/dev/null || true; fi
  BURSAR_LOG=warn "$bin" simulate --listen "$SIM" --latency-ms "$lat" --completion-tokens 64 &
  sim_pid=$!
  for _ in $(seq 50); do curl -fs "http://$SIM/healthz" >/dev/null && break; sleep 0.2; done
  # Warm up both (the first call loads the tokenizers) so no run measures a cold start.
  for target in "$SIM" "$GW"; do
    curl -fs "http://$target/v1/chat/completions" -H "Authorization: Bearer bsr_bench_member_00000000000000000" \
      -d '{"model":"gpt-4o-mini","max_tokens":8,"messages":[{"role":"user","content":"warm up"}]}' >/dev/null
  done
  for conns in ${CONNS-1 16 64}; do
    direct=$(wrk -t1 -c"$conns" -d"${secs}s" -s bench/chat.lua "http://$SIM" | grep RESULT)
    curl -fs "http://$GW/metrics" > "$work/m0"
    c0=$(cpu $pid)
    via=$(wrk -t1 -c"$conns" -d"${secs}s" -s bench/chat.lua "http://$GW" | grep RESULT)
    c1=$(cpu $pid)
    curl -fs "http://$GW/metrics" > "$work/m1"
    get() { echo "$1" | sed "s/.*$2=\([0-9]*\).*/\1/"; }
    added=$(( $(get "$via" p99_us) - $(get "$direct" p99_us) ))
    printf '%-8s %-5s | %7s %7s %9s  | %7s %7s %9s  | %7s us | %9s / %-9s s | %9s / %-9s s | %s s, %s\n' "${lat}ms" "$conns" \
      "$(get "$direct" rps)" "$(get "$direct" p50_us)" "$(get "$direct" p99_us)" \
      "$(get "$via" rps)" "$(get "$via" p50_us)" "$(get "$via" p99_us)" "$added" \
      "$(quantile "$work/m0" "$work/m1" 0.5)" "$(quantile "$work/m0" "$work/m1" 0.99)" \
      "$(quantile "$work/m0" "$work/m1" 0.5 bursar_hold_durable_seconds)" "$(quantile "$work/m0" "$work/m1" 0.99 bursar_hold_durable_seconds)" \
      "$(echo "scale=1; ($c1-$c0)/$(getconf CLK_TCK)" | bc)" "$(awk '/VmRSS/{print $2" "$3}' /proc/$pid/status)"
    [ "$(get "$via" non200)" = 0 ] || echo "   !! $(get "$via" non200) non-200 answers through Bursar"
  done
  if command -v oha >/dev/null; then
    # Enough connections for the rate at this latency (oha waits for a free one).
    rconns=$(( lat == 0 ? 64 : rate * (lat + 20) / 1000 ))
    fixed() { # $1 target, $2 seconds: "rps p50_us p99_us failed"
      oha --no-tui --output-format json -z "${2}s" -w -c "$rconns" -q "$rate" --latency-correction \
        -m POST -T application/json -H "Authorization: Bearer bsr_bench_member_00000000000000000" \
        -d '{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Write one line about budgets."}]}' \
        "http://$1/v1/chat/completions" | python3 -c '
import json, sys
d = json.load(sys.stdin); p = d["latencyPercentiles"]; codes = d.get("statusCodeDistribution", {})
bad = {c: n for c, n in codes.items() if c != "200"} | d.get("errorDistribution", {})
if bad:
    print("  ", bad, file=sys.stderr)
print(round(d["summary"]["requestsPerSec"]), round(p["p50"] * 1e6), round(p["p99"] * 1e6), sum(bad.values()))'
    }
    # Each first warmed up at the same rate and connections (new connections upstream).
    fixed "$SIM" 2 >/dev/null
    read -r drps dp50 dp99 dbad <<<"$(fixed "$SIM" "$secs")"
    fixed "$GW" 2 >/dev/null
    curl -fs "http://$GW/metrics" > "$work/m0"
    c0=$(cpu $pid)
    read -r vrps vp50 vp99 vbad <<<"$(fixed "$GW" "$secs")"
    c1=$(cpu $pid)
    curl -fs "http://$GW/metrics" > "$work/m1"
    rate_rows+=$(printf '%-8s %-5s | %7s %7s %9s  | %7s %7s %9s  | %5s / %-5s us | %9s / %-9s s | %5s %% / %-5s %% | %s µs\n' "${lat}ms" "$rconns" \
      "$drps" "$dp50" "$dp99" "$vrps" "$vp50" "$vp99" "$((vp50 - dp50))" "$((vp99 - dp99))" \
      "$(quantile "$work/m0" "$work/m1" 0.5)" "$(quantile "$work/m0" "$work/m1" 0.99)" \
      "$(share "$work/m0" "$work/m1" 0.00001)" "$(share "$work/m0" "$work/m1" 0.0001)" \
      "$(( (c1 - c0) * 1000000 / $(getconf CLK_TCK) / (vrps * secs) ))")$'\n'
    [ "$dbad$vbad" = 00 ] || rate_rows+="   !! failed or non-200 answers: $dbad straight, $vbad through Bursar"$'\n'
  fi
done
if [ -n "${rate_rows:-}" ]; then
  echo
  echo "at $rate requests per second (oha, open load, latency corrected):"
  printf '%-8s %-5s | %-28s | %-28s | %-17s | %-22s | %-17s | %s\n' latency conns "direct: rps p50 p99 (us)" "through bursar: rps p50 p99" "added p50 / p99" "bursar overhead p50/p99" "<= 10 us / 100 us" "bursar CPU a call"
  printf '%s' "$rate_rows"
else
  echo "(no fixed-rate runs: oha is not installed; cargo install oha)"
fi
"$bin" ledger verify --config "$work/proxy.toml" --data-dir "$work/store" | tail -n 1
