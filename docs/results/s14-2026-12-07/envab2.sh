#!/bin/bash
# usage: envab2.sh ROUNDS "ENV=a" "ENV=b" : 16-conn gets + lone latency by turns, env for both processes
for r in $(seq $1); do for v in "$2" "$3"; do
  env $v bash start.sh >/dev/null 2>&1; sleep 0.5
  l=$(ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 ${LATN:-150} ${THINK:-40})
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$v] lat $l gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
