#!/bin/bash
# timeline of lone requests: $1 start args; prints IRQACK->NOTIFY gaps
bash start.sh $1 >/dev/null 2>&1; sleep 1; PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename); echo $V > vtid
(sleep 0.3; ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 200 5 > lat.txt) &
perf record -k monotonic -e kvm:kvm_mmio,kvm:kvm_vcpu_wakeup,kvm:kvm_userspace_exit,kvmmmu:kvm_mmu_set_spte -t $V -o /tmp/rig/lone.data -- sleep 2.5 2>&1 | tail -1
sleep 1; bash stop.sh
perf script -i lone.data -F tid,time,event,trace --ns 2>/dev/null > lone.txt
python3 - <<'PY'
import re,statistics as st
ev=[]
for l in open('/tmp/rig/lone.txt'):
    m=re.match(r'\s*(\d+)\s+([\d.]+):\s+(\S+):\s+(.*)',l)
    if not m: continue
    t=float(m.group(2))*1e6; e=m.group(3); tr=m.group(4)
    if e=='kvm:kvm_mmio' and 'unsatisfied' not in tr:
        g=re.search(r'gpa (\S+) val (\S+)',tr).group(1)
        ev.append((t,{'0xd0000050':'N','0xd0000064':'A','0xd0000060':'I','0xfee000b0':'E'}.get(g,g)))
    elif e=='kvmmmu:kvm_mmu_set_spte': ev.append((t,'S'))
    elif e=='kvm:kvm_vcpu_wakeup': ev.append((t,'W'))
gaps=[];sp=[]
last=None;n=0
for t,k in ev:
    if k=='A': last=t; n=0
    elif k=='S' and last: n+=1
    elif k=='N' and last: gaps.append(t-last); sp.append(n); last=None
print("IRQACK->NOTIFY n=%d p50 %.0f p10 %.0f p90 %.0f; set_spte between p50 %s"%(len(gaps),st.median(gaps),sorted(gaps)[len(gaps)//10],sorted(gaps)[len(gaps)*9//10],st.median(sp) if sp else '-'))
PY
