#!/bin/bash
# vcpu0 cpu per second, idle guest: unprotected then protected at epoch $1 ms
cd /tmp/rig; B=/work/main/target/release/understudy
bash start.sh none >/dev/null 2>&1; sleep 1
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1)
V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname)/schedstat
m() { a=$(awk '{print $1}' $V); sleep 2; b=$(awk '{print $1}' $V); echo "$1 vcpu0 $(( (b-a)/2000 )) us/s"; }
m unprot
$B protect --api run/p.sock --backup 127.0.0.1:7400 --certs run/certs --name primary --backup-name backup --epoch-min-ms $1 --epoch-max-ms $1 >/dev/null; sleep 1
m prot@$1ms
$B status --api run/p.sock | grep epochs/s
bash stop.sh
