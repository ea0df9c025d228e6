#!/bin/bash
# debug breakdown A/B of env settings (latency client only)
cd /tmp/rig
for round in $(seq ${ROUNDS:-1}); do
for v in "$@"; do
  name=${v%%=*}; envs=${v#*=}
  env $envs LOG="info,backup::server=debug,primary::link=debug,primary::engine=debug" ./start.sh $PROT >/dev/null 2>&1; sleep 1; [ -n "$PIN" ] && ./pin.sh $PIN
  echo "$name $(ip netns exec usrig /usr/bin/python3 lat.py 10.98.0.2 150 20) :: $(./stop.sh; /usr/bin/python3 join.py | tail -8 | awk '{printf "%s %s ", $1, $3}')"
done; done
