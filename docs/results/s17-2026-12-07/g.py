import re,sys
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
waiting={}; d=[]; pa=[]
for line in open(sys.argv[1]):
    line=strip(line)
    kv=dict(re.findall(r'(\w+)=(\S+)',line))
    if 'wall_ns' not in kv or 'flow' not in kv: continue
    t=int(kv['wall_ns'])/1000
    if kv["flow"].strip(chr(34))=="-": continue
    sp,dp,pl=map(int,kv['flow'].strip('"').split(':'))
    if 'rx frame delivered' in line and dp==11211 and pl>0: waiting[sp]=t
    elif 'tx frame out' in line and sp==11211 and pl>0 and dp in waiting: d.append(t-waiting.pop(dp))
d=d[len(d)//5:-(len(d)//10)]
v=sorted(d); n=len(v)
print('requests',n,'delivered -> reply out p10 %.0f p50 %.0f p90 %.0f mean %.0f'%(v[n//10],v[n//2],v[9*n//10],sum(v)/n))
