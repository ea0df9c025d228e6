#!/bin/bash
# usage: binab.sh ROUNDS binA binB [protect args]: lone chain (stop, copy+state, sent->released, lone p50) + 16-conn gets, by turns
R=$1; A=$2; Bn=$3; shift 3
for r in $(seq $R); do for b in $A $Bn; do
  l=$(UB=/tmp/rig/bin/$b bash lonechain-rate.sh "$@" 2>&1 | awk '/^p50/{rt=$1} /^stop/{s=$5} /^copy\+state/{c=$5} /^sent->released/{sr=$5} END {print rt, "stop", s, "copy+state", c, "sent->rel", sr}')
  UB=/tmp/rig/bin/$b bash start-rate.sh "$@" >/dev/null 2>&1; sleep 0.5
  t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
  echo "round $r [$b] lone $l | gets/s $(echo "16*${N:-1500}/$t" | bc) load $(cut -d' ' -f1 /proc/loadavg)"
  bash stop.sh
done; done
