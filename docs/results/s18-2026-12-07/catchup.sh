#!/bin/bash
# A 2 GiB guest with 1.5 GiB of working set written, protected; then the backup's process is
# stopped until the primary runs degraded, and continued: how long until protected again, and
# what that sync sent. $1 = binary in /tmp/rig/bin. Rig: session 11's /tmp/rig (start.sh, stop.sh).
cd /tmp/rig
BIN=$1
B=/tmp/rig/bin/$BIN
state() { $B status --api /tmp/rig/run/p.sock --json 2>/dev/null | grep -o '"state": *"[a-z]*"' | head -1 | grep -o '[a-z]*"$' | tr -d '"'; }
until_state() { for i in $(seq 600); do [ "$(state)" = "$1" ] && return 0; sleep 0.1; done; return 1; }
sed 's/--memory 64M/--memory 2G/g' start.sh > /tmp/rig17/start-big.sh
CMDLINE="workload=dirty wss=1536 rate=${RATE:-20000}" UB=$B bash /tmp/rig17/start-big.sh none >/dev/null 2>&1
sleep ${FILL:-21}
$B protect --api /tmp/rig/run/p.sock --backup 127.0.0.1:7400 --certs /tmp/rig/run/certs --name primary --backup-name backup >/dev/null 2>&1
t0=$(date +%s.%N); until_state protected; t1=$(date +%s.%N)
echo "$BIN: first sync, protected after $(echo "$t1 - $t0" | bc) s"
BPID=$(pgrep -f "^$B backup --listen 127.0.0.1:7400" | head -1)
kill -STOP $BPID
t0=$(date +%s.%N); until_state degraded; t1=$(date +%s.%N)
echo "$BIN: backup stopped, degraded after $(echo "$t1 - $t0" | bc) s"
kill -CONT $BPID
t0=$(date +%s.%N); until_state protected; t1=$(date +%s.%N)
sleep 1
$B status --api /tmp/rig/run/p.sock 2>/dev/null | grep "last sync"
echo "$BIN: backup continued, the state said protected after $(echo "$t1 - $t0" | bc) s"
# What the re-sync really took: the engine's own line when it took the first consistent checkpoint.
for i in $(seq 240); do [ "$(grep -c "sync complete" /tmp/rig/run/primary.log)" -ge 2 ] && break; sleep 0.5; done
echo "$BIN: the re-sync: $(grep "sync complete" /tmp/rig/run/primary.log | tail -1 | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'rounds=.*')"
bash stop.sh >/dev/null 2>&1
