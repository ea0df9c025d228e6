#!/bin/bash
# pause A/B of binaries: each arg name=path; dirty wss=16 rate=20000 @50ms; 10 s each
cd /tmp/rig
for round in $(seq ${ROUNDS:-3}); do
for v in "$@"; do
  name=${v%%=*}; bin=${v#*=}
  UB=$bin CMDLINE="workload=dirty wss=16 rate=20000" ./start.sh none >/dev/null 2>&1; sleep 0.5
  $bin protect --api run/p.sock --backup 127.0.0.1:7400 --certs run/certs --name primary --backup-name backup --epoch-ms 50 $PROT >/dev/null 2>&1; sleep ${SECS:-10}
  echo "$name $($bin status --api run/p.sock | grep -o 'pause [^,]*, [0-9]* dirty') load $(cut -d' ' -f1 /proc/loadavg)"
  ./stop.sh
done; done
