#!/bin/bash
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1)
V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
EV=kvm:kvm_userspace_exit,kvm:kvm_vcpu_wakeup,kvm:kvm_emulate_insn,kvm:kvm_mmio,kvm:kvm_apic_accept_irq
perf stat -t $V -e $EV -o /tmp/rig/idleev.txt -- sleep 2
grep kvm /tmp/rig/idleev.txt
