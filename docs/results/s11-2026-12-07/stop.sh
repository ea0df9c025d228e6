#!/bin/bash
pkill -f -- "--api /tmp/rig/run/p.sock"; pkill -f -- "--api /tmp/rig/run/b.sock"; sleep 0.3; ip netns del usrig 2>/dev/null; true
