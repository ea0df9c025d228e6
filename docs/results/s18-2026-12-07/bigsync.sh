#!/bin/bash
# A 2 GiB guest with 1.5 GiB of working set dirtied, then protected: the initial sync's length and
# whether the backup ever suspected the primary. $1 = UNDERSTUDY_LINK_THREADS, $2 = binary in /tmp/rig/bin
cd /tmp/rig
export UNDERSTUDY_LINK_THREADS=$1
BIN=$2
sed 's/--memory 64M/--memory 2G/g' start.sh > /tmp/rig17/start-big.sh
CMDLINE="workload=dirty wss=1536 rate=${RATE:-20000}" UB=/tmp/rig/bin/$BIN bash /tmp/rig17/start-big.sh none >/dev/null 2>&1
sleep ${FILL:-21}
t0=$(date +%s.%N)
/tmp/rig/bin/$BIN protect --api /tmp/rig/run/p.sock --backup 127.0.0.1:7400 --certs /tmp/rig/run/certs --name primary --backup-name backup >/dev/null 2>&1
for i in $(seq 300); do /tmp/rig/bin/$BIN status --api /tmp/rig/run/p.sock --json 2>/dev/null | grep -q '"state": *"protected"' && break; sleep 0.2; done
t1=$(date +%s.%N)
sleep 2
/tmp/rig/bin/$BIN status --api /tmp/rig/run/p.sock 2>/dev/null | grep "last sync"
echo "$BIN, link threads $1: protected after $(echo "$t1 - $t0" | bc) s; suspects: $(grep -c -i 'suspect' /tmp/rig/run/backup.log); backup warnings: $(grep -c WARN /tmp/rig/run/backup.log); primary warnings: $(grep -c WARN /tmp/rig/run/primary.log)"
grep -i "suspect\|WARN" /tmp/rig/run/backup.log | head -3
bash stop.sh
