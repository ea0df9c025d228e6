#!/usr/bin/env python3
"""Demo client and consistency checker for the kv guest.

Writes keys (a bounded key space of KEYS, overwritten in turn) over one TCP connection (memcached text protocol), increments a counter,
and remembers every acknowledged write. It never reconnects on its own: after a failover the
same connection carries on, because the promoted guest resumes with its TCP state. At the end
every acknowledged write must be readable with its value and the counter must never have gone
back. Prints one JSON line per second and a final verdict line.
"""
import json, os, socket, sys, time

host, secs, kill_file = sys.argv[1], float(sys.argv[2]), sys.argv[3]
# DEMO_TUNED=1: a tuned client (thin-stream linear timeouts; the demo also sets rto_min 10ms on
# its route). By default the client is an ordinary Linux TCP client with no socket options.
TUNED = os.environ.get("DEMO_TUNED") == "1"
KEYS = 20000


def connect():
    s = socket.create_connection((host, 11211), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if TUNED:
        # A thin request/response stream: retransmit at a steady RTO instead of backing off
        # exponentially while the backup takes over (TCP_THIN_LINEAR_TIMEOUTS).
        s.setsockopt(socket.IPPROTO_TCP, 16, 1)
    return s, s.makefile("rb")


def pct(v, p):
    if not v:
        return None
    v = sorted(v)
    return round(v[min(len(v) - 1, int(p / 100.0 * len(v)))], 2)


def cmd(s, f, line, payload=None):
    data = line.encode() + b"\r\n"
    if payload is not None:
        data += payload + b"\r\n"
    s.sendall(data)
    return f.readline().strip()


def get(s, f, key):
    s.sendall(b"get " + key.encode() + b"\r\n")
    first = f.readline().strip()
    if first == b"END":
        return None
    n = int(first.split()[3])
    v = f.read(n + 2)[:-2]
    assert f.readline().strip() == b"END"
    return v


s, f = connect()
if kill_file == "-":
    # Latency only (no kill, no check): set+get pairs for `secs`, then p50/p99 in ms.
    lat = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < secs:
        t = time.monotonic()
        cmd(s, f, "set lat 0 0 2", b"ok")
        get(s, f, "lat")
        lat.append((time.monotonic() - t) * 1e3)
    print(json.dumps({"ops": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}), flush=True)
    sys.exit(0)
cmd(s, f, "set counter 0 0 1", b"0")
lat_before = []
acked = {}
n_acked = 0
counter_last = 0
contradictions = 0
errors = 0
i = 0
t0 = time.monotonic()
last_report = t0
kill_t = None
gap_start = None
failover_ms = None
slowest_ms = 0.0
while time.monotonic() - t0 < secs:
    # A bounded key space (overwrites of same-sized values): a fast client never fills the
    # 64 MiB guest's store, however long it runs.
    slot = i % KEYS
    key, val = "k%d" % slot, ("v%09d-" % i).encode() * (1 + slot % 20)
    t = time.monotonic()
    try:
        r = cmd(s, f, "set %s 0 0 %d" % (key, len(val)), val)
        c = cmd(s, f, "incr counter 1")
    except (OSError, ValueError) as e:
        errors += 1
        print(json.dumps({"error": str(e)}), flush=True)
        s, f = connect()
        continue
    dt = (time.monotonic() - t) * 1e3
    slowest_ms = max(slowest_ms, dt)
    if kill_t is None:
        lat_before.append(dt)
    if r == b"STORED":
        acked[key] = val
        n_acked += 1
    else:
        errors += 1
    try:
        cv = int(c)
        if cv <= counter_last:
            contradictions += 1
        counter_last = cv
    except ValueError:
        errors += 1
    if kill_t is None:
        try:
            kill_t = float(open(kill_file).read().strip())
        except (OSError, ValueError):
            pass
    done_wall = time.time()
    if kill_t is not None and failover_ms is None and done_wall > kill_t:
        # Kill -> first reply from the promoted guest: the first op that stalled across the
        # kill (its reply had to come from the promoted guest), or else the first op started
        # after the kill.
        started_wall = done_wall - dt / 1e3
        if dt > 20 or started_wall > kill_t:
            failover_ms = (done_wall - kill_t) * 1e3
    i += 1
    now = time.monotonic()
    if now - last_report >= 1.0:
        print(json.dumps({"t": round(now - t0, 1), "writes": n_acked, "counter": counter_last, "slowest_ms": round(slowest_ms, 1)}), flush=True)
        last_report = now
        slowest_ms = 0.0

lost = 0
for k, v in acked.items():
    if get(s, f, k) != v:
        lost += 1
verdict = "PASS" if lost == 0 and contradictions == 0 and errors == 0 else "FAIL"
print(json.dumps({"verdict": verdict, "acknowledged_writes": n_acked, "keys_checked": len(acked), "lost": lost,
                  "contradictions": contradictions, "errors": errors,
                  "first_reply_after_kill_ms": failover_ms, "tuned": TUNED,
                  "latency_before_kill_ms": {"p50": pct(lat_before, 50), "p99": pct(lat_before, 99)}}), flush=True)
sys.exit(0 if verdict == "PASS" else 1)
