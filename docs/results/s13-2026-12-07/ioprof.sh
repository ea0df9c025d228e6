#!/bin/bash
# perf profile of a process's threads by comm during 16-conn gets: $1 = p|b
bash start.sh >/dev/null 2>&1; sleep 1; P=$(pgrep -f -- "--api /tmp/rig/run/$1.sock" | head -1)
(ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=${N:-1500} --test=get > /tmp/rig/slap.txt 2>&1 &)
sleep 1; perf record -e cpu-clock -F 10000 -g -p $P -o /tmp/rig/io-$1.data -- sleep 2 2>&1 | tail -1
/work/main/target/release/understudy status --api /tmp/rig/run/p.sock > /tmp/rig/status.txt 2>&1
while pgrep memcslap >/dev/null; do sleep 0.2; done; grep 'Time to get' /tmp/rig/slap.txt
bash stop.sh
