#!/bin/bash
# gets at 16 conns by turns with guests: gab.sh ROUNDS guestA guestB [protect args | none]
R=$1; A=$2; Bn=$3; shift 3
for r in $(seq $R); do for g in $A $Bn; do
  GUEST=/tmp/rig/bin/$g bash start.sh "$@" >/dev/null 2>&1; sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$g] $* gets/s $(echo "${C:-16}*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
