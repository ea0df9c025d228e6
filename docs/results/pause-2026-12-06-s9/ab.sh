#!/bin/bash
# issue 16 item 2 (shorter pause): A/B in one session, run-major within each bench.
# old = this session's starting behaviour; rt = SCHED_FIFO pause only; new = the new defaults
# (--pause-rt-priority 1 --epoch-precopy-us 2000).
cd /work/wt-i16-pause
OUT=/work/wt-i16-pause/docs/results/pause-2026-12-06-s9; mkdir -p $OUT
git rev-parse --short HEAD > $OUT/commit
git status --short >> $OUT/commit
uptime > $OUT/load-before
BENCH_NO_BUILD=1 BENCH_ONLY=pause BENCH_POINTS=1,4 BENCH_RUNS=3 BENCH_WINDOW_S=8 BENCH_VARIANTS="old=--pause-rt-priority 0 --epoch-precopy-us 0;rt=--pause-rt-priority 1 --epoch-precopy-us 0;new=" BENCH_JSON=$OUT/pause.json cargo bench -p testbed --bench protect > $OUT/pause.log 2>&1
uptime > $OUT/load-mid
BENCH_NO_BUILD=1 BENCH_ONLY=dirty BENCH_EPOCHS_MS=10,5 BENCH_RUNS=3 BENCH_VARIANTS="old=--pause-rt-priority 0 --epoch-precopy-us 0;new=" BENCH_JSON=$OUT/dirty.json cargo bench -p testbed --bench protect > $OUT/dirty.log 2>&1
uptime > $OUT/load-after
echo done > $OUT/done
