#!/usr/bin/env bash
# Runs the cargo-fuzz targets of one fuzz crate (each crate's fuzz/run.sh calls this).
#   testbed/scripts/fuzz.sh DIR [SECONDS]     every target of DIR, SECONDS (default 30) each
# Environment:
#   FUZZ_TARGETS="a b"     only these targets (names DIR does not have are skipped)
#   FUZZ_RUNS=10000000     also stop a target after this many executions
#   FUZZ_UPDATE=1          write new inputs into the committed corpus DIR/corpus/<target>
#                          (then minimize it: `cargo fuzz cmin <target> corpus/<target>`);
#                          by default they go to DIR/target/corpus/<target>, which git ignores
#   FUZZ_MAX_LEN=65536     the largest input libFuzzer makes
# Installs cargo-fuzz if missing. cargo-fuzz needs nightly-only rustc flags (sanitizers,
# -Zcoverage options): on a stable toolchain RUSTC_BOOTSTRAP=1 lets stable accept them.
# Crashes land in DIR/artifacts/<target>/; rerun one with `cargo fuzz run <target> <file>`.
set -euo pipefail
dir="${1:?usage: fuzz.sh DIR [SECONDS]}"
secs="${2:-30}"
cd "$dir"

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

all=$(cargo "${toolchain_args[@]}" fuzz list)
status=0
for t in ${FUZZ_TARGETS:-$all}; do
    if ! grep -qx "$t" <<<"$all"; then
        continue
    fi
    mkdir -p "corpus/$t"
    dirs=("corpus/$t")
    if [ -z "${FUZZ_UPDATE:-}" ]; then
        mkdir -p "target/corpus/$t"
        dirs=("target/corpus/$t" "corpus/$t")
    fi
    echo "== fuzz target $dir:$t for ${secs}s${FUZZ_RUNS:+ or $FUZZ_RUNS runs}"
    if ! cargo "${toolchain_args[@]}" fuzz run "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" ${FUZZ_RUNS:+-runs="$FUZZ_RUNS"} -max_len="${FUZZ_MAX_LEN:-65536}" \
        -rss_limit_mb=2048 -print_final_stats=1; then
        echo "!! fuzz target $dir:$t failed: see $dir/artifacts/$t/"
        status=1
    fi
done
exit $status
