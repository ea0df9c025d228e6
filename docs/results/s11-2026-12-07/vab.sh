#!/bin/bash
# usage: vab.sh ROUNDS: variants by turns (binary|backup args|protect args)
cd /tmp/rig
V=("merge|/tmp/rig/understudy.merge||" "drain|/tmp/rig/understudy.drain||" "noside|/tmp/rig/understudy.drain|--no-side-copy|")
for r in $(seq $1); do for v in "${V[@]}"; do
  IFS='|' read name bin bargs pargs <<< "$v"
  UB=$bin BACKUP_ARGS="$bargs" bash start.sh $pargs >/dev/null 2>&1; sleep 0.5
  l=$(ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 ${LATN:-150} ${THINK:-40})
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1000} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r $name lat $l gets/s $(echo "16*${N:-1000}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
