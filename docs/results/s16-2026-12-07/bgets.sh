#!/bin/bash
# bgets.sh ROUNDS binA binB [protect args|none]: 16-conn gets by turns, two binaries from /tmp/rig/bin
R=$1; A=$2; Bn=$3; shift 3
for r in $(seq $R); do for b in $A $Bn; do
  UB=/tmp/rig/bin/$b bash start.sh "$@" >/dev/null 2>&1; sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$b] $* gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
