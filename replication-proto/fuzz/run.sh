#!/usr/bin/env bash
# Runs every cargo-fuzz target of this crate for the given number of seconds each:
#   replication-proto/fuzz/run.sh 60           # 60 s per target
#   FUZZ_TARGETS="frames pages" ./run.sh 30    # a subset
# testbed/scripts/fuzz.sh describes the other settings (FUZZ_RUNS, FUZZ_UPDATE, ...).
exec "$(dirname "$0")/../../testbed/scripts/fuzz.sh" "$(dirname "$0")" "$@"
