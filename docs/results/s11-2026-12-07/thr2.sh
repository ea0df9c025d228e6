#!/bin/bash
# per-thread cpu (run ms, runqueue wait ms) over a memcslap get run, for primary, backup; plus epochs
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); BP=$(pgrep -f -- "--api /tmp/rig/run/b.sock" | head -1)
snap() { for p in $PP $BP; do for t in /proc/$p/task/*; do echo "$p/$(basename $t):$(cat $t/comm | tr ' ' _) $(cat $t/schedstat)"; done; done | sort; }
ep() { /work/main/target/release/understudy status --api /tmp/rig/run/p.sock --json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d.get("protection") or {}; print(p.get("epochs", p))' 2>/dev/null; }
snap > /tmp/rig/t0; s=$(date +%s.%N); cat /proc/stat | head -1 > /tmp/rig/cpu0
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-500} --test=get 2>&1 | grep 'Time to get'
e=$(date +%s.%N); snap > /tmp/rig/t1; cat /proc/stat | head -1 > /tmp/rig/cpu1
echo "wall $(echo "($e-$s)*1000" | bc) ms; PP=$PP BP=$BP"
join <(awk '{print $1, $2, $3}' /tmp/rig/t0) <(awk '{print $1, $2, $3}' /tmp/rig/t1) | awk '{r=($4-$2)/1e6; w=($5-$3)/1e6; if (r>5) printf "%-34s run %7.1f ms wait %6.1f ms\n",$1,r,w}'
paste /tmp/rig/cpu0 /tmp/rig/cpu1 | awk '{u=$13-$2; n=$14-$3; s=$15-$4; i=$16-$5; t=u+n+s+i; printf "cpu: user %.0f%% nice %.0f%% sys %.0f%% idle %.0f%%\n", 100*u/t, 100*n/t, 100*s/t, 100*i/t}'
