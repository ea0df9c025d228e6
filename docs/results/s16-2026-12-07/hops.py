import re,sys,statistics
ansi=re.compile(r'\x1b\[[0-9;]*m')
def kv(l): return dict(re.findall(r'(\w+)=(\S+)',l))
P=[ansi.sub('',l) for l in open('/tmp/rig/run/primary.log')]
B=[ansi.sub('',l) for l in open('/tmp/rig/run/backup.log')]
ev={}
def put(seq,name,ns):
    ev.setdefault(seq,{}).setdefault(name,ns)
for l in P:
    d=kv(l)
    if 'wall_ns' not in d: continue
    w=int(d['wall_ns'])
    for m,n in [('harvest to the link','to_link'),('harvest taken by the link','link'),('harvest encoded','encoded'),('acked and released','released')]:
        if m in l: put(int(d['seq']),n,w)
# primary: first "control frame to the core" after released? use reader events after backup ack
for l in B:
    d=kv(l)
    if 'wall_ns' not in d: continue
    w=int(d['wall_ns'])
    if 'checkpoint received' in l: put(int(d['epoch']),'b_decoded',w)
    if 'ack queued' in l: put(int(d['epoch']),'b_ackq',w)
# first backup reader read after 'encoded'
br=[int(kv(l)['wall_ns']) for l in B if 'control frame read' in l]
pr=[int(kv(l)['wall_ns']) for l in P if 'control frame read' in l]
import bisect
rows=[]
for s,e in ev.items():
    if not all(k in e for k in ['to_link','link','encoded','b_decoded','b_ackq','released']): continue
    i=bisect.bisect_left(br,e['encoded']); e['b_read']=br[i] if i<len(br) else None
    j=bisect.bisect_left(pr,e['b_ackq']); e['p_read']=pr[j] if j<len(pr) else None
    if e['b_read'] is None or e['p_read'] is None or e['b_read']>e['b_decoded'] or e['p_read']>e['released']: continue
    rows.append(e)
order=['to_link','link','encoded','b_read','b_decoded','b_ackq','p_read','released']
print(len(rows),'epochs (with output released)')
for a,b in zip(order,order[1:]):
    v=sorted((r[b]-r[a])/1000 for r in rows); print('%-10s -> %-10s p50 %6.0f p90 %6.0f'%(a,b,v[len(v)//2],v[int(len(v)*.9)]))
v=sorted((r['released']-r['to_link'])/1000 for r in rows); print('total p50 %.0f'%v[len(v)//2])
