#!/bin/bash
# kvm event counts on vcpu0 over a memcslap get run (rig must be up)
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1)
V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
EV=kvm:kvm_userspace_exit,kvm:kvm_vcpu_wakeup,kvm:kvm_emulate_insn,kvm:kvm_exit,kvm:kvm_mmio,kvm:kvm_pio,kvm:kvm_inj_virq,kvm:kvm_msr,kvm:kvm_apic_accept_irq
perf stat -t $V -e $EV -o /tmp/rig/kvmev.txt -- ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-500} --test=get 2>&1 | grep 'Time to get'
grep kvm /tmp/rig/kvmev.txt
