import re,sys,collections
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
frames=collections.Counter(); tl={}; pp={}
for l in open(sys.argv[1]):
    l=strip(l); kv=dict(re.findall(r'(\w+)=(\S+)',l))
    if 'output held' in l: frames[int(kv['epoch'])]+=1
    elif 'epoch timeline' in l: tl[int(kv['seq'])]=kv
    elif 'pause parts' in l: pp[int(kv['seq'])]=kv
seqs=sorted(tl)[200:-50]
def pct(v,p): v=sorted(v); return v[int(p*(len(v)-1))]
F=[frames[s] for s in seqs]; L=[int(tl[s]['end_after_us']) for s in seqs]
O=[int(tl[s]['output_after_us']) for s in seqs if tl[s]['output_after_us']!='None']
idle=sum(tl[s]['ended_idle']=='true' for s in seqs)
print('epochs',len(seqs),'frames/epoch mean %.2f'%(sum(F)/len(F)),'dist',sorted(collections.Counter(F).items())[:20])
print('len p50 %d mean %d; output_after p50 %d; ended idle %.0f%%'%(pct(L,.5),sum(L)/len(L),pct(O,.5),100*idle/len(seqs)))
P=[int(pp[s]['stop_us'])+int(pp[s]['harvest_us'])+int(pp[s]['copy_and_state_us']) for s in seqs if s in pp]
print('pause parts sum p50',pct(P,.5),'stop p50',pct([int(pp[s]['stop_us']) for s in seqs if s in pp],.5),'pages p50',pct([int(pp[s]['pages']) for s in seqs if s in pp],.5))
