#!/usr/bin/python3
"""Where a post-copy migration's time went, from the logs `testbed migrate-bench --keep` kept.

usage: timeline.py KEPT_DIR

For every run directory of ours that ran post-copy (W1-understudy-postcopy-1, ...), reads the
source's and the destination's tracing logs and prints, per workload and configuration, the
median over its runs (ms; each run's value in brackets) of:
  post-copy  the source's "the guest runs at the destination" to "every page is at the destination"
  hand-over  "every page is at the destination" to the source's "sender counters" line (logged
             once the hand-over is done; with reverse checkpoints: the destination confirmed it)
  dest stop  the destination's "the source gave its copy up" to its "reverse checkpoints stopped ("
             (its reverse-checkpoint engine and link stopping; reverse checkpoints only)
"""
import collections, datetime, os, statistics, sys

SOURCE = [("runs", "post-copy: the guest runs at the destination"),
          ("every", "post-copy: every page is at the destination"),
          ("counters", "migration: sender counters")]
DEST = [("gaveup", "the source gave its copy up"), ("stopped", "reverse checkpoints stopped (")]


def times(path, keys):
    out = {}
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return out
    for line in lines:
        if not line[:4].isdigit():
            continue
        for k, pat in keys:
            if k not in out and pat in line:
                ts = line.split()[0].replace("Z", "+00:00")
                out[k] = datetime.datetime.fromisoformat(ts).timestamp() * 1e3
    return out


def main(top):
    rows = collections.defaultdict(lambda: collections.defaultdict(list))
    for d in sorted(os.listdir(top)):
        if "-understudy-" not in d:
            continue
        s = times(os.path.join(top, d, "source.stderr"), SOURCE)
        t = times(os.path.join(top, d, "destination.stderr"), DEST)
        if "runs" not in s or "every" not in s:
            continue
        key = d.rsplit("-", 1)[0].replace("-understudy-", " ")
        rows[key]["post-copy"].append(s["every"] - s["runs"])
        if "counters" in s:
            rows[key]["hand-over"].append(s["counters"] - s["every"])
        if "gaveup" in t and "stopped" in t:
            rows[key]["dest stop"].append(t["stopped"] - t["gaveup"])
    cols = ["post-copy", "hand-over", "dest stop"]
    print("| workload configuration | " + " | ".join(c + " ms, median [runs]" for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for key in sorted(rows):
        cells = []
        for c in cols:
            v = rows[key][c]
            cells.append("%.0f [%s]" % (statistics.median(v), ", ".join("%.0f" % x for x in v)) if v else "-")
        print("| %s | %s |" % (key, " | ".join(cells)))


if __name__ == "__main__":
    main(sys.argv[1])
