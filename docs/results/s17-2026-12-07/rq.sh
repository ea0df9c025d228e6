#!/bin/bash
# per-thread run time and run-queue wait (schedstat) over 3 s of gets; $@ protect args
cd /tmp/rig
UB=${UB:-/tmp/rig/bin/s17a} bash start.sh "$@" >/dev/null 2>&1; sleep 0.5
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); BP=$(pgrep -f -- "--api /tmp/rig/run/b.sock" | head -1)
snap() { for p in $PP $BP $(pgrep memcslap); do for t in /proc/$p/task/*; do echo "$p $(cat $t/comm | tr ' ' _) $(cat $t/schedstat)"; done; done 2>/dev/null; }
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=3000 --test=get > /tmp/rig17/slap.txt 2>&1 &
sleep 1.5; snap > /tmp/rig17/rq.a; sleep 3; snap > /tmp/rig17/rq.b; wait
bash stop.sh
grep "Time to get" /tmp/rig17/slap.txt
python3 - $PP $BP <<'PY'
import sys
pp,bp=sys.argv[1],sys.argv[2]
def rd(f):
    d={}
    for l in open(f):
        p,c,run,wait,n=l.split()
        k=('P' if p==pp else 'B' if p==bp else 'C', c)
        x=d.setdefault(k,[0,0,0]); x[0]+=int(run); x[1]+=int(wait); x[2]+=int(n)
    return d
a,b=rd('/tmp/rig17/rq.a'),rd('/tmp/rig17/rq.b')
for k in sorted(b):
    if k not in a: continue
    run=(b[k][0]-a[k][0])/3e9*100; wait=(b[k][1]-a[k][1])/1e3; n=b[k][2]-a[k][2]
    if run>0.5: print("%s %-16s run %5.1f%%  rq-wait per slice %6.1f us  slices/s %6d"%(k[0],k[1],run,wait/max(n,1),n/3))
PY
