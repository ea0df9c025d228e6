#!/bin/bash
# gets at 16 conns with sched attrs on replication threads: attrab.sh ROUNDS mode1 mode2 ... (none = unchanged)
R=$1; shift
for r in $(seq $R); do for m in "$@"; do
  bash start.sh >/dev/null 2>&1; sleep 0.5
  PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); BP=$(pgrep -f -- "--api /tmp/rig/run/b.sock" | head -1)
  [ "$m" != none ] && python3 setattr.py $m $PP $BP
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r $m gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
