#!/bin/bash
# vprio.sh ROUNDS "cmdA" "cmdB": gets by turns; cmd is run with $VT = vcpu0 tid, $PP $BP pids (e.g. "chrt -f -p 1 \$VT")
R=$1; A=$2; Bv=$3
cd /tmp/rig
for r in $(seq $R); do for c in "$A" "$Bv"; do
  UB=${UB:-/tmp/rig/bin/s17a} bash start.sh $MODE >/dev/null 2>&1; sleep 0.5
  PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); BP=$(pgrep -f -- "--api /tmp/rig/run/b.sock" | head -1)
  VT=$(grep -l vcpu0 /proc/$PP/task/*/comm | cut -d/ -f5)
  eval "$c" >/dev/null 2>&1
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$c] gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
