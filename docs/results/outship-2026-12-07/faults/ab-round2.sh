#!/bin/bash
cd /tmp/outship-ab
TB=/tmp/outship-new/testbed
run() {
  local name=$1 bin=$2 seed=$3; shift 3
  echo "=== $name $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
  UNDERSTUDY_BIN=$bin $TB faults --points kill,primary.acked --runs 5 --seed $seed --out $name.json "$@" > $name.out 2> $name.err
  echo "=== $name done $(date +%T) rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
}
B=/tmp/outship-base/understudy-6c179ac
N=/tmp/outship-new/understudy
BE=--protect-arg=--output-burst-end=true
run new-505 $N 505
run base-505 $B 505
run base-be-707 $B 707 $BE
run new-be-707 $N 707 $BE
run base-606 $B 606
run new-606 $N 606
run new-be-808 $N 808 $BE
run base-be-808 $B 808 $BE
echo ALLDONE2 >> log.txt
