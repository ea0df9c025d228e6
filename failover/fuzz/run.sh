#!/usr/bin/env bash
# Runs every cargo-fuzz target of the failover crate for the given number of seconds each.
#   failover/fuzz/run.sh 60                    # 60 s per target
#   FUZZ_TARGETS="raft_wire" ./run.sh 30        # a subset
#   FUZZ_RUNS=10000000 ./run.sh 1800            # stop at 10 million executions or 30 min
# Installs cargo-fuzz if missing. cargo-fuzz needs nightly-only rustc flags (sanitizers,
# -Zcoverage options): on a stable toolchain RUSTC_BOOTSTRAP=1 lets stable accept them.
# Built with debug assertions and overflow checks (-a: an overflow is a finding) and without
# AddressSanitizer (-s none: the failover crate forbids unsafe code, and ASan made the
# arbiter target ~8x slower).
# Crashes land in failover/fuzz/artifacts/<target>/ (copy each into regressions/<target>/ once
# fixed: tests/fuzz_smoke.rs replays them); the corpus in corpus/<target>/ (kept in git: minimise
# it with `cargo fuzz cmin <target> corpus/<target>` when it grows).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
targets="${FUZZ_TARGETS:-raft_wire arbiter_step}"
runs=()
if [ -n "${FUZZ_RUNS:-}" ]; then
    runs=(-runs="$FUZZ_RUNS")
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

toolchain_args=()
if rustc --version | grep -q nightly; then
    :
elif rustup run nightly rustc --version >/dev/null 2>&1 && [ -n "${FUZZ_NIGHTLY:-}" ]; then
    toolchain_args=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

status=0
for t in $targets; do
    echo "== fuzz target $t for ${secs}s"
    mkdir -p "corpus/$t"
    if ! cargo "${toolchain_args[@]}" fuzz run -a -s none "$t" "corpus/$t" -- \
        -max_total_time="$secs" "${runs[@]}" -max_len=4096 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "!! fuzz target $t failed: see artifacts/$t/"
        status=1
    fi
done
exit $status
