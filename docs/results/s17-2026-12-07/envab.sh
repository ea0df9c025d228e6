#!/bin/bash
# envab.sh ROUNDS VAR VALA VALB [protect args|none]: gets by turns, one binary, an env var's two values
R=$1; V=$2; A=$3; Bv=$4; shift 4
cd /tmp/rig
for r in $(seq $R); do for val in $A $Bv; do
  env $V=$val UB=${UB:-/tmp/rig/bin/iot} bash start.sh "$@" >/dev/null 2>&1; sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$V=$val] $* gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
