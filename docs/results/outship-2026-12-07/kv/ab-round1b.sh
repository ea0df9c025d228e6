#!/bin/bash
# kv bench (pause, ack, throughput, latency), main's understudy vs outship's, by turns.
cd /tmp/outship-kv
BENCH=$(ls -t /work/wt-outship/target/release/deps/protect-* | grep -v '\.d$' | head -1)
B=/tmp/outship-base/understudy-6c179ac
N=/tmp/outship-new/understudy
run() { # name bin
  echo "=== $1 $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
  BENCH_NO_BUILD=1 BENCH_ONLY=kv BENCH_EPOCHS_MS=adaptive BENCH_RUNS=2 UNDERSTUDY_BIN=$2 BENCH_JSON=$1.json \
    $BENCH --bench > $1.out 2> $1.err
  echo "=== $1 done $(date +%T) rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
}
run base-4 $B
run new-4 $N
run new-5 $N
run base-5 $B
run base-6 $B
run new-6 $N
echo ALLDONE2 >> log.txt
