#!/usr/bin/env bash
# Runs every cargo-fuzz target of replication-proto for the given number of seconds each.
#   replication-proto/fuzz/run.sh 60        # 60 s per target
#   FUZZ_TARGETS="frames pages" ./run.sh 30 # a subset
# Installs cargo-fuzz if missing. cargo-fuzz needs nightly-only rustc flags (sanitizers,
# -Zcoverage options): on a stable toolchain RUSTC_BOOTSTRAP=1 lets stable accept them.
# Crashes land in replication-proto/fuzz/artifacts/<target>/; the corpus in corpus/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
targets="${FUZZ_TARGETS:-frames pages state receiver}"

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
    if ! cargo "${toolchain_args[@]}" fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "!! fuzz target $t failed: see artifacts/$t/"
        status=1
    fi
done
exit $status
