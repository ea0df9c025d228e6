#!/usr/bin/env python3
"""Checker client for `testbed faults` (extends demo_client.py).

usage: faults_client.py HOST CTL_DIR MAX_SECS

Writes unique keys over ONE TCP connection (memcached text protocol) and increments a counter,
remembering every acknowledged write. It creates CTL_DIR/ready after its first reply (the
harness times its faults from then). The harness writes CTL_DIR/fault (wall-clock seconds of the
injected fault) and later creates CTL_DIR/stop; `testbed migrate-bench` writes CTL_DIR/window
("START END", wall-clock seconds of a migration) before the stop; then the client also writes
CTL_DIR/completions, the wall-clock second of every reply from 2 s before START to 2 s after
END, one a line (the benchmark's throughput over time). A failed connection is counted and replaced (a
reconnect is tolerated, not hidden). At the end every acknowledged write must be readable with
its value (multi-get, in batches) and the counter must never have gone back. Prints one final
JSON line:
  acknowledged_writes, lost, contradictions, errors, reconnects, first_reply_after_fault_ms,
  max_gap_ms (longest wait for one reply), ops, thin_linear_timeouts (the socket option took),
  and with a window: window_max_gap_ms (longest wait for a reply that overlaps it) and
  outside_max_gap_ms (longest wait that does not).
With FAULTS_CLIENT_UNTUNED=1 in the environment the socket gets no thin-stream option (an
ordinary client; `testbed faults` then also leaves rto_min off its route): thin_linear_timeouts
is null.
"""
import json, os, socket, sys, time

host, ctl, max_secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
FAULT, STOP, WINDOW = os.path.join(ctl, "fault"), os.path.join(ctl, "stop"), os.path.join(ctl, "window")
TIMEOUT = 8.0
TCP_THIN_LINEAR_TIMEOUTS = getattr(socket, "TCP_THIN_LINEAR_TIMEOUTS", 16)  # linux/tcp.h
thin_lto = [None]  # whether the kernel took the option (reported)
UNTUNED = os.environ.get("FAULTS_CLIENT_UNTUNED") == "1"


def connect(deadline):
    while True:
        try:
            s = socket.create_connection((host, 11211), timeout=TIMEOUT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A thin stream (one request in flight): linear retransmission timeouts instead of
            # exponential backoff, so after a failover the next retransmit is at most one RTO
            # (rto_min 10 ms, set on the namespace's route by the harness) away instead of
            # 10, 20, 40, 80 ... ms (Linux: linear for the first 6 retransmissions, TCP_THIN_LINEAR_RETRIES,
            # exponential after that).
            if not UNTUNED:
                try:
                    s.setsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1)
                    thin_lto[0] = True
                except OSError:
                    thin_lto[0] = False
            return s, s.makefile("rb")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def cmd(s, f, line, payload=None):
    data = line.encode() + b"\r\n"
    if payload is not None:
        data += payload + b"\r\n"
    s.sendall(data)
    r = f.readline()
    if not r:
        raise OSError("connection closed")
    return r.strip()


def multiget(s, f, keys):
    s.sendall(b"get " + b" ".join(k.encode() for k in keys) + b"\r\n")
    out = {}
    while True:
        line = f.readline()
        if not line:
            raise OSError("connection closed")
        line = line.strip()
        if line == b"END":
            return out
        parts = line.split()
        if len(parts) < 4 or parts[0] != b"VALUE":
            raise ValueError("bad get reply %r" % line)
        out[parts[1].decode()] = f.read(int(parts[3]) + 2)[:-2]


t0 = time.monotonic()
s, f = connect(t0 + 15)
acked, counter_last = {}, 0
contradictions = errors = reconnects = ops = 0
fault_t = first_after_fault = None
max_gap = 0.0
waits = []  # (wall-clock start, seconds) of every wait for a reply
notes = []


def waited(t):
    global max_gap
    d = time.monotonic() - t
    max_gap = max(max_gap, d)
    waits.append((time.time() - d, d))

if cmd(s, f, "set counter 0 0 1", b"0") != b"STORED":
    errors += 1
open(os.path.join(ctl, "ready"), "w").close()
i = 0
while time.monotonic() - t0 < max_secs and not os.path.exists(STOP):
    key, val = "k%d" % i, ("v%d-" % i).encode() * (1 + i % 20)
    i += 1
    try:
        t = time.monotonic()
        r = cmd(s, f, "set %s 0 0 %d" % (key, len(val)), val)
        waited(t)
        if r == b"STORED":
            acked[key] = val
        else:
            errors += 1
            notes.append("set %s -> %r" % (key, r))
        t = time.monotonic()
        c = cmd(s, f, "incr counter 1")
        waited(t)
        ops += 2
        try:
            cv = int(c)
            if cv <= counter_last:
                contradictions += 1
                notes.append("counter went from %d to %d" % (counter_last, cv))
            counter_last = cv
        except ValueError:
            errors += 1
            notes.append("incr -> %r" % c)
    except (OSError, ValueError) as e:
        errors += 1
        reconnects += 1
        notes.append("connection failed at op %d: %s; reconnecting" % (ops, e))
        try:
            s.close()
        except OSError:
            pass
        try:
            s, f = connect(time.monotonic() + 15)
        except OSError as e2:
            notes.append("reconnect failed: %s" % e2)
            break
        continue
    if fault_t is None and os.path.exists(FAULT):
        try:
            fault_t = float(open(FAULT).read().strip())
        except (OSError, ValueError):
            pass
    if fault_t is not None and first_after_fault is None:
        now = time.time()
        if now > fault_t:
            first_after_fault = (now - fault_t) * 1e3

lost = 0
keys = list(acked)
try:
    for j in range(0, len(keys), 40):
        got = multiget(s, f, keys[j:j + 40])
        for k in keys[j:j + 40]:
            if got.get(k) != acked[k]:
                lost += 1
                if lost <= 5:
                    notes.append("acknowledged %s=%r reads back %r" % (k, acked[k][:20], got.get(k, b"")[:20]))
    final = multiget(s, f, ["counter"]).get("counter")
    if final is None or int(final) < counter_last:
        contradictions += 1
        notes.append("counter reads back %r after %d was acknowledged" % (final, counter_last))
except (OSError, ValueError) as e:
    errors += 1
    lost = len(keys)
    notes.append("verification failed: %s" % e)
if fault_t is not None:
    # The first waits that ended after the fault: which request waited, and how long (a
    # retransmission by the client's own timer shows as a wait of ~200 ms without rto_min).
    after = [(b - fault_t, d) for (b, d) in waits if b + d > fault_t][:3]
    notes.extend("wait from fault%+.1f ms: %.1f ms" % (b * 1e3, d * 1e3) for (b, d) in after)
window_gap = outside_gap = None
if os.path.exists(WINDOW):
    try:
        ws, we = (float(x) for x in open(WINDOW).read().split())
        inside = [d for (b, d) in waits if b <= we and b + d >= ws]
        outside = [d for (b, d) in waits if not (b <= we and b + d >= ws)]
        window_gap = max(inside) * 1e3 if inside else None
        outside_gap = max(outside) * 1e3 if outside else None
        with open(os.path.join(ctl, "completions"), "w") as out:
            out.writelines("%.6f\n" % (b + d) for (b, d) in waits if ws - 2 <= b + d <= we + 2)
    except (OSError, ValueError) as e:
        notes.append("bad window file: %s" % e)
print(json.dumps({"acknowledged_writes": len(acked), "lost": lost, "contradictions": contradictions,
                  "errors": errors, "reconnects": reconnects, "ops": ops, "counter": counter_last,
                  "first_reply_after_fault_ms": first_after_fault, "max_gap_ms": max_gap * 1e3,
                  "thin_linear_timeouts": thin_lto[0], "window_max_gap_ms": window_gap,
                  "outside_max_gap_ms": outside_gap, "notes": notes[:20]}), flush=True)
