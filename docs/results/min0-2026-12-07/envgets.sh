#!/bin/bash
# usage: envgets.sh ROUNDS bin "ENV=a" "ENV=b" ...: 16-conn gets by turns, one binary, env on both processes
R=$1; b=$2; shift 2
for r in $(seq $R); do for v in "$@"; do
  env $v UB=/tmp/rig/bin/$b bash start.sh >/dev/null 2>&1; sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$v] gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
