#!/bin/bash
# $1 = none | protect ; C= N=
cd /tmp/rig
LOG=info,vmm::devices::virtio::net=debug UB=/tmp/wt-probe-target/release/understudy bash start.sh $1 >/dev/null 2>&1; sleep 1
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-1500} --test=get 2>&1 | grep "Time to get"
bash stop.sh
python3 /tmp/rig17/g.py /tmp/rig/run/primary.log
