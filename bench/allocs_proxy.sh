#!/usr/bin/env bash
# Allocations a proxied call, and where they are made: the in-process proxy bench, built
# with the system allocator (feature `bench-system-alloc`) so heaptrack sees each one,
# runs 2,000 and then 12,000 short chats; the difference ÷ 10,000 is a call's. Each
# allocation is put on the innermost of Bursar's functions in its stack, with the
# function it called there. The simulated provider (in process here, a process of its
# own over HTTP) and the bench's harness are counted apart. The counts do not vary from
# run to run, so compare builds site by site.
#
#   bench/allocs_proxy.sh            # needs heaptrack (apt-get install heaptrack), python3
#   TOP=60 bench/allocs_proxy.sh     # more sites (default 40); HT_KEEP=DIR keeps the files
set -euo pipefail
cd "$(dirname "$0")/.."
command -v heaptrack >/dev/null || { echo "heaptrack is needed: apt-get install heaptrack" >&2; exit 1; }
bin=$(cargo bench -p bursar-server --bench proxy --features bench-system-alloc --no-run 2>&1 |
  sed -n 's/.*Executable benches\/proxy.rs (\(.*\))/\1/p' | tail -1)
bin=$(realpath "$bin")
work=${HT_KEEP:-$(mktemp -d)}; mkdir -p "$work"
[ -n "${HT_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
cd crates/bursar-server
for calls in 2000 12000; do
  BURSAR_BENCH_CALLS=$calls,0 heaptrack -o "$work/ht.$calls" "$bin" --bench nomatch >/dev/null 2>&1
  heaptrack_print -f "$work/ht.$calls.zst" -a 0 -p 0 -t 0 -l 0 \
    -F "$work/stacks.$calls" --flamegraph-cost-type allocations >/dev/null 2>&1
done
python3 - "$work/stacks.2000" "$work/stacks.12000" "${TOP:-40}" <<'PY'
import collections, re, sys
def load(path):
    d = collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if n.isdigit():
            d[stack] += int(n)
    return d
before, after = load(sys.argv[1]), load(sys.argv[2])
top = int(sys.argv[3])
CALLS = 10000.0
def clean(f):
    f = re.sub(r" \(.*?\)$", "", f)
    f = re.sub(r"::h[0-9a-f]{16}$", "", f)
    for a, b in (("$LT$", "<"), ("$GT$", ">"), ("$u7b$", "{"), ("$u7d$", "}"), ("$u20$", " "),
                 ("$RF$", "&"), ("$C$", ","), ("$u5b$", "["), ("$u5d$", "]"), ("..", "::")):
        f = f.replace(a, b)
    return f
OWN = re.compile(r"bursar_(server|core|store)::")
SIM = re.compile(r"bursar_server::sim::")
# std's and the allocator's own frames say nothing of who allocated.
PLUMBING = re.compile(r"^_R|^alloc::|^core::|^std::|__rust|^_<alloc::|^_<core::|^_<T as alloc")
sites = collections.Counter()
parts = collections.Counter()
for stack in set(before) | set(after):
    n = after[stack] - before[stack]
    if n <= 0:
        continue
    frames = [clean(f) for f in stack.split(";")]
    own = [i for i, f in enumerate(frames) if OWN.search(f)]
    if any(SIM.search(f) for f in frames) or any("Call::attempts" in f and "serde_json" in g
            for f, g in zip(frames, frames[1:])):
        parts["the simulated provider (in process)"] += n
        continue
    if not own:
        parts["the bench's harness (routing the request in process)"] += n
        continue
    parts["Bursar"] += n
    i = own[-1]
    callee = next((f for f in frames[i + 1:] if not PLUMBING.search(f)), "")
    sites[frames[i] + ("  -> " + callee[:70] if callee else "")] += n
print(f"allocations a call: {sum(parts.values()) / CALLS:.1f}")
for k, n in parts.most_common():
    print(f"  {k:<55} {n / CALLS:6.1f}")
print(f"Bursar's, by the innermost of its functions (-> what it called):")
for k, n in sites.most_common(top):
    print(f"  {n / CALLS:6.2f}  {k[:200]}")
PY
