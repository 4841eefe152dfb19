# What the proxy benchmarks share; sourced by them from the repository's root.

# The bursar binary to measure: BURSAR_BIN (say, the build before a change), else this
# tree's release build, built now.
bursar_bin() {
  if [ -z "${BURSAR_BIN:-}" ]; then cargo build --release -p bursar >/dev/null; fi
  echo "${BURSAR_BIN:-./target/release/bursar}"
}

# Writes to $2 the configuration of the proxy benchmarks: bench/bench.toml (four budgets
# and a rate limit per call) with an `openai`-kind provider at http://$1 serving every
# model.
proxy_config() {
  { cat bench/bench.toml
    printf '\n[[providers]]\nname = "upstream"\nkind = "openai"\nbase_url = "http://%s"\nserves = ["*"]\n' "$1"
  } > "$2"
}

# Sets `bin` (above) and `work`, a temporary directory; at exit the servers whose
# process ids the benchmark put in `sim_pid` and `pid` are stopped and `work` removed.
bench_start() {
  bin=$(bursar_bin)
  work=$(mktemp -d)
  sim_pid=""; pid=""
  trap 'kill $sim_pid $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
}
