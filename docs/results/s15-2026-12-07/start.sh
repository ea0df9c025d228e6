#!/bin/bash
# manual protection rig: netns usrig, tap0 10.98.0.1/24, kv guest at 10.98.0.2
# usage: start.sh [protect args...]
set -e
B=${UB:-/work/main/target/release/understudy}
G=${GUEST:-$(ls /work/main/testbed/guest/target/x86_64-unknown-linux-gnu/release/understudy-guest)}
D=/tmp/rig/run; rm -rf $D; mkdir -p $D
ip netns del usrig 2>/dev/null || true
ip netns add usrig
ip -n usrig link set lo up
ip -n usrig tuntap add dev tap0 mode tap
ip -n usrig addr add 10.98.0.1/24 dev tap0
ip -n usrig link set tap0 up
$B certs --out $D/certs --host primary --host backup >/dev/null 2>&1 || $B certs --help | head -5
export UNDERSTUDY_LOG=${LOG:-info}
ip netns exec usrig $B backup --listen 127.0.0.1:7400 --certs $D/certs --name backup --primary-name primary --memory 64M --api $D/b.sock --serial $D/bser.log $BACKUP_ARGS 2>$D/backup.log >/dev/null </dev/null &
sleep 0.5
ip netns exec usrig $B run --kernel $G --cmdline "${CMDLINE:-workload=kv ip=10.98.0.2/24}" --memory 64M --serial $D/pser.log --api $D/p.sock --tap tap0 2>$D/primary.log >/dev/null </dev/null &
for i in $(seq 100); do grep -q '^ready' $D/pser.log 2>/dev/null && break; sleep 0.1; done
echo ready
if [ "$1" != "none" ]; then
$B protect --api $D/p.sock --backup 127.0.0.1:7400 --certs $D/certs --name primary --backup-name backup "$@"
fi
