#!/bin/bash
# usage: argab.sh ROUNDS "argsA" "argsB" : lone latency (think) + 16-conn gets, by turns
cd /tmp/rig
for r in $(seq $1); do for v in A B; do
  if [ $v = A ]; then a="$2"; else a="$3"; fi
  UB=${UB:-/work/main/target/release/understudy} bash start.sh $a >/dev/null 2>&1; sleep 0.5
  l=$(ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 ${LATN:-150} ${THINK:-40})
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1000} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r $v [$a] lat $l gets/s $(echo "16*${N:-1000}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
