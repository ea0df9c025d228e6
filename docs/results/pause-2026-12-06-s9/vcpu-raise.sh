#!/bin/bash
cd /work/wt-i16-pause
OUT=/work/wt-i16-pause/docs/results/pause-2026-12-06-s9/vcpu-raise; mkdir -p $OUT
uptime > $OUT/load-before
BENCH_KEEP=1 BENCH_NO_BUILD=1 BENCH_ONLY=pause BENCH_POINTS=4 BENCH_RUNS=3 BENCH_WINDOW_S=8 BENCH_LOG="info,primary::engine=debug" BENCH_VARIANTS="old=--pause-rt-priority 0 --epoch-precopy-us 0;new=;new_vcpus=--pause-rt-vcpus true" BENCH_JSON=$OUT/pause.json cargo bench -p testbed --bench protect > $OUT/pause.log 2>&1
uptime > $OUT/load-mid
BENCH_NO_BUILD=1 BENCH_ONLY=dirty BENCH_EPOCHS_MS=10 BENCH_RUNS=2 BENCH_VARIANTS="old=--pause-rt-priority 0 --epoch-precopy-us 0;new=;new_vcpus=--pause-rt-vcpus true" BENCH_JSON=$OUT/dirty.json cargo bench -p testbed --bench protect > $OUT/dirty.log 2>&1
uptime > $OUT/load-after
echo done > $OUT/done
