#!/bin/bash
# context switches per epoch per thread over a memcslap get run
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); BP=$(pgrep -f -- "--api /tmp/rig/run/b.sock" | head -1)
B=/work/main/target/release/understudy
ep() { $B status --api /tmp/rig/run/p.sock --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["protection"]["epochs"])'; }
snap() { for p in $PP $BP; do for t in /proc/$p/task/*; do echo "$p/$(basename $t):$(cat $t/comm | tr ' ' _) $(awk '/voluntary_ctxt_switches/{printf "%s ",$2}' $t/status) $(awk '{print $1}' $t/schedstat)"; done; done | sort; }
e0=$(ep); snap > /tmp/rig/c0
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1000} --test=get 2>&1 | grep 'Time to get'
e1=$(ep); snap > /tmp/rig/c1
echo "epochs $((e1-e0))"
join <(awk '{print $1, $2, $3, $4}' /tmp/rig/c0) <(awk '{print $1, $2, $3, $4}' /tmp/rig/c1) | awk -v E=$((e1-e0)) '{v=$5-$2; n=$6-$3; r=($7-$4)/1e3; if (v+n>100) printf "%-34s vol/epoch %5.1f invol/epoch %5.1f cpu us/epoch %6.0f\n",$1,v/E,n/E,r/E}'
