#!/bin/bash
# A/B two binaries: old (/tmp/rig-hops/understudy.old) and new (worktree), alternating
cd /tmp/rig-hops
NEW=/work/wt-hops/target/release/understudy; OLD=/tmp/rig-hops/understudy.old
for round in $(seq ${ROUNDS:-4}); do
for v in ${VARIANTS:-old new}; do
  if [ $v = old ]; then B=$OLD; else B=$NEW; fi
  if [ $v = unprot ]; then B=$NEW; fi
  B=$B ./start.sh none > /dev/null 2>&1; sleep 0.5
  [ $v != unprot ] && $B protect --api run/p.sock --backup 127.0.0.1:7410 --certs run/certs --name primary --backup-name backup $ARGS >/dev/null 2>&1; sleep 1
  p=$(ip netns exec ushops /usr/bin/python3 lat.py 10.97.0.2 150 20)
  pg=$(ip netns exec ushops memcslap --servers=10.97.0.2:11211 --concurrency=16 --execute-number=500 --test=get 2>&1 | grep 'Time to get' | awk '{printf "%.0f", 8000/$(NF-1)}')
  echo "$v | $p ops/s $pg | $([ $v != unprot ] && $B status --api run/p.sock | grep -o '[0-9,]* epochs/s\|pause [^,]*' | tr '\n' ' ') | load $(cut -d' ' -f1 /proc/loadavg)"
  ./stop.sh
done; done
