#!/bin/bash
# gets at 16 conns with /dev/cpu_dma_latency held at 0 (cores poll when idle) or not: qosab.sh ROUNDS
for r in $(seq $1); do for m in none qos; do
  [ $m = qos ] && { python3 /tmp/rig/qos.py 0 & Q=$!; sleep 0.2; }
  bash start.sh >/dev/null 2>&1; sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r $m gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
  [ $m = qos ] && kill $Q
done; done
