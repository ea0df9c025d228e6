import re,sys,statistics as st
L=open(sys.argv[1]).read().splitlines()
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
tl={};rel={}
for l in L:
    l=strip(l)
    kv=dict(re.findall(r'(\w+)=(\S+)',l))
    if 'epoch timeline' in l: tl[int(kv['seq'])]=kv
    elif 'acked and released' in l: rel[int(kv['seq'])]=kv
seqs=sorted(tl)
n=len(seqs); seqs=seqs[n//5:n*4//5]  # middle
def pct(v,p): v=sorted(v); return v[int(len(v)*p/100)] if v else None
oa=[int(tl[s]['output_after_us']) for s in seqs if tl[s].get('output_after_us','None')!='None']
ea=[int(tl[s]['end_after_us']) for s in seqs]
win=[int(tl[s]['end_after_us'])-int(tl[s]['output_after_us']) for s in seqs if tl[s].get('output_after_us','None')!='None']
idle=sum(1 for s in seqs if tl[s]['ended_idle']=='true')
fr=[int(rel[s]['frames']) for s in seqs if s in rel]
lat=[int(rel[s]['latency_us']) for s in seqs if s in rel and rel[s].get('latency_us','None')!='None']
print("epochs",len(seqs),"ended idle",idle, "no output", len(seqs)-len(oa))
for name,v in [("output_after",oa),("end_after",ea),("window",win),("frames",fr),("ack latency",lat)]:
    print("%-13s p10 %s p50 %s p90 %s mean %.0f"%(name,pct(v,10),pct(v,50),pct(v,90),st.mean(v)))
import collections
print("frames hist", sorted(collections.Counter(fr).items())[:30])
