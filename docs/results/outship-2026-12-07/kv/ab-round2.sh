#!/bin/bash
cd /tmp/outship-kv
BENCH=$(ls -t /work/wt-outship/target/release/deps/protect-* | grep -v '\.d$' | head -1)
B=/tmp/outship-base/understudy-6c179ac
N=/tmp/outship-new2/understudy
run() {
  echo "=== $1 $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
  BENCH_NO_BUILD=1 BENCH_ONLY=kv BENCH_EPOCHS_MS=adaptive BENCH_RUNS=2 UNDERSTUDY_BIN=$2 BENCH_JSON=$1.json \
    $BENCH --bench > $1.out 2> $1.err
  echo "=== $1 done $(date +%T) rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
}
for i in 1 2 3; do
  run base-a$i $B; run new-a$i $N; run new-b$i $N; run base-b$i $B
done
echo ALLDONE3 >> log.txt
