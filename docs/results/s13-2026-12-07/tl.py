import re,sys
V=int(open('vtid').read()); off=int(open('off.txt').read())/1000.0
strip=lambda s: re.sub(r'\x1b\[[0-9;]*m','',s)
ev=[]
for l in open('ev.txt'):
    m=re.match(r'\s*(\d+)\s+([\d.]+):\s+(\S+):\s+(.*)',l)
    if not m: continue
    tid=int(m.group(1)); t=float(m.group(2))*1e6+off; e=m.group(3); tr=m.group(4)
    if e=='kvm:kvm_mmio' and tid==V:
        g=re.search(r'gpa (\S+) val (\S+)',tr); 
        name={'0xd0000050':'NOTIFY','0xd0000060':'ISR','0xd0000064':'IRQACK','0xfee000b0':'EOI'}.get(g.group(1),g.group(1))
        if 'unsatisfied' in tr: continue
        ev.append((t,'mmio %s %s'%(name,g.group(2))))
    elif e=='kvm:kvm_vcpu_wakeup' and tid==V: ev.append((t,'vcpu wakeup '+tr[:30]))
    elif e=='kvm:kvm_userspace_exit' and tid==V: ev.append((t,'uexit '+tr[:40]))
    elif e=='sched:sched_switch':
        pp=int(re.search(r'prev_pid=(\d+)',tr).group(1)); npid=int(re.search(r'next_pid=(\d+)',tr).group(1))
        ps=re.search(r'prev_state=(\S+)',tr).group(1)
        if pp==V: ev.append((t,'  vcpu OFF (%s) -> %s'%(ps,re.search(r'next_comm=(.*?) next_pid',tr).group(1))))
        if npid==V: ev.append((t,'  vcpu ON'))
for l in open(sys.argv[1]):
    l=strip(l); kv=dict(re.findall(r'(\w+)=(\S+)',l))
    if 'wall_ns' not in kv: continue
    w=int(kv['wall_ns'])/1000.0
    msg=l.split('wall_ns')[0][-0:]
    for key in ['rx frame delivered','output held','harvest to the link','acked and released','pause parts','vcpus parked']:
        if key in l: ev.append((w,'LOG '+key+' '+' '.join('%s=%s'%(k,v) for k,v in kv.items() if k in('seq','epoch','len','frames','after_park_us'))))
ev.sort()
t0=float(sys.argv[2]) if len(sys.argv)>2 else None
ts=[e[0] for e in ev if e[1].startswith('mmio')]
start=ts[len(ts)//2]
prev=None
for t,e in ev:
    if start<=t<=start+6000:
        print("%8.0f %s"%(t-start,e))
