#!/bin/bash
bash start.sh $1 >/dev/null 2>&1; sleep 1; PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1); V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get > /tmp/rig/slap.txt 2>&1 &)
sleep 0.5; perf record -e cpu-clock -F 10000 -g -t $V -o /tmp/rig/perf-$2.data -- sleep 2 2>&1 | tail -1
while pgrep memcslap >/dev/null; do sleep 0.2; done; grep 'Time to get' /tmp/rig/slap.txt
bash stop.sh
perf report -i /tmp/rig/perf-$2.data --no-children --sort sym --stdio -n -g none 2>/dev/null | grep -v "^#" | grep "%" | head -25
