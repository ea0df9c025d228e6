#!/bin/bash
# A/B by turns: kill.untuned with LAN copies (default) and without (--no-lan-copy).
cd /work/main
for r in 1 2 3; do
  for v in on off; do
    extra=""; [ $v = off ] && extra="--no-lan-copy"
    echo "== round $r $v load $(cut -d' ' -f1 /proc/loadavg)"
    UNDERSTUDY_BIN=/tmp/lanab/understudy /tmp/lanab/testbed faults --runs 10 --points kill.untuned --seed $((9000+r)) $extra --out /tmp/lanab/$v-$r.json 2>&1 | grep -E "^\| kill"
  done
done
echo done
