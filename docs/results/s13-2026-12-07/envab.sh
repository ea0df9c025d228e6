#!/bin/bash
# usage: envab.sh ROUNDS "ENV_A" "ENV_B" [protect args] : lone latency + 16-conn gets, by turns
cd /tmp/rig
R=$1; A="$2"; B="$3"; shift 3
for r in $(seq $R); do for v in A B; do
  if [ $v = A ]; then e="$A"; else e="$B"; fi
  env $e bash start.sh "$@" >/dev/null 2>&1; sleep 0.5
  l=$(ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 ${LATN:-150} ${THINK:-40})
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1000} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r $v [$e] lat $l gets/s $(echo "16*${N:-1000}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
