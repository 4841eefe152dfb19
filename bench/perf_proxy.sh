#!/usr/bin/env bash
# Where the wall time of a proxied call goes, phase by phase, kernel included: the
# in-process proxy bench sampled by `perf` (cpu-clock, DWARF call graphs), each sample
# counted in every phase its stack is in. callgrind (bench/callgrind_proxy.sh) counts
# instructions and leaves out what a system call costs in the kernel; this shows it.
#
#   bench/perf_proxy.sh [BENCH_BINARY]
#
# Without an argument it builds `cargo bench -p bursar-server --bench proxy --no-run` and
# uses that binary. CALLS (default 60000) short chats are sent; PERF_KEEP=DIR keeps
# perf.data and the folded stacks in DIR. Needs perf (linux-tools) and python3. A phase's
# figure is its samples ÷ the calls: a mean, the slow calls included, so the phases of
# the overhead add up to more than the histogram's p50 the bench prints. The
# tokenizers' loading at start is in no phase below.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is needed (apt-get install linux-tools-generic)" >&2; exit 1; }
bin=${1:-}
if [ -z "$bin" ]; then
  bin=$(cargo bench -p bursar-server --bench proxy --no-run 2>&1 |
    sed -n 's/.*Executable benches\/proxy.rs (\(.*\))/\1/p' | tail -1)
fi
bin=$(realpath "$bin")
calls=${CALLS:-60000}
hz=1000
work=${PERF_KEEP:-$(mktemp -d)}; mkdir -p "$work"
[ -n "${PERF_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
(cd crates/bursar-server && BURSAR_BENCH_CALLS=$calls,0 perf record -q -F $hz -e cpu-clock \
  --call-graph dwarf,16384 -o "$work/perf.data" "$bin" --bench nomatch 2>&1 | grep overhead || true)
perf script -i "$work/perf.data" -F comm,tid,ip,sym 2>/dev/null > "$work/stacks.txt"
python3 - "$work/stacks.txt" "$calls" "$hz" <<'PY'
import sys
path, calls, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# (label, frames that must all be on the stack, frames that must not be); a frame is
# matched by a part of its name, a tuple by any of its parts.
START = "bursar_server::proxy::start::{{closure}}"
UNTIL = "bursar_server::proxy::Detachable::until"
FINISH = "Call::finish_whole::{{closure}}"
PHASES = [
    ("the handler (proxy::start)", [START], []),
    ("  before the call: body, key, request JSON, route", [START], [UNTIL]),
    ("  authorize", ["Services::authorize::{{closure}}"], []),
    ("    Engine::prepare", ["Engine::prepare"], []),
    ("    Engine::decide", ["Engine::decide"], []),
    ("    the hold's journal record (encode + write)", ["Services::hold::{{closure}}", "Ticket::journaled"], []),
    ("      of which the write system call", ["Services::hold::{{closure}}", "Ticket::journaled", "ksys_write"], []),
    ("  upstream body", ["Call::upstream_body"], []),
    ("  the provider (the simulator, in process)", ["Call::attempts::{{closure}}"], []),
    ("  the answer", [FINISH], []),
    ("    read_answer_head", [FINISH, "read_answer_head"], []),
    ("    settle (engine + ledger append)", [FINISH, "Call::settle::{{closure}}"], []),
    ("    add_headers", [FINISH, "add_headers"], []),
    ("    after the reply: the settle's journal record", [FINISH, "Ticket::wait"], []),
    ("  Bursar's system calls (the kernel's part)", [START, "entry_SYSCALL_64"], ["Call::attempts::{{closure}}"]),
    ("  Bursar's allocations (mimalloc)", [START, ("mi_malloc", "mi_free", "_mi_", "mi_theap")], ["Call::attempts::{{closure}}"]),
]
counts = [0] * len(PHASES)
with open(path) as f:
    stack = []
    def done():
        if not stack:
            return
        frames = [l.split(" ", 1)[1] if " " in l else l for l in stack[1:]]
        def on(n):
            alts = n if isinstance(n, tuple) else (n,)
            return any(a in fr for fr in frames for a in alts)
        for i, (_, need, avoid) in enumerate(PHASES):
            if all(on(n) for n in need) and not any(on(a) for a in avoid):
                counts[i] += 1
    for line in f:
        line = line.strip()
        if line:
            stack.append(line)
        else:
            done()
            stack = []
    done()
us = 1e6 / hz / calls
print(f"{calls} short chats, {hz} samples/s; µs a call (inclusive, sampled):")
for (label, _, _), n in zip(PHASES, counts):
    print(f"  {label:<56} {n * us:7.2f}")
PY
