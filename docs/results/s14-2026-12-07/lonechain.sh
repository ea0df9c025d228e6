#!/bin/bash
# lone request chain: debug logs + lat.py; $@ = protect args
LOG=info,primary::engine=debug,primary::link=debug,backup::server=debug bash start.sh "$@" >/dev/null 2>&1; sleep 1
ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 ${LATN:-300} 5
bash stop.sh
python3 - <<'PY'
import re
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
ev={}; tl={}; pp={}
def add(f,keys):
    for l in open(f):
        l=strip(l); kv=dict(re.findall(r'(\w+)=(\S+)',l))
        if 'epoch timeline' in l: tl[int(kv['seq'])]=kv
        if 'pause parts' in l: pp[int(kv['seq'])]=kv
        if 'wall_ns' not in kv: continue
        for k,name in keys:
            if k in l:
                s=int(kv.get('seq',kv.get('epoch',-1)))
                ev.setdefault(s,{}).setdefault(name,int(kv['wall_ns']))
add('/tmp/rig/run/primary.log',[('harvest to the link','a_sent'),('harvest taken by the link','b_taken'),('harvest encoded','c_encoded'),('acked and released','g_released')])
add('/tmp/rig/run/backup.log',[('checkpoint received','d_recv'),('checkpoint committed','e_commit'),('ack queued','f_ackq')])
names=['a_sent','b_taken','c_encoded','d_recv','f_ackq','g_released']
seqs=[s for s in sorted(ev) if all(n in ev[s] for n in names) and s in tl and tl[s].get('output_after_us','None')!='None' and s in pp]
print('epochs with output',len(seqs))
def row(name,d):
    d=sorted(d); n=len(d); print('%-22s p10 %5d p50 %5d p90 %5d'%(name,d[n//10],d[n//2],d[9*n//10]))
row('first output -> end',[int(tl[s]['end_after_us'])-int(tl[s]['output_after_us']) for s in seqs])
row('stop',[int(pp[s]['stop_us']) for s in seqs])
row('harvest',[int(pp[s]['harvest_us']) for s in seqs])
row('copy+state',[int(pp[s]['copy_and_state_us']) for s in seqs])
row('pages',[int(pp[s]['pages']) for s in seqs])
for a,b in zip(names,names[1:]): row(a+'->'+b,[(ev[s][b]-ev[s][a])/1000 for s in seqs])
row('sent->released',[(ev[s]['g_released']-ev[s]['a_sent'])/1000 for s in seqs])
PY
