#!/usr/bin/env bash
# Where Bursar's CPU goes per proxied call over real HTTP at a fixed rate: `bursar serve`
# (proxy mode, bench/bench.toml) in front of `bursar simulate` (0 ms), oha sending the
# short chat at RATE a second (default 5000), and `perf record -e cpu-clock` with DWARF
# call graphs on the Bursar process for SECONDS_PROFILED (default 5) in the middle of the run.
# Each sample is put in the first of the groups below its stack matches, so the groups
# add up to Bursar's whole CPU a call; "Bursar's own work" is about what the overhead
# histogram counts (with the settle's journal record, written after the reply).
#
#   bench/perf_http_proxy.sh            # needs perf, oha, python3; BURSAR_BIN runs another build
#   TOP=30 bench/perf_http_proxy.sh     # also the 30 heaviest places of Bursar's own work, each
#                                       # the innermost Bursar function of a sample -> its leaf
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-tools-generic)" >&2; exit 1; }
command -v oha >/dev/null || { echo "oha is needed: cargo install oha --locked" >&2; exit 1; }
rate=${RATE:-5000}
secs=${SECONDS_PROFILED:-5}
hz=499
. bench/lib.sh
bench_start
SIM=127.0.0.1:18194; GW=127.0.0.1:18195
BURSAR_LOG=warn "$bin" simulate --listen "$SIM" --latency-ms 0 --completion-tokens 64 &
sim_pid=$!
proxy_config "$SIM" "$work/proxy.toml"
BURSAR_LOG=warn "$bin" serve --config "$work/proxy.toml" --data-dir "$work/store" --listen "$GW" &
pid=$!
for _ in $(seq 100); do curl -fs "http://$GW/readyz" >/dev/null && curl -fs "http://$SIM/healthz" >/dev/null && break; sleep 0.1; done
load() { # $1 seconds
  oha --no-tui --output-format json -z "${1}s" -w -c 64 -q "$rate" --latency-correction \
    -m POST -T application/json -H "Authorization: Bearer bsr_bench_member_00000000000000000" \
    -d '{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Write one line about budgets."}]}' \
    "http://$GW/v1/chat/completions" >/dev/null
}
load 2   # warm-up
load $((secs + 4)) &
oha_pid=$!
sleep 2
perf record -q -F $hz -e cpu-clock --call-graph dwarf,8192 -p "$pid" -o "$work/perf.data" -- sleep "$secs" 2>/dev/null
wait $oha_pid
perf script -i "$work/perf.data" -F comm,tid,ip,sym 2>/dev/null > "$work/stacks.txt"
python3 - "$work/stacks.txt" "$rate" "$secs" "$hz" "${TOP:-0}" <<'PY'
import collections, re, sys
path, rate, secs, hz, top = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
OWN = "the proxied call: Bursar's own work"
places = collections.Counter()
def clean(f):
    f = re.sub(r"\+0x[0-9a-f]+$", "", f)
    return re.sub(r"::h[0-9a-f]{16}$", "", f)[:90]
def place(frames):
    leaf = clean(frames[0]) if frames else "?"
    inner = next((clean(fr) for fr in frames if "bursar" in fr), "?")
    return inner if inner == leaf else f"{inner}  -> {leaf}"
# (group, any of these parts of a frame's name); the first group that matches takes it.
GROUPS = [
    ("the ledger writer thread", None, ("bursar-ledger-w",)),
    ("the proxied call: the upstream request (hyper client)", ("Call::attempts",), None),
    ("the proxied call: Bursar's own work", ("bursar_server::proxy::start::",), None),
    ("upstream connections: sending the request, reading the answer", ("hyper::client", "hyper_util::client"), None),
    ("client connections: reading the request, writing the answer", ("hyper::proto::h1", "hyper::server", "hyper_util::server"), None),
    ("tokio: scheduling, timers, I/O driver", ("tokio::runtime",), None),
]
counts = {g[0]: 0 for g in GROUPS}
in_kernel = {g[0]: 0 for g in GROUPS}
other = [0, 0]
total = 0
kernel = 0
with open(path) as f:
    stack = []
    def done():
        global total, kernel
        if not stack:
            return
        comm = stack[0].split()[0]
        frames = [l.split(" ", 1)[1] if " " in l else l for l in stack[1:]]
        total += 1
        # A sample in the kernel on behalf of a system call (the socket's send and
        # receive, the journal's write, epoll, futex).
        k = any("entry_SYSCALL_64" in fr for fr in frames)
        kernel += k
        for name, parts, comms in GROUPS:
            if comms and comm.startswith(comms) or parts and any(p in fr for fr in frames for p in parts):
                counts[name] += 1
                in_kernel[name] += k
                if name == OWN and top:
                    places[place(frames)] += 1
                return
        other[0] += 1
        other[1] += k
    for line in f:
        line = line.rstrip("\n")
        if line.strip():
            stack.append(line.strip())
        else:
            done()
            stack = []
    done()
calls = rate * secs
us = 1e6 / hz / calls
print(f"Bursar's CPU a call at {rate}/s over {secs:.0f} s: {total * us:.1f} µs, of which in system calls {kernel * us:.1f} µs")
print(f"  {'group':<66} {'µs':>6} {'in system calls':>16}")
for name, _, _ in GROUPS:
    print(f"  {name:<66} {counts[name] * us:6.1f} {in_kernel[name] * us:16.1f}")
print(f"  {'the rest (metrics, logging, allocator, idle spinning)':<66} {other[0] * us:6.1f} {other[1] * us:16.1f}")
if top:
    print(f"{OWN}, its heaviest places (µs a call):")
    for p, n in places.most_common(top):
        print(f"  {n * us:6.2f}  {p}")
PY
