#!/bin/bash
# perf of vcpu0 during 16-conn gets; $@ = protect args (none = unprotected)
bash start.sh "$@" >/dev/null 2>&1; sleep 1
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1)
V=$(grep -l vcpu0 /proc/$PP/task/*/comm | head -1 | cut -d/ -f5)
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-3000} --test=get > /tmp/rig/slap.txt 2>&1 &
SL=$!; sleep 1.5
perf record -e cpu-clock -F 20000 -g -t $V -o /tmp/rig/v-${TAG:-x}.data -- sleep 2 2>&1 | tail -1
perf stat -t $V -e 'kvm:kvm_userspace_exit,kvm:kvm_vcpu_wakeup,kvm:kvm_emulate_insn,kvm:kvm_exit,kvm:kvm_entry,kvm:kvm_page_fault,kvm:kvm_inj_virq' -- sleep 2 2>&1 | grep -E "kvm|elapsed"
/work/main/target/release/understudy status --api /tmp/rig/run/p.sock 2>/dev/null | head -30 > /tmp/rig/status-${TAG:-x}.txt
wait $SL; grep 'Time to get' /tmp/rig/slap.txt
bash stop.sh
