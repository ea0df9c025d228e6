import re,sys,statistics as st
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
rel={};h2l={};held={};rx=[]
for l in open(sys.argv[1]):
    l=strip(l); kv=dict(re.findall(r'(\w+)=(\S+)',l))
    if 'wall_ns' not in kv: continue
    w=int(kv['wall_ns'])/1000.0
    if 'acked and released' in l: rel[int(kv['seq'])]=w
    elif 'harvest to the link' in l: h2l[int(kv['seq'])]=w
    elif 'output held' in l: held.setdefault(int(kv['epoch']),[]).append(w)
    elif 'rx frame delivered' in l: rx.append(w)
def p(v,q): v=sorted(v); return int(v[min(len(v)-1,int(len(v)*q/100))]) if v else -1
seqs=sorted(h2l); seqs=seqs[len(seqs)//5:len(seqs)*4//5]
wait=[];pipe=[];cnt=[];gap=[];per=[]
for n in seqs:
    if n not in rel: continue
    hs=held.get(n,[])
    cnt.append(len(hs))
    for x in hs: wait.append(h2l[n]-x)
    pipe.append(rel[n]-h2l[n])
    if n-1 in h2l: per.append(h2l[n]-h2l[n-1])
for nm,v in [("held->pause end",wait),("pause end->released",pipe),("frames/epoch",cnt),("epoch period",per)]:
    print("%-22s n=%5d p10 %6d p50 %6d p90 %6d mean %7.1f"%(nm,len(v),p(v,10),p(v,50),p(v,90),st.mean(v) if v else 0))
