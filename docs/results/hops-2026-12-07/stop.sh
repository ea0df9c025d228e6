#!/bin/bash
# kills only the processes this rig started (by pid; ip netns exec execs the binary)
D=/tmp/rig-hops/run
for f in $D/p.pid $D/b.pid; do [ -f $f ] && kill $(cat $f) 2>/dev/null; done
sleep 0.3
for f in $D/p.pid $D/b.pid; do [ -f $f ] && kill -9 $(cat $f) 2>/dev/null; rm -f $f; done
ip netns del ushops 2>/dev/null; true
