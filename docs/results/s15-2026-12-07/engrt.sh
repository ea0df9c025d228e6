#!/bin/bash
# engrt.sh ROUNDS: gets with the epoch engine at SCHED_FIFO 1 all the time vs default (RT only in the pause)
for r in $(seq $1); do for m in base rt; do
  bash start.sh >/dev/null 2>&1; sleep 0.5
  PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1)
  if [ $m = rt ]; then for t in /proc/$PP/task/*; do [ "$(cat $t/comm)" = epoch-engine ] && chrt -f -p 1 $(basename $t); done; fi
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r $m gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
