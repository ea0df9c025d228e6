#!/bin/bash
# CPU per process over the get phase; $@ = protect args (none = unprotected)
bash start.sh "$@" >/dev/null 2>&1; sleep 1
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); BP=$(pgrep -f -- "--api /tmp/rig/run/b.sock" | head -1)
snap() { for p in $PP $BP; do awk '{print $14+$15}' /proc/$p/stat 2>/dev/null || echo 0; done | tr '\n' ' '; head -1 /proc/stat | awk '{print $5+$6, $2+$3+$4+$7+$8}'; }
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-3000} --test=get > /tmp/rig/slap.txt 2>&1 &
SL=$!; sleep 1.5; a=$(snap); ta=$(date +%s.%N); sleep 3; b=$(snap); tb=$(date +%s.%N); wait $SL
t=$(grep 'Time to get' /tmp/rig/slap.txt | awk '{print $(NF-1)}'); G=$(grep 'Time to get' /tmp/rig/slap.txt | awk '{print $4}')
python3 - "$a" "$b" "$ta" "$tb" "$G" "$t" "$*" <<'PY'
import sys
a=list(map(float,sys.argv[1].split())); b=list(map(float,sys.argv[2].split())); dt=float(sys.argv[4])-float(sys.argv[3])
G,t=int(sys.argv[5]),float(sys.argv[6]); hz=100
d=[(y-x)/hz/dt for x,y in zip(a,b)]
rate=G/t
print("[%s] gets/s %d primary %.0f%% backup %.0f%% idle %.0f%% busy %.0f%% ; us cpu/get: primary %.0f backup %.0f total-busy %.0f"%(sys.argv[7],rate,d[0]*100,d[1]*100,d[2]*100,d[3]*100,d[0]/rate*1e6,d[1]/rate*1e6,d[3]/rate*1e6))
PY
bash stop.sh
