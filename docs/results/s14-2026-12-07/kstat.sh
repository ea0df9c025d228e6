#!/bin/bash
# global KVM stats per get during 16-conn gets; $@ = protect args
K=/sys/kernel/debug/kvm
F="exits halt_exits halt_attempted_poll halt_successful_poll halt_poll_success_ns halt_poll_fail_ns halt_wait_ns halt_wakeup host_state_reload fpu_reload irq_exits mmio_exits io_exits irq_injections pf_fixed pf_guest pf_fast tlb_flush remote_tlb_flush insn_emulation signal_exits request_irq_exits mmu_unsync mmu_pte_write pf_emulate"
bash start.sh "$@" >/dev/null 2>&1; sleep 1
snap() { for f in $F; do [ -f $K/$f ] && echo "$f $(cat $K/$f)"; done; }
snap > /tmp/rig/k0
t=$(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get 2>&1 | grep 'Time to get' | awk '{print $(NF-1)}')
snap > /tmp/rig/k1
G=$((16*${N:-1500}))
echo "[$*] gets/s $(echo "$G/$t" | bc)"
join /tmp/rig/k0 /tmp/rig/k1 | awk -v G=$G '{printf "  %-22s per get %10.2f\n", $1, ($3-$2)/G}'
bash stop.sh
