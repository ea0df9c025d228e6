#!/bin/bash
# hops rig: netns ushops, tap0 10.97.0.1/24, kv guest at 10.97.0.2; B=binary
set -e
B=${B:-/work/wt-hops/target/release/understudy}
G=$(ls /work/main/testbed/guest/target/x86_64-unknown-linux-gnu/release/understudy-guest)
D=/tmp/rig-hops/run; rm -rf $D; mkdir -p $D
ip netns del ushops 2>/dev/null || true
ip netns add ushops
ip -n ushops link set lo up
ip -n ushops tuntap add dev tap0 mode tap
ip -n ushops addr add 10.97.0.1/24 dev tap0
ip -n ushops link set tap0 up
$B certs --out $D/certs --host primary --host backup >/dev/null 2>&1
export UNDERSTUDY_LOG=${LOG:-info}
ip netns exec ushops $B backup --listen 127.0.0.1:7410 --certs $D/certs --name backup --primary-name primary --memory 64M --api $D/b.sock --serial $D/bser.log 2>$D/backup.log >/dev/null </dev/null &
echo $! > $D/b.pid
sleep 0.5
ip netns exec ushops $B run --kernel $G --cmdline "${CMDLINE:-workload=kv ip=10.97.0.2/24}" --memory 64M --serial $D/pser.log --api $D/p.sock --tap tap0 2>$D/primary.log >/dev/null </dev/null &
echo $! > $D/p.pid
for i in $(seq 100); do grep -q '^ready' $D/pser.log 2>/dev/null && break; sleep 0.1; done
echo ready
if [ "$1" != "none" ]; then
$B protect --api $D/p.sock --backup 127.0.0.1:7410 --certs $D/certs --name primary --backup-name backup "$@"
fi
