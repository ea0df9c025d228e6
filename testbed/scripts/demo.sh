#!/usr/bin/env bash
# make demo: boot the kv guest, protect it, drive load from a client, kill -9 the primary,
# watch the backup promote and the client carry on over the same TCP connection, print the
# failover time and the checker's verdict, clean up. Everything runs in a network namespace
# this script creates and deletes; no traffic leaves it.
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${UNDERSTUDY_BIN:-target/release/understudy}
GUEST=${UNDERSTUDY_GUEST:-target/guest/understudy-guest}
NS=us-demo-$$
D=$(mktemp -d /tmp/understudy-demo.XXXXXX)
PY=/usr/bin/python3
PIDS=()

if [ -t 1 ]; then BOLD=$'\033[1m'; PLAIN=$'\033[0m'; else BOLD=; PLAIN=; fi
say() { printf '%s[demo %5.1fs]%s %s\n' "$BOLD" "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{print a-b}')" "$PLAIN" "$*"; }
cleanup() {
    local rc=$?
    # Quietly: no job-control "Killed" lines for the processes we stop ourselves.
    { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" && wait "$p"; done; } 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    if [ "$rc" -ne 0 ]; then
        echo "demo: FAILED (exit $rc); the logs are kept in $D:" >&2
        for f in primary.log backup.log witness.log client.log; do
            [ -s "$D/$f" ] || continue
            echo "--- $f (last 12 lines)" >&2
            sed 's/\x1b\[[0-9;]*m//g' "$D/$f" | tail -n 12 | cut -c1-220 >&2
        done
    else
        rm -rf "$D"
    fi
}
trap cleanup EXIT
T0=$(date +%s.%N)

[ -e /dev/kvm ] || { echo "demo: /dev/kvm is missing: this demo needs KVM" >&2; exit 1; }
[ -x "$B" ] || { echo "demo: $B missing: run make build" >&2; exit 1; }
[ -f "$GUEST" ] || { echo "demo: $GUEST missing: run make guest" >&2; exit 1; }

say "creating network namespace $NS with the guest's LAN (bridge br0 at 10.99.0.1/24: the primary's tap0, the backup's tap1)"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge forward_delay 0
for t in tap0 tap1; do
    ip -n "$NS" tuntap add dev $t mode tap
    # The LAN hands the guest's frames to both hosts (the ports do not learn its address): the
    # backup keeps them (--lan-copy) and replays the ones the dead primary never received.
    ip -n "$NS" link set $t master br0 up
    ip -n "$NS" link set dev $t type bridge_slave learning off
done
ip -n "$NS" addr add 10.99.0.1/24 dev br0
ip -n "$NS" link set br0 up
# The client is an ordinary Linux TCP client (default 200 ms minimum RTO, no socket options):
# the request it sent to the dead primary is replayed to the promoted guest by the backup
# (input replay), so it does not wait for its retransmission timer. DEMO_TUNED=1 gives the
# tuned client of earlier demos (rto_min 10ms on its route, thin-stream linear timeouts).
if [ "${DEMO_TUNED:-0}" = 1 ]; then
    ip -n "$NS" route change 10.99.0.0/24 dev br0 proto kernel scope link src 10.99.0.1 rto_min 10ms
    CLIENT_KIND="tuned client: rto_min 10ms, thin-stream timeouts"
else
    CLIENT_KIND="ordinary client: default RTO, no socket options"
fi
export DEMO_TUNED=${DEMO_TUNED:-0}
in_ns() { exec ip netns exec "$NS" "$@"; }

$B certs --out "$D/certs" --host primary --host backup --witness witness >/dev/null
say "starting the witness (third voter of the arbitration group)"
in_ns "$B" witness --data "$D/raft3" --listen 127.0.0.1:7503 --certs "$D/certs" \
    --peer 1=primary@127.0.0.1:7501 --peer 2=backup@127.0.0.1:7502 \
    2> "$D/witness.log" & PIDS+=($!); disown $!
say "starting the backup (replica of a 64 MiB VM; promotes itself only when the group grants it)"
in_ns "$B" backup --listen 127.0.0.1:7400 --certs "$D/certs" --memory 64M --api "$D/backup.sock" \
    --tap tap1 --lan-copy --serial "$D/backup-serial.log" --detect-ms 100 --heartbeat-ms 10 \
    --arbiter-id 2 --arbiter-listen 127.0.0.1:7502 --arbiter-peer 1=primary@127.0.0.1:7501 --arbiter-peer 3=witness@127.0.0.1:7503 \
    --arbiter-data "$D/raft2" 2> "$D/backup.log" & PIDS+=($!); disown $!
say "booting the kv guest on the primary (it asks the group for activity)"
in_ns "$B" run --kernel "$GUEST" --cmdline "workload=kv ip=10.99.0.2/24" --memory 64M --tap tap0 \
    --serial "$D/primary-serial.log" --api "$D/primary.sock" \
    --arbiter-id 1 --arbiter-listen 127.0.0.1:7501 --arbiter-peer 2=backup@127.0.0.1:7502 --arbiter-peer 3=witness@127.0.0.1:7503 \
    --arbiter-certs "$D/certs" --arbiter-name primary \
    --arbiter-data "$D/raft1" 2> "$D/primary.log" & PRIMARY=$!; PIDS+=($PRIMARY); disown $PRIMARY
for _ in $(seq 200); do [ -S "$D/primary.sock" ] && grep -q '^ready' "$D/primary-serial.log" 2>/dev/null && break; sleep 0.05; done
grep -q '^ready' "$D/primary-serial.log" || { echo "demo: guest did not boot"; cat "$D/primary.log"; exit 1; }
say "guest ready; the client's latency unprotected (set+get, 1 s)"
in_ns $PY testbed/scripts/demo_client.py 10.99.0.2 1 - 2>&1 | $PY -c 'import json,sys; v=json.loads(sys.stdin.read()); print("         unprotected: %d round trips, p50 %.2f ms, p99 %.2f ms" % (v["ops"], v["p50_ms"], v["p99_ms"]))' || true
say "protecting it"
# --wait follows the sync (its progress on stderr) until the VM is protected.
if ! timeout 60 $B protect --api "$D/primary.sock" --backup 127.0.0.1:7400 --certs "$D/certs" --backup-node 2 \
    --detect-ms 100 --heartbeat-ms 10 --wait >/dev/null 2>"$D/protect.err"; then
    cat "$D/protect.err" >&2
    echo "demo: protection did not reach protected within 60 s" >&2; exit 1
fi
sed 's/^/         /' "$D/protect.err"
$B status --api "$D/primary.sock" --json | $PY -c 'import json,sys; p=json.load(sys.stdin)["protection"]; print("         protection: %s (backup %s), epoch %d acked" % (p["state"], p["backup"], p["last_acked_epoch"]))'
say "protected; starting the client (sets + incr over one TCP connection, checks every write)"
in_ns $PY testbed/scripts/demo_client.py 10.99.0.2 9 "$D/kill_time" > "$D/client.log" 2>&1 & CLIENT=$!; PIDS+=($CLIENT)
sleep 3
$B status --api "$D/primary.sock" --json | $PY -c 'import json,sys; p=json.load(sys.stdin)["protection"]; print("         primary: %s, %.0f epochs/s, pause p50 %.0f us p99 %.0f us, ack p50 %.1f ms, epoch %d acked" % (p["state"], p["epoch_rate_per_s"], p["pause_us_p50"], p["pause_us_p99"], p["ack_latency_us_p50"]/1e3, p["last_acked_epoch"]))'
say "kill -9 the primary"
date +%s.%N > "$D/kill_time"; kill -9 $PRIMARY
for _ in $(seq 300); do grep -q PROMOTED "$D/backup.log" && break; sleep 0.01; done
sed 's/\x1b\[[0-9;]*m//g' "$D/backup.log" | grep -E "process is gone|primary suspect|primary lost|arbitration: granted|vm restored|inbound log:|lan copies: [fn]|PROMOTED" | sed 's/^[^ ]* *[A-Z]* [^ ]* /         /' | cut -c1-150 || true
say "the backup runs the guest now; the client carries on"
wait $CLIENT && RC=0 || RC=$?
tail -n 4 "$D/client.log" | $PY -c '
import json, sys
for line in sys.stdin:
    try:
        v = json.loads(line)
    except ValueError:
        print("         client: " + line.rstrip())
        continue
    if "t" in v:
        print("         client: %4.1f s, %d acknowledged writes, counter %d, slowest reply %.1f ms" % (v["t"], v["writes"], v["counter"], v["slowest_ms"]))
    elif "error" in v:
        print("         client error: %s" % v["error"])
'
VERDICT=$(tail -n 1 "$D/client.log")
$PY - "$VERDICT" "$CLIENT_KIND" <<'PY'
import json, sys
v = json.loads(sys.argv[1])
lb = v.get("latency_before_kill_ms") or {}
if lb.get("p50") is not None:
    print("         client latency before the kill (protected, set+incr): p50 %.2f ms, p99 %.2f ms" % (lb["p50"], lb["p99"]))
print("         failover time (kill -> first client reply, %s): %s ms" % (sys.argv[2], round(v["first_reply_after_kill_ms"], 1) if v["first_reply_after_kill_ms"] else "n/a"))
print("         checker: %s (%d acknowledged writes, %d lost, %d contradictions)" % (v["verdict"], v["acknowledged_writes"], v["lost"], v["contradictions"]))
PY
say "cleaning up"
exit $RC
