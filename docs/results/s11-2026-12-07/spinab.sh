#!/bin/bash
# usage: spinab.sh "200 20 0" ROUNDS -> get time for unprotected and protected per idle_spins
cd /tmp/rig
for r in $(seq ${2:-2}); do for s in $1; do for mode in none prot; do
  if [ $mode = none ]; then CMDLINE="workload=kv ip=10.98.0.2/24 idle_spins=$s" bash start.sh none >/dev/null 2>&1
  else CMDLINE="workload=kv ip=10.98.0.2/24 idle_spins=$s" bash start.sh $PROTECT_ARGS >/dev/null 2>&1; fi
  sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1000} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r spins $s $mode get_s $t ops/s $(echo "16*${N:-1000}/$t" | bc)"
  bash stop.sh
done; done; done
