#!/bin/bash
# The chain hop by hop at 16 connections: one get run with both processes' hop events on, then
# session 14's hops.py (../hops-2026-12-07/hops.py, which reads /tmp/rig-hops/run) on this rig's logs.
# Runs from /tmp/rig beside ../s15-2026-12-07/start.sh and ../s11-2026-12-07/stop.sh.
here=$(cd "$(dirname "$0")" && pwd)
cd /tmp/rig
LOG=info,primary::link=debug,primary::engine=debug,backup::server=debug,transport::session=trace,transport::connection::reader=trace bash start.sh "$@" >/dev/null 2>&1; sleep 1
ip netns exec usrig memcslap --servers=10.98.0.2:11211 --concurrency=${C:-16} --execute-number=${N:-1000} --test=get 2>&1 | grep "Time to get"
bash stop.sh
sed 's#/tmp/rig-hops/run#/tmp/rig/run#' "$here/../hops-2026-12-07/hops.py" | python3 -
