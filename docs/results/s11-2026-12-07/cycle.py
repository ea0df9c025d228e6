import re,sys,statistics as st,bisect
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
rel={};taken={};held={};rx=[]
for l in open(sys.argv[1]):
    l=strip(l); kv=dict(re.findall(r'(\w+)=(\S+)',l))
    if 'wall_ns' not in kv: continue
    w=int(kv['wall_ns'])/1000.0
    if 'acked and released' in l: rel[int(kv['seq'])]=w
    elif 'harvest taken by the link' in l: taken[int(kv['seq'])]=w
    elif 'output held' in l: held.setdefault(int(kv['epoch']),[]).append(w)
    elif 'rx frame delivered' in l: rx.append(w)
rx.sort()
seqs=sorted(taken); seqs=seqs[len(seqs)//5:len(seqs)*4//5]
rows=[]
for n in seqs:
    if n-1 not in taken or n-1 not in rel: continue
    t0=taken[n-1]; r=rel[n-1]-t0; end=taken[n]-t0
    i=bisect.bisect_left(rx,taken[n-1]); j=bisect.bisect_left(rx,taken[n])
    rxs=[x-t0 for x in rx[i:j]]
    # held frames of epoch n: which epoch numbering? try n
    h=[x-t0 for x in held.get(n,[])]
    rows.append((r, rxs[0] if rxs else None, rxs[-1] if rxs else None, len(rxs), h[0] if h else None, h[-1] if h else None, len(h), end))
def p(v,q): v=sorted(x for x in v if x is not None); return v[int(len(v)*q/100)] if v else None
names=["release(prev)","first rx","last rx","rx count","first out","last out","out count","next pause done"]
for k,nm in enumerate(names):
    v=[r[k] for r in rows]
    print("%-16s p10 %6s p50 %6s p90 %6s"%(nm,*(int(p(v,q)) if p(v,q) is not None else '-' for q in (10,50,90))))
print(len(rows),"epochs; keys of held:",sorted(held)[:3],"taken:",seqs[:3])
best=None
for d in range(-5,6):
    c=0
    for n in seqs:
        if n-1 in taken:
            c+=sum(1 for x in held.get(n+d,[]) if taken[n-1]-300 <= x <= taken[n])
    print("offset",d,c)
