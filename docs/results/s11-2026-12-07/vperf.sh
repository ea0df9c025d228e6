#!/bin/bash
PP=$(pgrep -f -- "--api /tmp/rig/run/p.sock" | head -1)
V=$(grep -l "^vcpu0$" /proc/$PP/task/*/comm | head -1 | xargs dirname | xargs basename)
perf record -t $V -o /tmp/rig/$1.data -- ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-500} --test=get 2>&1 | grep 'Time to get'
perf report -i /tmp/rig/$1.data --no-children --sort sym 2>/dev/null | grep -v "^#" | head -40
