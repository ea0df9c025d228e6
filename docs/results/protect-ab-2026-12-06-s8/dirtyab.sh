#!/bin/bash
# usage: dirtyab.sh BINARY EPOCH_MS -> prints unprotected and protected pages/s of dirty wss=1 (CPU-bound)
BIN=$1; E=$2
G=/work/main/testbed/guest/target/x86_64-unknown-linux-gnu/release/understudy-guest
D=/tmp/rig/ab; rm -rf $D; mkdir -p $D
ip netns del usab 2>/dev/null; ip netns add usab; ip -n usab link set lo up
$BIN certs --out $D/certs --host primary --host backup >/dev/null 2>&1
ip netns exec usab $BIN backup --listen 127.0.0.1:7400 --certs $D/certs --name backup --primary-name primary --memory 64M --api $D/b.sock --serial $D/bser.log 2>$D/backup.log >/dev/null </dev/null &
sleep 0.5
ip netns exec usab $BIN run --kernel $G --cmdline "workload=dirty wss=1 rate=10000000 report_ms=200" --memory 64M --serial $D/pser.log --api $D/p.sock 2>$D/primary.log >/dev/null </dev/null &
sleep 2
rate() { # pages/s over N seconds from gen lines
  local a=$(grep -o "pages=[0-9]*" $D/pser.log | tail -1 | cut -d= -f2); local t0=$(date +%s.%N); sleep $1
  local b=$(grep -o "pages=[0-9]*" $D/pser.log | tail -1 | cut -d= -f2); local t1=$(date +%s.%N)
  awk -v a=$a -v b=$b -v t0=$t0 -v t1=$t1 'BEGIN{printf "%.0f", (b-a)/(t1-t0)}'; }
echo "unprotected $(rate 4)"
$BIN protect --api $D/p.sock --backup 127.0.0.1:7400 --certs $D/certs --name primary --backup-name backup --epoch-ms $E >/dev/null
sleep 2
echo "protected@$E $(rate 4)"
pkill -f -- "--api $D/p.sock"; pkill -f -- "--api $D/b.sock"; sleep 0.5; ip netns del usab
