#!/bin/bash
cd /tmp/outship-ab
TB=/tmp/outship-new/testbed
run() {
  local name=$1 bin=$2 seed=$3; shift 3
  echo "=== $name $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
  UNDERSTUDY_BIN=$bin $TB faults --points kill,primary.acked --runs 5 --seed $seed --out $name.json "$@" > $name.out 2> $name.err
  echo "=== $name done $(date +%T) rc=$? load: $(cut -d' ' -f1-3 /proc/loadavg)" >> log.txt
}
N=/tmp/outship-new3/understudy
BE=--protect-arg=--output-burst-end=true
run final-101 $N 101
run final-be-303 $N 303 $BE
run final-202 $N 202
run final-be-404 $N 404 $BE
echo ALLDONE3 >> log.txt
