import re,sys,collections
V=int(open('vtid').read()); ev=[]
tids={}
for l in open('tids.txt').readlines()[1:]:
    a=l.split(); tids[int(a[0])]=a[1]
state=None; since=None; acc=collections.Counter(); who=collections.Counter()
t0=None
for l in open('ev.txt'):
    m=re.match(r'\s*(\d+)\s+([\d.]+):\s+(\S+):\s+(.*)',l)
    if not m: continue
    tid=int(m.group(1)); t=float(m.group(2))*1e6; e=m.group(3); tr=m.group(4)
    if t0 is None: t0=t
    if e=='sched:sched_switch':
        pp=int(re.search(r'prev_pid=(\d+)',tr).group(1)); npid=int(re.search(r'next_pid=(\d+)',tr).group(1))
        ps=re.search(r'prev_state=(\S+)',tr).group(1)
        if pp==V:
            if state: acc[state]+=t-since
            state='preempted' if ps.startswith('R') else 'blocked'; since=t
            if state=='preempted':
                nc=re.search(r'next_comm=(.*?) next_pid',tr).group(1); who[nc]+=1
        elif npid==V:
            if state: acc[state]+=t-since
            state='running'; since=t
    elif e=='sched:sched_wakeup':
        if int(re.search(r' pid=(\d+)',tr).group(1))==V and state=='blocked':
            acc[state]+=t-since; state='wakeup-wait'; since=t
tot=sum(acc.values())
for k,v in acc.most_common(): print("%-12s %8.0f us %5.1f%%"%(k,v,100*v/tot))
print("preempted by:",who.most_common(8))
# who runs on cpus: total runtime per comm
run=collections.Counter(); cur={}
for l in open('ev.txt'):
    m=re.match(r'\s*(\d+)\s+([\d.]+):\s+(\S+):\s+(.*)',l)
    if not m or m.group(3)!='sched:sched_switch': continue
    t=float(m.group(2))*1e6; tr=m.group(4)
    cpu=None
