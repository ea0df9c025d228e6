#!/bin/bash
# One 16-connection get run with the per-request timeline events on, then the decomposition.
# Run from this folder as root (start.sh builds netns usrig; UB= the binary, GUEST= the guest).
cd "$(dirname "$0")"
LOG=info,primary::engine=debug,primary::output=debug,primary::link=debug,vmm::devices::virtio::net=debug,vmm::vcpu=trace \
  bash start.sh "$@" >/dev/null 2>&1; sleep 1
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-1500} --test=get 2>&1 | grep "Time to get"
bash ../s11-2026-12-07/stop.sh
python3 request-timeline.py /tmp/rig/run/primary.log
