#!/usr/bin/env bash
# Instructions a proxied call, counted by callgrind on the in-process proxy bench: the
# whole call over all threads, the ledger writer's share, and the functions of the
# request's path one by one (inclusive). A whole call's figure swings by up to ±10 %
# between runs of one binary (the writer's batches and the runtime's idle spinning
# follow timing); a function's figure does not, so compare builds by function.
#
#   bench/callgrind_proxy.sh [BENCH_BINARY]
#
# Without an argument it builds `cargo bench -p bursar-server --bench proxy --no-run`
# and uses that binary. CG_KEEP=DIR keeps the callgrind outputs in DIR. Needs valgrind
# and python3. Runs 200 and 1,200 short chats, then 50 and 250 conversations of 4 KB,
# and prints the differences ÷ 1,000 and ÷ 200.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
  bin=$(cargo bench -p bursar-server --bench proxy --no-run 2>&1 |
    sed -n 's/.*Executable benches\/proxy.rs (\(.*\))/\1/p' | tail -1)
fi
bin=$(realpath "$bin")
work=${CG_KEEP:-$(mktemp -d)}; mkdir -p "$work"
[ -n "${CG_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
cd crates/bursar-server
for calls in 200,0 1200,0 0,50 0,250; do
  BURSAR_BENCH_CALLS=$calls valgrind --tool=callgrind \
    --callgrind-out-file="$work/cg.$calls.%p" "$bin" --bench nomatch >/dev/null 2>&1
done
python3 - "$work" <<'PY'
import glob, re, subprocess, sys
work = sys.argv[1]
# The request's path, and the writer: (label, a pattern of callgrind's function name).
FUNCTIONS = [
    ("writer (its thread)", r"bursar_store::run_writer$"),
    ("Call::run (the call)", r"bursar_server::proxy::Call::run::\{\{closure\}\}$"),
    ("reading the body", r"bursar_server::proxy::wire::RequestBody::parse$"),
    ("parse_chat (Bursar's and the simulator's)", r"bursar_server::proxy::wire::parse_chat$"),
    ("upstream_body", r"bursar_server::proxy::Call::upstream_body$"),
    ("read_answer_head", r"bursar_server::proxy::wire::read_answer_head$"),
    ("add_headers", r"bursar_server::proxy::add_headers$"),
    ("Services::hold", r"bursar_server::Services::hold::\{\{closure\}\}$"),
    ("Services::finish", r"bursar_server::Services::finish::\{\{closure\}\}$"),
    ("Engine::prepare", r"bursar_core::engine::Engine::prepare$"),
    ("Engine::decide", r"bursar_core::engine::Engine::decide$"),
    ("Engine::finish", r"bursar_core::engine::Engine::finish$"),
    ("Ticket::journaled", r"bursar_store::Ticket::journaled$"),
    ("prompt_tokens", r"bursar_server::proxy::Call::prompt_tokens$"),
    ("the simulator (provider time)", r"bursar_server::sim::Simulator::chat$"),
]
def totals(calls):
    # The lowest pid is the bench itself (valgrind follows no child here).
    f = sorted(glob.glob(f"{work}/cg.{calls}.*"), key=lambda p: int(p.rsplit(".", 1)[1]))[0]
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100",
                          "--auto=no", f], capture_output=True, text=True, check=True).stdout
    whole, funcs = 0, {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*)$", line)
        if not m:
            continue
        n = int(m.group(1).replace(",", ""))
        name = re.sub(r" \[[^\]]*\]$", "", m.group(2)).split(":", 1)[-1]
        if name == "PROGRAM TOTALS":
            whole = n
        for label, pat in FUNCTIONS:
            if re.search(pat, name):
                funcs[label] = max(funcs.get(label, 0), n)
    return whole, funcs
for title, a, b, per in [("short chat", "200,0", "1200,0", 1000),
                         ("4 KB conversation", "0,50", "0,250", 200)]:
    (wa, fa), (wb, fb) = totals(a), totals(b)
    print(f"{title}: {(wb - wa) / per / 1000:.1f}k instructions a call over all threads")
    for label, _ in FUNCTIONS:
        print(f"  {label:45} {(fb.get(label, 0) - fa.get(label, 0)) / per / 1000:8.1f}k")
PY
