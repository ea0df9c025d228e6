import re,sys,datetime,statistics
ansi=re.compile(r'\x1b\[[0-9;]*m')
def ts(l):
    t=l.split()[0]; return datetime.datetime.fromisoformat(t.replace('Z','+00:00')).timestamp()*1e6
def kv(l): return dict(re.findall(r'(\w+)=(\S+)',l))
P=[ansi.sub('',l) for l in open('run/primary.log')]
Bk=[ansi.sub('',l) for l in open('run/backup.log')]
parts={};tl={};ack={}
for l in P:
    if 'pause parts' in l: d=kv(l); parts[int(d['seq'])]=(ts(l),d)
    elif 'epoch timeline' in l: d=kv(l); tl[int(d['seq'])]=(ts(l),d)
    elif 'acked and released' in l: d=kv(l); ack[int(d['epoch'])]=(ts(l),d)
rec={};com={}
for l in Bk:
    if 'checkpoint received' in l: d=kv(l); rec[int(d['epoch'])]=(ts(l),d)
    elif 'checkpoint committed' in l: d=kv(l); com[int(d['epoch'])]=(ts(l),d)
rows=[]
for e,(ta,d) in ack.items():
    seq=int(d['seq'])
    if seq not in parts or e not in rec or e not in com or seq not in tl: continue
    tp,pd=parts[seq]; td=tl[seq][1]
    if td.get('output_after_us','None')=='None' or 'Some' in td.get('output_after_us',''): pass
    try: oa=int(re.sub(r'\D','',td['output_after_us'])); ea=int(td['end_after_us'])
    except: continue
    rows.append(dict(idle=ea-oa, stop=int(pd['stop_us']), harvest=int(pd['harvest_us']), copystate=int(pd['copy_and_state_us']), pages=int(pd['pages']),
      ship=rec[e][0]-tp, commit=com[e][0]-rec[e][0], ackback=ta-com[e][0]))
print(len(rows),"epochs with output")
for k in ['idle','stop','harvest','copystate','pages','ship','commit','ackback']:
    v=sorted(r[k] for r in rows); print("%-10s p50 %7.0f p90 %7.0f"%(k,v[len(v)//2],v[int(len(v)*.9)]))
