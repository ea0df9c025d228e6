import re,sys,statistics as st,bisect
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
cap=[l.split() for l in open(sys.argv[1])]
toG=[(float(c[0]),int(c[2]),int(c[3]),int(c[4])) for c in cap if c[1]=='4']  # outgoing from host to guest
frG=[(float(c[0]),int(c[2]),int(c[3]),int(c[4])) for c in cap if c[1]=='0']
dl=[];hl=[];rel={}; held_ep=[]
for l in open(sys.argv[2]):
    l=strip(l); kv=dict(re.findall(r'(\w+)=(\S+)',l))
    if 'wall_ns' not in kv: continue
    w=int(kv['wall_ns'])/1000.0
    if 'rx frame delivered' in l: dl.append(w)
    elif 'output held' in l: hl.append(w); held_ep.append(int(kv['epoch']))
    elif 'harvest to the link' in l: rel.setdefault('h2l',{})[int(kv['seq'])]=w
    elif 'acked and released' in l: rel.setdefault('rel',{})[int(kv['seq'])]=w
def align(a,b):  # find k: b[i] ~ a[i+k] with b-a>=0 minimal median
    best=None
    for k in range(-50,51):
        ds=[b[i]-a[i+k] for i in range(200,min(len(b),len(a))-200) if 0<=i+k<len(a)]
        if not ds: continue
        neg=sum(1 for x in ds if x<0); m=st.median(ds)
        sc=(neg,m)
        if best is None or sc<best[0]: best=(sc,k)
    return best
print("toG",len(toG),"delivered",len(dl),"frG",len(frG),"held",len(hl))
a=[x[0] for x in toG]; b=sorted(dl)
(sc,k)=align(a,b); print("inbound align k",k,"neg",sc[0])
a2=sorted(hl); b2=[x[0] for x in frG]
(sc2,k2)=align(a2,b2); print("outbound align k",k2,"neg",sc2[0])
# per request (payload to 11211): tap->delivered
# map held index -> tap out index: tap out j corresponds to held j+k2  (b2[j] ~ a2[j+k2])
held_sorted=sorted(range(len(hl)),key=lambda i:hl[i])
def p(v,q): v=sorted(v); return int(v[min(len(v)-1,int(len(v)*q/100))]) if v else -1
inb=[];guest=[];hold=[];pipe_wait=[]
# reply frames on tap: index j; held time a2[j+k2]
replies={}
for j,(t,sp,dp,pl) in enumerate(frG):
    if sp==11211 and pl>0 and 0<=j+k2<len(a2): replies.setdefault(dp,[]).append((t,a2[j+k2]))
for i,(t,sp,dp,pl) in enumerate(toG):
    if dp!=11211 or pl<=0: continue
    if not (0<=i-k<len(b)) : continue
    # toG[i] ~ b[i-k]? we aligned b[i] ~ a[i+k] so a[i] ~ b[i-k]
    d=b[i-k]; inb.append(d-t)
    # the first reply of this conn after t
    rs=replies.get(sp,[])
    idx=bisect.bisect_left(rs,(t,0))
    if idx<len(rs):
        rt,ht=rs[idx]; guest.append(ht-d); hold.append(rt-ht)
for nm,v in [("tap->delivered",inb),("delivered->held",guest),("held->on tap",hold)]:
    print("%-18s n=%6d p10 %6d p50 %6d p90 %6d mean %7.1f"%(nm,len(v),p(v,10),p(v,50),p(v,90),st.mean(v) if v else 0))
# per-connection cycles for one connection
h2l=rel.get('h2l',{}); rl=rel.get('rel',{})
held_epoch_by_time=dict(zip(hl,held_ep))
port=sorted(replies)[3]
print("conn",port)
reqs=[(i,x) for i,x in enumerate(toG) if x[2]==11211 and x[1]==port and x[3]>0]
for i,(t,sp,dp,pl) in reqs[40:52]:
    if not (0<=i-k<len(b)): continue
    d=b[i-k]; rs=replies.get(sp,[]); idx=bisect.bisect_left(rs,(t,0))
    if idx>=len(rs): continue
    rt,ht=rs[idx]; ep=held_epoch_by_time.get(ht)
    pe=h2l.get(ep); re_=rl.get(ep)
    print("req %9.0f  +deliv %5.0f  +held %5.0f (ep %s) +pause_end %5.0f +released %5.0f +on_tap %5.0f"%(t%1e6, d-t, ht-d, ep, (pe-ht) if pe else -1, (re_-pe) if (pe and re_) else -1, rt-(re_ if re_ else ht)))
