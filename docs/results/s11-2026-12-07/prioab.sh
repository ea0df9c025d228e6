#!/bin/bash
cd /tmp/rig
for r in $(seq ${1:-3}); do for v in base nice; do
  bash start.sh >/dev/null 2>&1; sleep 0.5
  if [ $v = nice ]; then
    for p in $(pgrep -f -- "--api /tmp/rig/run/[pb].sock"); do for t in /proc/$p/task/*; do c=$(cat $t/comm); case $c in understudy-io|epoch-engine) renice -n ${NICE:--10} -p $(basename $t) >/dev/null;; esac; done; done
  fi
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1000} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r $v gets/s $(echo "16*${N:-1000}/$t" | bc)"
  bash stop.sh
done; done
