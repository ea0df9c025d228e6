import re,sys
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
ev={}
def add(f,keys):
    for l in open(f):
        l=strip(l); kv=dict(re.findall(r'(\w+)=(\S+)',l))
        if 'wall_ns' not in kv: continue
        for k,name in keys:
            if k in l:
                s=int(kv.get('seq',kv.get('epoch',-1)))
                ev.setdefault(s,{}).setdefault(name,int(kv['wall_ns']))
add('run/primary.log',[('harvest to the link','a_sent'),('harvest taken by the link','b_taken'),('harvest encoded','c_encoded'),('acked and released','g_released')])
add('run/backup.log',[('checkpoint received','d_recv'),('checkpoint committed','e_commit'),('ack queued','f_ackq')])
names=['a_sent','b_taken','c_encoded','d_recv','f_ackq','g_released']
seqs=sorted(s for s in ev if all(n in ev[s] for n in names))[200:-50]
print('epochs',len(seqs))
for a,b in zip(names,names[1:]):
    d=sorted((ev[s][b]-ev[s][a])/1000 for s in seqs); n=len(d)
    print('%-10s -> %-10s p10 %5d p50 %5d p90 %5d mean %5d'%(a,b,d[n//10],d[n//2],d[9*n//10],sum(d)/n))
