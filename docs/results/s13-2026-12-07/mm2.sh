#!/bin/bash
bash start.sh >/dev/null 2>&1; sleep 1; PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
e0=$(/work/main/target/release/understudy status --api run/p.sock --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["protection"]["epochs"])')
(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get > /tmp/rig/slap.txt 2>&1 &)
sleep 1; s0=$(awk '{print $1}' /proc/$PP/task/$V/schedstat); e0=$(/work/main/target/release/understudy status --api run/p.sock --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["protection"]["epochs"])')
perf stat -t $V -e kvmmmu:kvm_mmu_set_spte,kvm:kvm_vcpu_wakeup,kvm:kvm_userspace_exit,kvm:kvm_mmio -o /tmp/rig/mstat.txt -- sleep 2
s1=$(awk '{print $1}' /proc/$PP/task/$V/schedstat); e1=$(/work/main/target/release/understudy status --api run/p.sock --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["protection"]["epochs"])')
while pgrep memcslap >/dev/null; do sleep 0.2; done; grep 'Time to get' /tmp/rig/slap.txt
echo "epochs $((e1-e0)) vcpu us/epoch $(( (s1-s0)/1000/(e1-e0) ))"
grep -E "kvm" /tmp/rig/mstat.txt | awk -v E=$((e1-e0)) '{printf "%s %.1f/epoch\n",$2,$1/E}'
bash stop.sh
