#!/bin/bash
# gets/s at several concurrencies, protected (args) vs unprotected ("none")
cd /tmp/rig
for v in none prot; do
  if [ $v = none ]; then bash start.sh none >/dev/null 2>&1; else bash start.sh $PARGS >/dev/null 2>&1; fi
  sleep 0.5
  for c in 1 2 4 8 16 32; do
    n=$(( 16000 / c ))
    t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=$c --execute-number=$n --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
    echo "$v c=$c gets/s $(echo "$c*$n/$t" | bc) rtt_us $(echo "1000000*$t/$n" | bc)"
  done
  bash stop.sh
done
