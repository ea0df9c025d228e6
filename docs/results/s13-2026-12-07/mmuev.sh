#!/bin/bash
# mmu events on vcpu0 over 2 s of 16-conn gets; $1 = start args ("none" = unprotected)
bash start.sh $1 >/dev/null 2>&1; sleep 1; PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get > /tmp/rig/slap.txt 2>&1 &)
sleep 1; perf stat -t $V -e kvm:kvm_page_fault,kvmmmu:fast_page_fault,kvmmmu:kvm_mmu_get_page,kvmmmu:kvm_mmu_prepare_zap_page,kvmmmu:kvm_mmu_sync_page,kvmmmu:kvm_mmu_unsync_page,kvmmmu:kvm_mmu_set_spte,kvmmmu:kvm_mmu_pagetable_walk,kvm:kvm_exit,kvm:kvm_entry,kvmmmu:kvm_mmu_zap_all_fast -o /tmp/rig/mstat.txt -- sleep 2
while pgrep memcslap >/dev/null; do sleep 0.2; done; grep 'Time to get' /tmp/rig/slap.txt
grep -E "kvm" /tmp/rig/mstat.txt
bash stop.sh
