# capture tap0 for S seconds, write (ts_us, pkttype, sport, dport, payload_len) lines to OUT
import socket,struct,sys,time
S=float(sys.argv[1]); out=open(sys.argv[2],'w')
s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW,socket.htons(3)); s.bind(('tap0',0))
s.setsockopt(socket.SOL_SOCKET,35,1); s.setsockopt(socket.SOL_SOCKET,socket.SO_RCVBUF,1<<24); s.settimeout(0.5)
recs=[]; end=time.time()+S
while time.time()<end:
    try: d,anc,fl,addr=s.recvmsg(80,256)
    except socket.timeout: continue
    for lv,ty,da in anc:
        if ty==35: sec,ns=struct.unpack('qq',da[:16]); ts=sec*1e6+ns/1e3
    recs.append((ts,addr[2],d))
import struct as _s
st=s.getsockopt(263,6,8); print('packets,drops',_s.unpack('II',st),'recs',len(recs), file=__import__('sys').stderr)
for ts,pt,d in recs:
    sp=dp=pl=-1
    if len(d)>=54 and d[12:14]==b'\x08\x00' and d[23]==6:
        ihl=(d[14]&15)*4; tot=struct.unpack('!H',d[16:18])[0]; t=14+ihl
        sp,dp=struct.unpack('!HH',d[t:t+4]); doff=(d[t+12]>>4)*4; pl=tot-ihl-doff
    out.write("%.1f %d %d %d %d\n"%(ts,pt,sp,dp,pl))
