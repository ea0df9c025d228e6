# capture tap0 (client side) for S seconds; per connection: client turnaround (reply seen -> next request)
# and server time (request -> reply), from kernel timestamps
import socket,struct,sys,time,statistics as st
S=float(sys.argv[1]); dev=sys.argv[2] if len(sys.argv)>2 else 'tap0'
s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(3)); s.bind((dev,0))
s.setsockopt(socket.SOL_SOCKET,35,1) # SO_TIMESTAMPNS
s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,1<<24)
s.settimeout(0.5)
recs=[]; end=time.time()+S
while time.time()<end:
    try: d,anc,fl,addr=s.recvmsg(128,256)
    except socket.timeout: continue
    ts=None
    for lv,ty,da in anc:
        if ty==35: sec,ns=struct.unpack('qq',da[:16]); ts=sec*1e6+ns/1e3
    recs.append((ts,addr[2],d))
conns={}
for ts,pt,d in recs:
    if len(d)<54 or d[12:14]!=b'\x08\x00' or d[23]!=6: continue
    ihl=(d[14]&15)*4; tot=struct.unpack('!H',d[16:18])[0]; t=14+ihl
    sp,dp=struct.unpack('!HH',d[t:t+4]); doff=(d[t+12]>>4)*4; pl=tot-ihl-doff
    if pl<=0: continue
    if dp==11211: conns.setdefault(sp,[]).append((ts,'q'))
    elif sp==11211: conns.setdefault(dp,[]).append((ts,'r'))
turn=[];srv=[]
for c,ev in conns.items():
    ev.sort()
    for (t1,k1),(t2,k2) in zip(ev,ev[1:]):
        if k1=='q' and k2=='r': srv.append(t2-t1)
        if k1=='r' and k2=='q': turn.append(t2-t1)
def p(v,q): v=sorted(v); return int(v[min(len(v)-1,int(len(v)*q/100))]) if v else -1
for nm,v in [("server (req->reply)",srv),("client turnaround",turn)]:
    print("%-22s n=%6d p10 %6d p50 %6d p90 %6d mean %7.1f"%(nm,len(v),p(v,10),p(v,50),p(v,90),st.mean(v) if v else 0))
print("conns",len(conns),"pkts",len(recs))
