#!/bin/bash
# A/B of the tuned-client kill point: side copies (new) vs main, alternating rounds of 10.
cd /tmp
for round in 1 2; do
  seed=$((6 + round))
  for which in new main; do
    if [ $which = new ]; then bin=/work/wt-sidecopy/target/release/testbed; else bin=/work/main/target/release/testbed; fi
    echo "=== round $round $which seed $seed start $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
    $bin faults --points kill --runs 10 --seed $seed --out /tmp/sidecopy-abkill-$which-$round.json > /tmp/sidecopy-abkill-$which-$round.log 2>&1
    echo "=== round $round $which rc=$? end $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
echo ALLDONE
