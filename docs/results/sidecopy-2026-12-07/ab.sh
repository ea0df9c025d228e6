#!/bin/bash
# A/B: side copies (new) vs main, alternating rounds of 10 kill.untuned runs.
cd /tmp
for round in ${ROUNDS:-1 2}; do
  seed=$((4241 + round))
  for which in new main; do
    if [ $which = new ]; then bin=/work/wt-sidecopy/target/release/testbed; else bin=/work/main/target/release/testbed; fi
    echo "=== round $round $which seed $seed start $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
    nice -n 0 $bin faults --points kill.untuned --runs 10 --seed $seed --out /tmp/sidecopy-ab-$which-$round.json > /tmp/sidecopy-ab-$which-$round.log 2>&1
    echo "=== round $round $which rc=$? end $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  done
done
echo ALLDONE
