#!/bin/bash
# gets at 16 conns with the vCPU thread reniced: nice.sh ROUNDS n1 n2 ...
R=$1; shift
for r in $(seq $R); do for n in "$@"; do
  bash start.sh >/dev/null 2>&1; sleep 0.5
  PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
  renice -n $n -p $V >/dev/null
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r nice $n gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
