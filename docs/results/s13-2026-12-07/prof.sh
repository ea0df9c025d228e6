#!/bin/bash
# perf profile of vcpu0 during 16-conn gets; $1 = start args
bash start.sh $1 >/dev/null 2>&1; sleep 1; PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get > /tmp/rig/slap.txt 2>&1 &)
sleep 0.5; perf stat -t $V -e kvm:kvm_userspace_exit,kvm:kvm_vcpu_wakeup,kvm:kvm_exit,kvm:kvm_mmio,kvm:kvm_pio,kvm:kvm_inj_virq,kvm:kvm_msr,kvm:kvm_set_irq,kvm:kvm_apic_accept_irq,kvm:kvm_emulate_insn -o /tmp/rig/pstat.txt -- sleep 2 
s0=$(awk '{print $1}' /proc/$PP/task/$V/schedstat); sleep 1; s1=$(awk '{print $1}' /proc/$PP/task/$V/schedstat)
while pgrep memcslap >/dev/null; do sleep 0.2; done; grep 'Time to get' /tmp/rig/slap.txt
echo "vcpu cpu ms/s $(( (s1-s0)/1000000 ))"
grep kvm /tmp/rig/pstat.txt
bash stop.sh
