#!/bin/bash
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1)
V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
EV=kvm:kvm_page_fault,kvmmmu:fast_page_fault,kvmmmu:kvm_mmu_spte_requested,kvmmmu:kvm_mmu_set_spte,kvmmmu:kvm_mmu_get_page,kvmmmu:kvm_mmu_sync_page,kvmmmu:kvm_mmu_prepare_zap_page,kvm:kvm_emulate_insn,kvm:kvm_userspace_exit
perf stat -t $V -e $EV -o /tmp/rig/pfev.txt -- ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1000} --test=get 2>&1 | grep 'Time to get'
grep -E "kvm|elapsed" /tmp/rig/pfev.txt
