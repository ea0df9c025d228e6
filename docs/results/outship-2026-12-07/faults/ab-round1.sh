#!/bin/bash
# A/B by turns: main's understudy (6c179ac) vs outship's, same testbed harness (outship's), same seeds.
cd /tmp/outship-ab
TB=/tmp/outship-new/testbed
run() { # name bin seed extra...
  local name=$1 bin=$2 seed=$3; shift 3
  echo "=== $name $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
  UNDERSTUDY_BIN=$bin $TB faults --points kill,primary.acked --runs 5 --seed $seed --out $name.json "$@" > $name.out 2> $name.err
  echo "=== $name done $(date +%T) rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
}
B=/tmp/outship-base/understudy-6c179ac
N=/tmp/outship-new/understudy
run base-101 $B 101
run new-101 $N 101
run new-202 $N 202
run base-202 $B 202
BE=--protect-arg=--output-burst-end=true
run new-be-303 $N 303 $BE
run base-be-303 $B 303 $BE
run base-be-404 $B 404 $BE
run new-be-404 $N 404 $BE
echo ALLDONE >> log.txt
