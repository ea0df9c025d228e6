#!/bin/bash
cd /tmp/rig
LOG=info,primary::link=debug,primary::engine=debug,backup::server=debug,transport::session=trace,transport::connection::reader=trace bash start.sh "$@" >/dev/null 2>&1; sleep 1
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-1000} --test=get 2>&1 | grep "Time to get"
bash stop.sh
python3 hops.py
