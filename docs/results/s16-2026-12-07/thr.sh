#!/bin/bash
# per-thread CPU (us per get) over the get phase; $@ = protect args (none = unprotected)
bash start.sh "$@" >/dev/null 2>&1; sleep 1
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); BP=$(pgrep -f -- "--api /tmp/rig/run/b.sock" | head -1)
snap() { for p in $PP $BP; do for t in /proc/$p/task/*; do echo "$p $(cat $t/comm | tr ' ' _) $(awk '{print $14+$15}' $t/stat) $(awk '{print $1}' $t/schedstat) $(grep -E '^(voluntary|nonvoluntary)' $t/status | awk '{s+=$2} END {print s}')"; done; done; }
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-3000} --test=get > /tmp/rig/slap.txt 2>&1 &
SL=$!; sleep 1.5; snap > /tmp/rig/thr.a; ta=$(date +%s.%N); sleep 3; snap > /tmp/rig/thr.b; tb=$(date +%s.%N); wait $SL
t=$(grep 'Time to get' /tmp/rig/slap.txt | awk '{print $(NF-1)}'); G=$(grep 'Time to get' /tmp/rig/slap.txt | awk '{print $4}')
python3 - $ta $tb $G $t $PP <<'PY'
import sys,collections
ta,tb,G,t,pp=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]),float(sys.argv[4]),sys.argv[5]
rate=G/t; dt=tb-ta; gets=rate*dt
def rd(f):
    d={}
    for l in open(f):
        p,c,ticks,ns,cs=l.split(); d.setdefault((p,c),[0,0,0]); x=d[(p,c)]; x[0]+=int(ns); x[1]+=int(cs)
    return d
a,b=rd('/tmp/rig/thr.a'),rd('/tmp/rig/thr.b')
print("gets/s %d"%rate)
tot=0
for k in sorted(b):
    if k not in a: continue
    us=(b[k][0]-a[k][0])/1e3/gets; cs=(b[k][1]-a[k][1])/gets; tot+=us
    if us>0.5: print("%s %-16s %7.1f us/get %5.2f csw/get"%('P' if k[0]==pp else 'B',k[1],us,cs))
print("total %.1f us/get"%tot)
PY
bash stop.sh
