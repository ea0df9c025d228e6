#!/bin/bash
# vCPU CPU per get and epochs per get over the get phase of memcslap; $@ = protect args (none = unprotected)
bash start.sh "$@" >/dev/null 2>&1; sleep 1; PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
B=/work/main/target/release/understudy
( while true; do e=$($B status --api /tmp/rig/run/p.sock --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["protection"]["epochs"])' 2>/dev/null || echo 0); echo "$(date +%s.%N) $(awk '{print $1}' /proc/$PP/task/$V/schedstat) $e $(awk '{s=0; for(i=2;i<=NF;i++) s+=$i; print $1, s}' /proc/stat | head -1 | cut -d' ' -f2-)"; sleep 0.1; done ) > /tmp/rig/vs.txt 2>/dev/null &
SP=$!
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-1500} --test=get > /tmp/rig/slap.txt 2>&1
kill $SP; END=$(date +%s.%N)
t=$(grep 'Time to get' /tmp/rig/slap.txt | awk '{print $(NF-1)}'); G=$(grep 'Time to get' /tmp/rig/slap.txt | awk '{print $4}')
python3 - "$END" "$t" "$G" "$*" <<'PY'
import sys
end,t,G,args=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]),sys.argv[4]
rows=[list(map(float,l.split())) for l in open('/tmp/rig/vs.txt') if len(l.split())==4]
w=[r for r in rows if end-t+0.3 <= r[0] <= end-0.2]
a,b=w[0],w[-1]; dt=b[0]-a[0]; rate=G/t
print("[%s] gets/s %d  vcpu %.0f%% of a core, us/get %.0f  epochs/get %.3f  (window %.1f s)"%(args,rate,(b[1]-a[1])/1e7/dt,(b[1]-a[1])/1e3/(rate*dt),(b[2]-a[2])/(rate*dt),dt))
PY
bash stop.sh
