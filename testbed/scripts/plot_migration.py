#!/usr/bin/python3
"""Throughput over time through a migration, from `testbed migrate-bench --json` (issue 14).

usage: plot_migration.py BENCH_JSON OUT_DIR

Writes OUT_DIR/migration-<workload>.png for every workload whose runs carry a series (W3: the kv
checker client's replies per 10 ms bucket; W1/W2: the pages the `dirty` guest wrote per 10 ms
bucket, from its `dirty prog` lines, `report_ms=10`). One panel per configuration, stacked on
one time axis (ms since the migration started: QEMU's `migrate` command, our source starting
the migration), each the configuration's median run by total time among its completed runs
(the first run with a series when none completed); a workload without a series is left out
(said on stderr). The guest's pause -> resume at the destination is shaded; a dotted line
marks "complete" (every page at the destination) when it comes later than the resume
(post-copy), a dashed one QEMU's `migrate-start-postcopy`, a dash-dotted one the start of
the `understudy migrate` process (before its migration starts: its start-up shares the CPUs
with the guest and the client). Prints the files written.
Needs python3-matplotlib (Debian), rendered with the Agg backend (no display).
"""
import json, os, sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pick(runs):
    """The median run by total_ms among the completed runs with a series, else the first with one."""
    with_series = [r for r in runs if r.get("series")]
    # QEMU's total-time is sometimes left out as impossible: our clock's wall_ms then.
    done = sorted((r for r in with_series if r.get("outcome") == "completed"),
                  key=lambda r: r.get("total_ms") or r.get("wall_ms") or 0.0)
    if done:
        return done[(len(done) - 1) // 2], "median of %d" % len(done)
    return (with_series[0], "first run, not completed") if with_series else (None, None)


def markers(run):
    return {m["name"]: m["ms"] for m in run.get("markers") or []}


def plot(workload, by_config, out_dir, stamp=None):
    picked = [(c, *pick(rs)) for c, rs in by_config]
    picked = [p for p in picked if p[1] is not None]
    if not picked:
        return None
    fig, axes = plt.subplots(len(picked), 1, sharex=True, sharey=True, squeeze=False,
                             figsize=(10, 1.3 + 1.25 * len(picked)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = max(max(c * 1000.0 / r["series"]["bucket_ms"] for c in r["series"]["counts"] or [0]) for _, r, _ in picked)
    for i, (config, run, how) in enumerate(picked):
        ax = axes[i][0]
        s = run["series"]
        b = s["bucket_ms"]
        x = [s["from_ms"] + (k + 0.5) * b for k in range(len(s["counts"]))]
        y = [c * 1000.0 / b for c in s["counts"]]
        color = colors[i % len(colors)]
        ax.plot(x, y, color=color, linewidth=0.9, drawstyle="steps-mid")
        m = markers(run)
        if "pause" in m and "resume" in m:
            ax.axvspan(m["pause"], max(m["resume"], m["pause"] + 0.5), color=color, alpha=0.25, linewidth=0)
        if "complete" in m and m["complete"] - m.get("resume", m["complete"]) > 1.0:
            ax.axvline(m["complete"], color=color, linestyle=":", linewidth=1.2)
        if "command" in m:
            ax.axvline(m["command"], color="gray", linestyle="-.", linewidth=0.8)
        if "postcopy" in m:
            ax.axvline(m["postcopy"], color="gray", linestyle="--", linewidth=0.8)
        ax.axvline(0, color="black", linewidth=0.6)
        total = run.get("total_ms")
        down = run.get("downtime_ms")
        gap = run.get("outage_ms")
        label = "%s (run %s, %s): total %s ms, downtime %s ms" % (
            config, run["run"], how, "-" if total is None else "%.0f" % total,
            "-" if down is None else "%.1f" % down)
        if gap is not None:
            label += ", longest reply %.1f ms" % gap
        ax.set_title(label, fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, max(top, 1.0) * 1.05)
        ax.grid(True, linewidth=0.3, alpha=0.5)
    # The time axis spans the completed runs (a run cancelled at the time bound, e.g. QEMU's
    # default on W2 at 30 s, would squash every other panel; its panel shows its start).
    ends = [max(m for m in markers(r).values()) for _, r, how in picked
            if r.get("outcome") == "completed" and markers(r)]
    if ends:
        lo = min(r["series"]["from_ms"] for _, r, _ in picked)
        axes[-1][0].set_xlim(lo, max(ends) + 500.0)
    what = picked[0][1]["series"].get("what", "events")
    b = picked[0][1]["series"]["bucket_ms"]
    axes[-1][0].set_xlabel("ms since the migration started (shaded: paused -> running at the destination; "
                           "dotted: every page there; dash-dotted: understudy migrate started)", fontsize=8)
    fig.text(0.01, 0.5, "%s per second (%g ms buckets)" % (what, b), rotation="vertical", va="center", fontsize=8)
    fig.suptitle("%s: %s per second through each configuration's migration" % (workload, what), fontsize=10)
    fig.tight_layout(rect=(0.025, 0.02 if stamp else 0, 1, 1))
    path = os.path.join(out_dir, "migration-%s.png" % workload)
    if stamp:  # the run's date and commit, bottom right (bench_report.py)
        fig.text(0.99, 0.003, stamp, ha="right", va="bottom", fontsize=7, color="0.4")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(bench, out_dir, stamp=None):
    """Plots every workload of a parsed `--json` report into out_dir, each figure labelled with
    `stamp` when given; returns [(workload, path)]."""
    os.makedirs(out_dir, exist_ok=True)
    workloads, configs = {}, {}
    for r in bench.get("results", []):
        configs.setdefault(r["workload"], [])
        if r["config"] not in configs[r["workload"]]:
            configs[r["workload"]].append(r["config"])
        workloads.setdefault((r["workload"], r["config"]), []).append(r)
    written = []
    for w in sorted(configs):
        path = plot(w, [(c, workloads[(w, c)]) for c in configs[w]], out_dir, stamp)
        if path:
            written.append((w, path))
        else:
            print("%s: no run carries a series (nothing to plot)" % w, file=sys.stderr)
    return written


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2])
    with open(sys.argv[1]) as f:
        bench = json.load(f)
    written = plot_all(bench, sys.argv[2])
    for _, path in written:
        print(path)
    if not written:
        print("no workload in %s carries a series: no plot" % sys.argv[1], file=sys.stderr)


if __name__ == "__main__":
    main()
