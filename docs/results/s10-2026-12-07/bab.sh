#!/bin/bash
# A/B binaries: args name=path; per round: each protected (lat + 2 slaps); plus unprot with the last binary
cd /tmp/rig
slap() { ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=16 --execute-number=500 --test=get 2>&1 | grep 'Time to get' | awk '{printf "%.0f ", 8000/$(NF-1)}'; }
for round in $(seq ${ROUNDS:-3}); do
for v in "$@"; do
  name=${v%%=*}; bin=${v#*=}
  UB=$bin ./start.sh none > /dev/null 2>&1; sleep 0.5
  $bin protect --api run/p.sock --backup 127.0.0.1:7400 --certs run/certs --name primary --backup-name backup $PROT >/dev/null 2>&1; sleep 0.5
  p=$(ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 150 20); pg="$(slap)$(slap)"
  echo "$name | $p | ops/s $pg | $($bin status --api run/p.sock | grep -o '[0-9,]* epochs/s\|pause [^,]*\|ack [^,]*' | tr '\n' ' ') | load $(cut -d' ' -f1 /proc/loadavg)"
  ./stop.sh
done
UB=$bin ./start.sh none > /dev/null 2>&1; sleep 0.5
echo "unprot | $(ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 150 20) | ops/s $(slap)$(slap)"; ./stop.sh
done
