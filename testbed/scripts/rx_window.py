#!/usr/bin/env python3
"""The input-replay window per received frame, from `testbed faults --logs DIR` run with
FAULTS_UNDERSTUDY_LOG="info,vmm::devices::virtio::net=debug,primary::link=debug,backup::inbound=debug".

usage: rx_window.py LOGS_DIR [--json]

Joins, by the device's delivery number `seq`, the primary's `rx frame read early` / `rx frame
delivered` (the worker took the frame off the TAP), `inbound frame handed to the sender` (the
link's session has it) and the backup's `inbound frame logged`, per run directory, and prints
percentiles (microseconds) of: read->handed (worker -> link task -> session), handed->logged
(wire + backup), read->logged (the whole window a kill can land in), and of the pause a frame
waited for: `after_park_us` (old build: the frame was read in the first batch after a pause,
so it may have waited up to that long) or `early_wait_us` (new build: read during the pause,
delivered that long after).
"""
import json, os, re, sys

KV = re.compile(r"(\w+)=(\S+)")


def events(path, msg):
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path, errors="replace"):
        if msg not in line:
            continue
        f = dict(KV.findall(line.split(msg, 1)[1]))
        if "seq" in f:
            out.setdefault(int(f["seq"]), f)
    return out


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    root = sys.argv[1]
    read_h, hand_l, read_l, parked, early_wait = [], [], [], [], []
    side_cost, side_to_handed = [], []
    frames = early = after_park = side_copied = 0
    for run in sorted(os.listdir(root)):
        d = os.path.join(root, run)
        if not os.path.isdir(d):
            continue
        p = os.path.join(d, "primary.log")
        rd = events(p, "rx frame delivered")
        for seq, f in events(p, "rx frame read early").items():
            rd[seq] = f
        hd = events(p, "inbound frame handed to the sender")
        lg = events(os.path.join(d, "backup.log"), "inbound frame logged")
        sc = events(p, "inbound side copy sent")
        for seq, f in rd.items():
            if f.get("replayed") == "true":
                continue
            frames += 1
            t0 = int(f["wall_ns"])
            if "early_wait_us" in f:
                early += 1
            if f.get("after_park_us", "None") not in ("None", None):
                after_park += 1
                parked.append(int(f["after_park_us"]))
            if seq in hd:
                read_h.append((int(hd[seq]["wall_ns"]) - t0) / 1e3)
                if seq in lg:
                    hand_l.append((int(lg[seq]["wall_ns"]) - int(hd[seq]["wall_ns"])) / 1e3)
            if seq in lg:
                read_l.append((int(lg[seq]["wall_ns"]) - t0) / 1e3)
            if seq in sc:
                side_copied += 1
                side_cost.append(int(sc[seq]["cost_ns"]) / 1e3)
                if seq in hd:
                    side_to_handed.append((int(hd[seq]["wall_ns"]) - int(sc[seq]["wall_ns"])) / 1e3)
        for f in events(p, "rx frame early delivered").values():
            early_wait.append(int(f["early_wait_us"]))
    out = {"frames": frames, "read_early": early, "read_after_park": after_park, "side_copied": side_copied}
    for name, xs in [("read_to_handed_us", read_h), ("handed_to_logged_us", hand_l), ("read_to_logged_us", read_l),
                     ("after_park_us", parked), ("early_wait_us", early_wait),
                     ("side_copy_cost_us", side_cost), ("side_copy_to_handed_us", side_to_handed)]:
        out[name] = {"n": len(xs), "p50": pct(xs, 50), "p90": pct(xs, 90), "p99": pct(xs, 99), "max": max(xs) if xs else None,
                     "mean": (sum(xs) / len(xs)) if xs else None}
    if "--json" in sys.argv:
        print(json.dumps(out, indent=1))
    else:
        print("frames %d, read early %d, read right after a pause %d, side-copied %d" % (frames, early, after_park, side_copied))
        for k, v in out.items():
            if isinstance(v, dict):
                fmt = lambda x: "-" if x is None else "%.1f" % x
                print("%-22s n=%-6d p50 %6s  p90 %6s  p99 %6s  max %7s  mean %6s" % (
                    k, v["n"], fmt(v["p50"]), fmt(v["p90"]), fmt(v["p99"]), fmt(v["max"]), fmt(v["mean"])))


main()
