#!/bin/bash
# tuned kill + primary.acked, base (e4b542c) vs main (f438993+), by turns
for r in 1 2; do for v in base main; do
  d=/work/wt-base; [ $v = main ] && d=/work/main
  (cd $d && target/release/testbed faults --points kill,primary.acked --runs 5 --seed $((20261300+r)) --out /tmp/ackab-$v-$r.json > /tmp/ackab-$v-$r.log 2>&1)
  echo "round $r $v done load $(cut -d' ' -f1 /proc/loadavg)"
done; done
