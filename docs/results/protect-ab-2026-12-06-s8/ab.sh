#!/bin/bash
# issue 16 A/B in one session, run-major within each bench
cd /work/main
OUT=/work/main/docs/results/protect-ab-2026-12-06-s8; mkdir -p $OUT
git rev-parse --short HEAD > $OUT/commit
uptime > $OUT/load-before
BENCH_NO_BUILD=1 BENCH_ONLY=kv BENCH_EPOCHS_MS=adaptive-silent,adaptive BENCH_RUNS=5 BENCH_VARIANTS="before=--output-idle-end false --pause-copy-threads 1;now=" BENCH_JSON=$OUT/kv.json cargo bench -p testbed --bench protect > $OUT/kv.log 2>&1
BENCH_NO_BUILD=1 BENCH_ONLY=pause BENCH_POINTS=1,4 BENCH_RUNS=3 BENCH_VARIANTS="copy1=--pause-copy-threads 1;copy2=--pause-copy-threads 2" BENCH_JSON=$OUT/pause.json cargo bench -p testbed --bench protect > $OUT/pause.log 2>&1
BENCH_NO_BUILD=1 BENCH_ONLY=dirty BENCH_EPOCHS_MS=10,5 BENCH_RUNS=2 BENCH_VARIANTS="copy1=--pause-copy-threads 1;copy2=--pause-copy-threads 2" BENCH_JSON=$OUT/dirty.json cargo bench -p testbed --bench protect > $OUT/dirty.log 2>&1
uptime > $OUT/load-after
echo done > $OUT/done
