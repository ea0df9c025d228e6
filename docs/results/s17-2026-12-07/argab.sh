#!/bin/bash
# argab.sh ROUNDS "argsA" "argsB": gets by turns, one binary (UB), two protect arg sets
R=$1; A=$2; Bv=$3
cd /tmp/rig
for r in $(seq $R); do for a in "$A" "$Bv"; do
  UB=${UB:-/tmp/rig/bin/s17a} bash start.sh $a >/dev/null 2>&1; sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$a] gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
