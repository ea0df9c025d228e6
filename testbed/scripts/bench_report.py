#!/usr/bin/python3
"""Regenerates docs/benchmarks.md and its plots from one stored benchmark campaign.

usage: bench_report.py [--results DIR [--results OLDER ...] [--and-older]] [--out-md FILE] [--img-dir DIR]

DIR is a results directory written by bench_run.py (`make bench`): meta.json (commit, times,
the machine's load, what else ran per step) and one JSON file per benchmark (transport, codecs,
vm, protect, migrate, faults, and the goals step's goals-*.json); a benchmark whose file is
missing is reported as not run, and the goals section is left out without goals files.
Default: the newest docs/results/bench-*, and for a benchmark it did not run the newest older
campaign that did (labelled as such, with its own commit and date); --results OLDER and
--and-older (every stored campaign older than DIR) give those older campaigns explicitly. The
goals section (issue 16: each goal before and now, met or not, with its command) compares the
tuned failover with the newest older campaign that ran the same fault points. Writes FILE (default docs/benchmarks.md) and the PNGs
it links into DIR (default docs/benchmarks/), names fixed per figure, so a new campaign
overwrites the old figures. Every table and figure is computed from the stored results only:
no number is typed in here. The narrative and history (before/after tables, bugs found, goals
met or missed) are hand-written in docs/benchmarks-history.md, which the report links.

Plots: matplotlib from Debian's python3-matplotlib (`make deps`), Agg backend (no display).
Exits 3 naming `make deps` when matplotlib is missing.
"""
import argparse, glob, json, math, os, re, sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as e:  # pragma: no cover - the message is the point
    sys.stderr.write("bench_report: matplotlib is missing (%s): run `make deps` (installs Debian's "
                     "python3-matplotlib) and use /usr/bin/python3\n" % e)
    sys.exit(3)

HISTORY = "benchmarks-history.md"
# Each step's section in the hand-written history (how it measures, earlier campaigns).
ANCHORS = {"transport": "transport", "codecs": "protocol-codecs", "vm": "vm-runtime-issue-2",
           "protect": "protection-issue-4", "faults": "failover-issue-5", "migrate": "migration-issue-13"}
# The goals step's results (bench_run.py `goals`): issue 16's goals, "before" and "now" in one run.
GOALS_FILES = ("goals-kv.json", "goals-pause.json", "goals-dirty.json", "goals-faults-untuned.json",
               "goals-faults-untuned-before.json", "goals-faults-tuned.json")
GOALS_ANCHOR = "issue-16-goals-the-goals-step"
# The tuned-client fault points whose failover must not regress (issue 16).
TUNED_POINTS = ("kill", "primary.paused", "primary.acked")
LIBRARY_NOTE = (
    "Plots are drawn with **matplotlib** from Debian's `python3-matplotlib` (`make deps` installs "
    "it): a well-kept, packaged library that `testbed/scripts/plot_migration.py` already used for "
    "the migration figures, that renders text with its bundled fonts, and that needs nothing from "
    "crates.io (the `plotters` crate is not in this machine's offline cargo cache and needs a "
    "TrueType font found or bundled). The generator is `testbed/scripts/bench_report.py`; "
    "`cargo test --release -p testbed --test bench_report` checks it on a stored fixture.")


# ---------------------------------------------------------------------------------------------
# Small helpers

def load(path):
    with open(path) as f:
        return json.load(f)


# The dirty guest's slowdown is read from its progress lines over a few seconds: run to run it
# moves by ~0.1-0.2 percentage points with nothing changed (docs/benchmarks-history.md), so
# "no worse" allows that much.
SLOWDOWN_RESOLUTION_PCT = 0.5


def median(v):
    v = sorted(x for x in v if isinstance(x, (int, float)) and math.isfinite(x))
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def pct(v, p):
    """Nearest-rank percentile (p in 0..1); with few values p99 is the maximum."""
    v = sorted(x for x in v if isinstance(x, (int, float)) and math.isfinite(x))
    if not v:
        return None
    return v[min(len(v) - 1, max(0, math.ceil(p * len(v)) - 1))]


def f(x, digits=0):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return "{:,.{d}f}".format(x, d=digits)


def g(x):
    """A measured value with sensible precision: 1 decimal below 10, none above."""
    return f(x, 1 if x is not None and abs(x) < 10 else 0)


def get(d, path, default=None):
    for k in path.split("/"):
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def num(d, path):
    x = get(d, path)
    return float(x) if isinstance(x, (int, float)) else None


def epoch_label(e):
    """The protect bench's `epoch_ms_set`: a length in ms, 0 = adaptive, u64::MAX = adaptive-silent."""
    if e == 0:
        return "adaptive (output-driven)"
    if isinstance(e, int) and e >= 2 ** 63:
        return "adaptive 10-50 ms, output ignored"
    return "%s ms" % e


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def campaigns():
    """Every docs/results/bench-*/ with a meta.json, newest first."""
    dirs = [d for d in glob.glob(os.path.join(ROOT, "docs", "results", "bench-*")) if os.path.isfile(os.path.join(d, "meta.json"))]
    if not dirs:
        sys.exit("bench_report: no docs/results/bench-*/meta.json: run `make bench` (or `make bench BENCH_QUICK=1`) first")

    def key(d):
        m = re.search(r"bench-(\d{4}-\d{2}-\d{2})(?:-(\d+))?$", d)
        return (m.group(1), int(m.group(2) or 1)) if m else ("", 0)
    return sorted(dirs, key=key, reverse=True)


class Report:
    """The report of campaign dirs[0]; a benchmark it has no results for is taken from the newest
    of dirs[1:] that has them (`make bench BENCH_ONLY=protect` then refreshes one section), with
    that campaign's commit, date and load."""

    def __init__(self, dirs, out_md, img_dir):
        self.dir, self.out_md, self.img_dir = dirs[0], out_md, img_dir
        self.meta = load(os.path.join(self.dir, "meta.json"))
        self.steps = {s["step"]: s for s in self.meta.get("steps", [])}
        self.src = {}  # step -> (dir, meta, step meta) its results come from
        for step in ANCHORS:
            for d in dirs:
                if os.path.isfile(os.path.join(d, step + ".json")):
                    meta = self.meta if d == self.dir else load(os.path.join(d, "meta.json"))
                    sm = next((x for x in meta.get("steps", []) if x["step"] == step), {})
                    self.src[step] = (d, meta, sm)
                    break
        self.dirs = dirs
        # The newest campaign with goals results (the section is left out when none has).
        self.goals_dir = next((d for d in dirs if any(os.path.isfile(os.path.join(d, x)) for x in GOALS_FILES)), None)
        self.md = []
        self.images = []
        os.makedirs(img_dir, exist_ok=True)

    def rel(self, path):
        return os.path.relpath(path, os.path.dirname(os.path.abspath(self.out_md)))

    def results(self, step):
        return load(os.path.join(self.src[step][0], step + ".json")) if step in self.src else None

    def w(self, s=""):
        self.md.append(s)

    def figure(self, fig, ax, step, name, alt):
        """Stamps the figure with its run, saves it as img_dir/name and links it."""
        self.stamp(ax, step)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        path = os.path.join(self.img_dir, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.images.append(path)
        self.w("![%s](%s)\n" % (alt, self.rel(path)))

    def stamp_text(self, step):
        """A figure's label: the step, its run's date and commit, the campaign's command."""
        _, meta, sm = self.src[step]
        return "%s · %s · commit %s%s · %s" % (
            step, sm.get("started") or meta.get("started", "?"), meta.get("commit", "?"),
            " + changes" if meta.get("tree_changed") else "", meta.get("command", ""))

    def stamp(self, ax, step):
        ax.figure.text(0.99, 0.005, self.stamp_text(step), ha="right", va="bottom", fontsize=7, color="0.4")

    def provenance(self, step, runs_note):
        d, meta, s = self.src[step]
        if d != self.dir:
            self.w("**From an earlier campaign**, `%s` (`%s`): this campaign did not run it.\n" % (
                os.path.relpath(d, ROOT), meta.get("command")))
        if s:
            others = ", ".join("%s %.0f%%" % (o["process"], 100 * o["cores"]) for o in s.get("others_top", [])[:4])
            self.w("```sh\n%s\n```\n" % s["command"])
            self.w("Commit %s%s, started %s; %s; took %.0f s (exit %d); load average %s before, %s after; processes "
                   "other than the benchmark used **%.2f cores** on average over it%s.\n" % (
                       meta.get("commit"), " (with uncommitted changes)" if meta.get("tree_changed") else "",
                       s.get("started") or meta.get("started"), runs_note, s.get("secs", 0), s.get("exit", -1),
                       s.get("load_before"), s.get("load_after"), s.get("others_cores", float("nan")),
                       " (most: %s of a core)" % others if others else ""))
        self.w("How it measures, what the columns mean, earlier campaigns and their reading: "
               "[history](%s#%s).\n" % (HISTORY, ANCHORS[step]))

    def missing(self, step):
        s = self.steps.get(step)
        why = "not run in this campaign" if not s else "no results (exit %s; see `%s`)" % (
            s.get("exit"), os.path.relpath(os.path.join(self.dir, s.get("log", "")), ROOT))
        self.w("*%s.* Earlier results: [history](%s#%s).\n" % (why[0].upper() + why[1:], HISTORY, ANCHORS[step]))

    # -----------------------------------------------------------------------------------------

    def header(self):
        m = self.meta
        rel_dir = os.path.relpath(self.dir, ROOT)
        self.w("# Benchmarks\n")
        self.w("<!-- Generated by testbed/scripts/bench_report.py from %s: do not edit by hand. "
               "Regenerate with `make bench-report`; hand-written notes go to docs/%s. -->\n" % (rel_dir, HISTORY))
        self.w("Generated from the stored results in `%s` by `make bench-report`; `make bench` runs every "
               "benchmark again and regenerates this page (`make bench BENCH_QUICK=1` for fewer runs and "
               "points). The narrative and history (what changed between campaigns, before/after tables, "
               "the bugs the benchmarks found, the issues' goals met or missed, every earlier table) are "
               "hand-written in [%s](%s).\n" % (rel_dir, HISTORY, HISTORY))
        self.w(LIBRARY_NOTE + "\n")
        whole = m.get("whole")
        if whole:
            took = ("finished %s; load average %s before, %s after; processes other than the benchmarks used "
                    "**%.2f cores** on average over the %.0f s (the machine is shared: read absolute numbers with "
                    "that in mind)" % (m.get("finished", "?"), whole.get("load_before"), whole.get("load_after"),
                                       whole.get("others_cores", float("nan")), whole.get("secs", 0)))
        else:
            took = "**not finished** (interrupted, or still running when this was generated): the steps below ran"
        self.w("**This campaign**: `%s`, commit %s%s (branch %s), started %s, %s; %s cores, kernel %s; %s.\n" % (
            m.get("command"), m.get("commit"), " with uncommitted changes" if m.get("tree_changed") else "",
            m.get("branch"), m.get("started"), "quick variant (fewer runs and points)" if m.get("quick") else "full",
            m.get("cores"), m.get("kernel"), took))
        rows = []
        for s in m.get("steps", []):
            top = ", ".join("%s %.0f%%" % (o["process"], 100 * o["cores"]) for o in s.get("others_top", [])[:3])
            rows.append(["`%s`" % s["step"], "%.0f s" % s.get("secs", 0), s.get("exit"),
                         "%s → %s" % (s.get("load_before"), s.get("load_after")),
                         f(s.get("others_cores"), 2), top or "-"])
        self.w(table(["step", "took", "exit", "load average before → after", "other processes, cores",
                      "busiest other processes (share of a core)"], rows))

    # -----------------------------------------------------------------------------------------

    def goals(self):
        """Issue 16's goals, one row each: before, now, met?, and the command that measured it."""
        d = self.goals_dir
        if not d:
            return
        meta = self.meta if d == self.dir else load(os.path.join(d, "meta.json"))
        sm = next((x for x in meta.get("steps", []) if x["step"] == "goals"), {})
        self.w("## Issue 16 goals: before and after, in one run\n")
        if d != self.dir:
            self.w("**From an earlier campaign**, `%s` (`%s`): this campaign did not run the goals step.\n" % (
                os.path.relpath(d, ROOT), meta.get("command")))
        self.w("Each command runs `before` and `now` alternately (the protect bench: every point once per variant "
               "in every run; `kill.untuned`: chunks of runs, the two variants' chunks alternating with the same "
               "seeds). `before` is the policy and pause when issue 16 was filed: `protect %s` (adaptive 10-50 ms "
               "epochs that output does not end, one copy thread, no hot pages) and, for the untuned failover, the "
               "backup without its inbound log on a LAN that learns the guest's address (`testbed faults --no-inbound-log "
               "--no-lan-copy`: no input replay; since session 12 `now` runs on a LAN that hands the guest's frames "
               "to both hosts, with the backup's LAN copies). Both run on "
               "the same binary, so what it does whatever the flags is in both columns (since session 10: each "
               "vCPU captures its own state as it parks, with fewer ioctls; the backup commits and acks small "
               "checkpoints in its session task and the primary releases output there; lazy QUIC ACKs). `now` is "
               "the defaults of commit %s%s. Medians over runs (per-run values in brackets); a p99 over few runs "
               "is the slowest run. \"No worse than before\": now's median at most before's slowest run (for the dirty guest's slowdown, plus 0.5 percentage points: its resolution).\n" % (
                   (sm.get("variants") or "").split(";")[0].partition("=")[2] or "?", meta.get("commit", "?"),
                   " (with uncommitted changes)" if meta.get("tree_changed") else ""))
        results = {name: load(os.path.join(d, name)) if os.path.isfile(os.path.join(d, name)) else None
                   for name in GOALS_FILES}
        cmds = sm.get("commands", {})
        rows = []
        for goal_rows in (self.goal_kv, self.goal_pause, self.goal_dirty, self.goal_failover):
            rows += goal_rows(results, lambda name: "`%s`" % cmds[name].replace("|", "\\|") if cmds.get(name) else "-")
        self.w(table(["goal", "before", "now", "met?", "command"], rows))
        if sm.get("runs"):
            self.w("What else ran, per command (processes other than the benchmark, cores on average; load average "
                   "before → after): %s.\n" % "; ".join(
                       "%s%s %s (exit %s, %.0f s, %s → %s)" % (
                           x["name"], " seed %s" % x["seed"] if x.get("seed") else "", f(x.get("others_cores"), 2),
                           x.get("exit"), x.get("secs", 0), x.get("load_before"), x.get("load_after")) for x in sm["runs"]))
        self.w("How the goals step runs and earlier A/B runs by hand: [history](%s#%s).\n" % (HISTORY, GOALS_ANCHOR))

    @staticmethod
    def goal_groups(r, section, key):
        """The protect bench's runs in `section` of results `r`, by `key(run)` (the variant, with
        the point or guest)."""
        out = {}
        runs = (r or {}).get(section) or []
        for x in (x for v in runs for x in (v if section != "dirty" else [y for w in v for y in w])):
            out.setdefault(key(x), []).append(x)
        return out

    @staticmethod
    def goal_missing(r, name, goal, code):
        """The row of a goal without runs: its command did not run, or every run failed."""
        why = "not run (no `%s`)" % name if not r else "no runs (%d failed: see `%s`)" % (len(r.get("failures") or []), name)
        return [[goal, why, why, "-", code(name)]]

    @staticmethod
    def met(ok):
        return "-" if ok is None else ("**yes**" if ok else "**no**")

    def goal_kv(self, results, code):
        r, name = results["goals-kv.json"], "goals-kv.json"
        kv = self.goal_groups(r, "kv", lambda x: x.get("protect_variant"))
        if not kv:
            return self.goal_missing(r, name, "kv throughput protected ≥ 30% of unprotected, added latency p50 ≤ 1 ms", code)
        rows = []
        for op in ("get", "set"):
            share = lambda runs: median([100 - x for x in (num(y, op + "_slowdown_pct") for y in runs) if x is not None])
            cell = lambda runs: "%s%% · %s of %s ops/s · %d runs" % (
                f(share(runs), 1), f(median([num(y, "protected_ops/%s_ops_per_s" % op) for y in runs])),
                f(median([((num(y, "unprotected/%s_ops_per_s" % op) or 0) + (num(y, "unprotected_after/%s_ops_per_s" % op) or 0)) / 2
                          for y in runs])), len(runs)) if runs else "no runs"
            now = share(kv.get("now", []))
            rows.append(["kv %s throughput, 16 connections: protected ≥ 30%% of unprotected" % op, cell(kv.get("before", [])),
                         cell(kv.get("now", [])), self.met(None if now is None else now >= 30), code(name)])
        added = lambda runs: median([num(y, "added_lat_ms_p50") for y in runs])
        cell = lambda runs: "%s ms (%s → %s ms; %s)" % (
            f(added(runs), 2), f((median([num(y, "unprotected/lat_us_p50") for y in runs]) or 0) / 1e3, 2),
            f((median([num(y, "protected_ops/lat_us_p50") for y in runs]) or 0) / 1e3, 2),
            " ".join(f(num(y, "added_lat_ms_p50"), 2) for y in runs)) if runs else "no runs"
        now = added(kv.get("now", []))
        rows.append(["kv added latency per request p50 ≤ 1 ms (unprotected → protected p50)", cell(kv.get("before", [])),
                     cell(kv.get("now", [])), self.met(None if now is None else now <= 1.0), code(name)])
        return rows

    def goal_pause(self, results, code):
        r, name = results["goals-pause.json"], "goals-pause.json"
        pause = self.goal_groups(r, "pause", lambda x: (x.get("point"), x.get("variant")))
        if not pause:
            return self.goal_missing(r, name, "pause p50 ≤ 0.5 ms and p99 ≤ 1 ms at ~1,000 dirty pages per epoch", code)
        rows = []
        for point in dict.fromkeys(p for p, _ in pause):
            for key, limit in (("p50", 0.5), ("p99", 1.0)):
                ms = lambda runs: [x / 1e3 for x in (num(y, "protected/pause_us_" + key) for y in runs) if x is not None]
                cell = lambda runs: "%s ms at %s pages/epoch (%s)" % (
                    f(median(ms(runs)), 2), f(median([num(y, "protected/dirty_pages_per_epoch_mean") for y in runs])),
                    " ".join(f(x, 2) for x in ms(runs))) if runs else "no runs"
                before, now = pause.get((point, "before"), []), pause.get((point, "now"), [])
                rows.append(["pause %s ≤ %g ms at ~1,000 dirty pages per epoch (`dirty` guest, point %s)" % (key, limit, point),
                             cell(before), cell(now), self.met(None if median(ms(now)) is None else median(ms(now)) <= limit),
                             code(name)])
        return rows

    def goal_dirty(self, results, code):
        r, name = results["goals-dirty.json"], "goals-dirty.json"
        dirty = self.goal_groups(r, "dirty", lambda x: (x.get("variant"), x.get("epoch_ms_set"), x.get("protect_variant")))
        if not dirty:
            return self.goal_missing(r, name, "`dirty` guest slowdown no worse than before", code)
        rows = []
        cell = lambda runs: "%s%% (%s)" % (f(median([num(y, "slowdown_pct") for y in runs]), 1), " ".join(
            f(num(y, "slowdown_pct"), 1) for y in runs)) if runs else "no runs"
        for guest, epoch in dict.fromkeys((g_, e) for g_, e, _ in dirty):
            before, now = dirty.get((guest, epoch, "before"), []), dirty.get((guest, epoch, "now"), [])
            worst, mid = pct([num(y, "slowdown_pct") for y in before], 1.0), median([num(y, "slowdown_pct") for y in now])
            rows.append(["`dirty` guest slowdown no worse than before: %s, %s epochs" % (guest, epoch_label(epoch)),
                         cell(before), cell(now),
                         self.met(None if worst is None or mid is None else mid <= worst + SLOWDOWN_RESOLUTION_PCT),
                         code(name)])
        return rows

    def goal_failover(self, results, code):
        rows = []
        untuned = {v: [x for x in (results[n] or {}).get("runs", []) if x.get("point") == "kill.untuned"]
                   for v, n in (("before", "goals-faults-untuned-before.json"), ("now", "goals-faults-untuned.json"))}
        for key, q, limit in (("p50", 0.5, 60), ("p99", 0.99, 100)):
            value = lambda runs: (median if key == "p50" else lambda v: pct(v, q))([x.get("failover_ms") for x in runs])
            cell = lambda runs, name: "%s ms · %d/%d passed" % (
                f(value(runs)), sum(x.get("outcome") == "pass" for x in runs), len(runs)) if runs else (
                "not run (no `%s`)" % name if not results[name] else "no runs")
            now = value(untuned["now"])
            rows.append(["untuned client (no `rto_min`, no thin-stream options): kill to first reply %s ≤ %d ms "
                         "(before: no input replay)" % (key, limit), cell(untuned["before"], "goals-faults-untuned-before.json"),
                         cell(untuned["now"], "goals-faults-untuned.json"), self.met(None if now is None else now <= limit),
                         "%s and %s, alternating" % (code("goals-faults-untuned.json"), code("goals-faults-untuned-before.json"))
                         if code("goals-faults-untuned.json") != "-" else "-"])
        name = "goals-faults-tuned.json"
        for point in TUNED_POINTS:
            runs = [x for x in (results[name] or {}).get("runs", []) if x.get("point") == point]
            fo = [x.get("failover_ms") for x in runs]
            prev, where = self.previous_failover(point)
            before = "%s ms (%s) · %s" % (f(median(prev)), " ".join(f(x) for x in prev), where) if prev else \
                "no earlier campaign ran `%s`" % point
            now = "%s ms (%s) · %d/%d passed" % (f(median(fo)), " ".join(f(x) for x in fo), sum(
                x.get("outcome") == "pass" for x in runs), len(runs)) if runs else "not run (no `%s`)" % name \
                if not results[name] else "no runs"
            ok = None if not prev or median(fo) is None else median(fo) <= pct(prev, 1.0)
            rows.append(["tuned client, `%s`: failover p50 no worse than the previous campaign" % point, before, now,
                         self.met(ok) if prev else "shown only", code(name)])
        return rows

    def previous_failover(self, point):
        """Failover times at `point` from the newest campaign older than the goals' that ran it (its
        goals step, else its faults step), and where they come from."""
        older = self.dirs[self.dirs.index(self.goals_dir) + 1:]
        for d in older:
            for name in ("goals-faults-tuned.json", "faults.json"):
                path = os.path.join(d, name)
                if not os.path.isfile(path):
                    continue
                fo = [x.get("failover_ms") for x in load(path).get("runs", []) if x.get("point") == point]
                fo = [x for x in fo if isinstance(x, (int, float))]
                if fo:
                    meta = load(os.path.join(d, "meta.json")) if os.path.isfile(os.path.join(d, "meta.json")) else {}
                    return fo, "`%s/%s`, commit %s" % (os.path.relpath(d, ROOT), name, meta.get("commit", "?"))
        return [], None

    def transport(self):
        self.w("## Transport\n")
        r = self.results("transport")
        if not r:
            return self.missing("transport")
        self.provenance("transport", "%d runs of %d MiB per side, alternating" % (r["runs"], r["mib_per_run"]))
        show = lambda v: " ".join(f(x) for x in v)
        self.w(table(["variant", "runs (MB/s)", "median MB/s", "ratio"], [
            ["raw quinn, 1 stream, 1 MiB writes", show(r["raw_mb_per_s"]), f(r["raw_median_mb_per_s"]), "1.00"],
            ["transport, 64 KiB frames over %d bulk streams + control" % r["bulk_streams"],
             show(r["transport_mb_per_s"]), f(r["transport_median_mb_per_s"]), f(r.get("ratio"), 2)]]))
        self.w("Goal: ratio ≥ 0.8.\n")

    def codecs(self):
        self.w("## Protocol codecs\n")
        r = self.results("codecs")
        if not r:
            return self.missing("codecs")
        t = r.get("tables", {})
        self.provenance("codecs", "one core; medians of 9 (per kind) or 7 (primitives) runs")
        if t.get("kinds"):
            self.w("### Per page kind: epochs of 2048 dirty 4 KiB pages, one core\n")
            self.w(table(["page kind", "encode GB/s", "receive GB/s", "apply GB/s", "wire bytes / page"], [
                [k["kind"], f(k["encode_gbps"], 2), f(k["receive_gbps"], 2), f(k["apply_gbps"], 2),
                 f(k["wire_bytes_per_page"], 1)] for k in t["kinds"]]))
        if t.get("primitives"):
            self.w("### Primitives, one core (GB/s of page bytes)\n")
            self.w(table(["primitive", "GB/s"], [[p["primitive"], f(p["gbps"], 2)] for p in t["primitives"]]))
        if t.get("mix"):
            self.w("### Bytes on the wire per dirty byte, realistic mix\n")
            self.w("The mix (64 MiB guest, 20 epochs of 2000 dirty pages) is described in the bench's legend "
                   "(`replication-proto/benches/codecs.rs`) and in the [history](%s#protocol-codecs).\n" % HISTORY)
            enc = ["zero", "unchanged", "raw", "lz4", "delta"]
            self.w(table(["codecs", "wire bytes / dirty byte", "encode GB/s"] + enc, [
                [m["codecs"], f(m["wire_bytes_per_dirty_byte"], 3), f(m["encode_gbps"], 2)]
                + ["%.0f%%" % (100 * m["share_by_encoding"][e]) for e in enc] for m in t["mix"]]))
            fig, axes = plt.subplots(1, 2 if t.get("kinds") else 1, figsize=(11, 3.8), squeeze=False)
            ax = axes[0][0]
            names = [m["codecs"].replace(" (zero and unchanged still apply)", "") for m in t["mix"]]
            vals = [m["wire_bytes_per_dirty_byte"] for m in t["mix"]]
            ax.barh(names[::-1], vals[::-1], color="tab:blue")
            for i, v in enumerate(vals[::-1]):
                ax.text(v, i, " %.3f" % v, va="center", fontsize=8)
            ax.set_xlabel("wire bytes per dirty byte (lower is better)")
            ax.set_title("Realistic mix, by codec configuration", fontsize=10)
            ax.set_xlim(0, max(vals) * 1.25)
            if t.get("kinds"):
                ax = axes[0][1]
                kn = [k["kind"] for k in t["kinds"]]
                kv = [k["wire_bytes_per_page"] / 4096 for k in t["kinds"]]
                ax.barh(kn[::-1], kv[::-1], color="tab:orange")
                ax.set_xscale("log")
                for i, v in enumerate(kv[::-1]):
                    ax.text(v, i, " %.4f" % v, va="center", fontsize=8)
                ax.set_xlabel("wire bytes per dirty byte (log)")
                ax.set_title("One page kind per epoch", fontsize=10)
                ax.tick_params(axis="y", labelsize=7)
            self.figure(fig, axes[0][0], "codecs", "codec-wire-bytes.png", "bytes on the wire per dirty byte by codec")
        if t.get("dedup"):
            self.w("### Content-hash dedup: a migration's round 0 and its later rounds\n")
            self.w(table(["dedup", "round 0: wire bytes / page", "round 0 encode GB/s", "round 0 pages as references",
                          "rounds: wire bytes / dirty byte", "rounds encode GB/s", "rounds' pages as references"], [
                [d["dedup"], f(d["round0_wire_bytes_per_page"]), f(d["round0_encode_gbps"], 2),
                 "%.1f%%" % (100 * d["round0_reference_share"]), f(d["rounds_wire_bytes_per_dirty_byte"], 3),
                 f(d["rounds_encode_gbps"], 2), "%.1f%%" % (100 * d["rounds_reference_share"])] for d in t["dedup"]]))

    def vm(self):
        self.w("## VM runtime\n")
        r = self.results("vm")
        if not r:
            return self.missing("vm")
        rows = r.get("checkpoint_steps", [])
        self.provenance("vm", "one %d MiB guest, 1 vCPU; p50/p99 over %s rounds per row" % (
            r.get("memory_mib", 0), rows[0]["rounds"] if rows else "?"))
        self.w("### pause / harvest / capture / resume vs dirty pages per harvest (µs)\n")
        self.w(table(["guest rate (pages/s)", "interval", "dirty pages p50", "pause p50 / p99", "harvest p50 / p99",
                      "capture p50 / p99", "resume p50"], [
            [f(x["rate_pages_per_s"]), "%d ms" % x["interval_ms"], f(x["dirty_pages_p50"]),
             "%s / %s" % (f(x["pause_us_p50"]), f(x["pause_us_p99"])),
             "%s / %s" % (f(x["harvest_us_p50"]), f(x["harvest_us_p99"])),
             "%s / %s" % (f(x["capture_us_p50"]), f(x["capture_us_p99"])), f(x["resume_us_p50"])] for x in rows]))
        rs = r.get("restore", {})
        self.w("In-process restore of the 256 MiB guest: p50 %s µs, p99 %s µs over %s runs.\n" % (
            f(rs.get("us_p50")), f(rs.get("us_p99")), rs.get("runs")))

    # -----------------------------------------------------------------------------------------

    def protect(self):
        self.w("## Protection\n")
        r = self.results("protect")
        if not r:
            return self.missing("protect")
        st = r.get("settings", {})
        self.provenance("protect", "%s run(s) per point, %s s windows, epochs %s; medians over runs" % (
            st.get("runs", "?"), f(st.get("window_s"), 0), ", ".join(st.get("epochs", [])) or "?"))
        mach = r.get("machine", {})
        if mach:
            self.w("Over the protect bench alone (its own accounting): other processes used %.2f cores%s%s.\n" % (
                mach.get("others_cores", float("nan")),
                "; " + ", ".join("%s %.0f%%" % (o["process"], 100 * o["cores"]) for o in mach.get("others", [])[:4])
                if mach.get("others") else "",
                "; **the understudy binary was rebuilt during the run**" if mach.get("binary_rebuilt_during_run") else ""))
        if r.get("failures"):
            self.w("**Failed runs** (%d): %s\n" % (len(r["failures"]), "; ".join(
                x.splitlines()[0][:160] for x in r["failures"])))
        self.protect_pause(r.get("pause") or [])
        self.protect_dirty(r.get("dirty") or [])
        self.protect_kv(r.get("kv") or [])
        self.protect_bytes(r)

    def protect_pause(self, points):
        points = [p for p in points if p]
        if not points:
            return
        self.w("### Pause time vs dirty pages per epoch (dirty guest, fixed epochs)\n")
        rows = []
        for runs in points:
            m = lambda k: median([num(x, k) for x in runs])
            rows.append([runs[0]["point"], f(runs[0]["rate"]), len(runs), f(m("protected/epochs_per_s"), 1),
                         f(m("protected/dirty_pages_per_epoch_mean")), f(m("protected/pause_us_p50")),
                         f(m("protected/pause_us_p99")), " ".join(f(num(x, "protected/pause_us_p99")) for x in runs),
                         "%s / %s" % (f((m("protected/ack_us_p50") or 0) / 1e3, 1), f((m("protected/ack_us_p99") or 0) / 1e3, 1)),
                         f(m("protected/cpu_ms_per_s/rest_of_machine") and m("protected/cpu_ms_per_s/rest_of_machine") / 1e3, 2)])
        self.w(table(["point (pages @ epoch)", "rate pages/s", "runs", "epochs/s", "dirty pages/epoch", "pause p50 µs",
                      "pause p99 µs", "p99 per run", "ack p50 / p99 ms", "rest of machine, cores"], rows))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, label, color in (("pause_us_p50", "p50", "tab:blue"), ("pause_us_p99", "p99", "tab:red")):
            xs, ys = [], []
            for runs in points:
                for x in runs:
                    ax.scatter(num(x, "protected/dirty_pages_per_epoch_mean"), num(x, "protected/" + key),
                               color=color, alpha=0.3, s=14)
                xs.append(median([num(x, "protected/dirty_pages_per_epoch_mean") for x in runs]))
                ys.append(median([num(x, "protected/" + key) for x in runs]))
            order = sorted(range(len(xs)), key=lambda i: xs[i])
            ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color=color, label="pause %s (median of runs)" % label)
        for runs in points:
            ax.annotate(runs[0]["point"], (median([num(x, "protected/dirty_pages_per_epoch_mean") for x in runs]),
                                           median([num(x, "protected/pause_us_p50") for x in runs])),
                        textcoords="offset points", xytext=(4, -12), fontsize=7, color="0.3")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1000, color="0.6", ls=":", lw=1)
        ax.set_xlabel("dirty pages per epoch (mean)")
        ax.set_ylabel("pause µs")
        ax.set_title("Epoch pause vs dirty pages per epoch (faint: single runs; dotted: 1 ms)", fontsize=10)
        ax.legend(fontsize=8)
        self.figure(fig, ax, "protect", "pause-vs-dirty-pages.png", "pause vs dirty pages per epoch")

    def protect_dirty(self, variants):
        variants = [[e for e in v if e] for v in variants]
        if not any(variants):
            return
        self.w("### Slowdown of the `dirty` guest, protected vs unprotected\n")
        rows = []
        for v in variants:
            for runs in v:
                m = lambda k: median([num(x, k) for x in runs])
                base = median([((num(x, "unprotected/pages_per_s") or 0) + (num(x, "unprotected_after/pages_per_s") or 0)) / 2
                               for x in runs])
                rows.append([runs[0]["variant"], epoch_label(runs[0]["epoch_ms_set"]), len(runs), f(m("protected/epochs_per_s"), 1),
                             f(m("protected/dirty_pages_per_epoch_mean")), f(base), f(m("protected/pages_per_s")),
                             "**%s** (%s)" % (f(m("slowdown_pct"), 1), " ".join(f(num(x, "slowdown_pct"), 1) for x in runs)),
                             f(m("floor_pct"), 1), f(m("pause_share_pct"), 1), f(m("vcpu_extra_us_per_dirtied_page"), 2)])
        self.w(table(["guest", "epochs", "runs", "epochs/s", "dirty pages/epoch", "unprotected pages/s",
                      "protected pages/s", "slowdown % (per run)", "floor % (pages/s × 4 µs)", "pause share %",
                      "extra vCPU µs per dirtied page"], rows))

    def protect_kv(self, epochs):
        epochs = [e for e in epochs if e]
        if not epochs:
            return
        self.w("### `kv` guest over a TAP: memcslap ops/s and request latency\n")
        rows = []
        for runs in epochs:
            m = lambda k: median([num(x, k) for x in runs])
            base = lambda k: median([((num(x, "unprotected/" + k) or 0) + (num(x, "unprotected_after/" + k) or 0)) / 2 for x in runs])
            rows.append([epoch_label(runs[0]["epoch_ms_set"]), len(runs), f(m("protected/epochs_per_s"), 1),
                         "%s → %s" % (f(base("get_ops_per_s")), f(m("protected_ops/get_ops_per_s"))), f(m("get_slowdown_pct"), 1),
                         "%s → %s" % (f(base("set_ops_per_s")), f(m("protected_ops/set_ops_per_s"))), f(m("set_slowdown_pct"), 1),
                         "%s → %s" % (f((m("unprotected/lat_us_p50") or 0) / 1e3, 2), f((m("protected_ops/lat_us_p50") or 0) / 1e3, 2)),
                         "%s → %s" % (f((m("unprotected/lat_us_p99") or 0) / 1e3, 2), f((m("protected_ops/lat_us_p99") or 0) / 1e3, 2)),
                         f(m("added_lat_ms_p50"), 2), f(m("model_added_ms_p50"), 2)])
        self.w(table(["epochs", "runs", "epochs/s", "get ops/s unprot → prot", "get slowdown %",
                      "set ops/s unprot → prot", "set slowdown %", "latency p50 ms unprot → prot",
                      "latency p99 ms unprot → prot", "added p50 ms", "model p50 ms (E/2 + pause + ack)"], rows))
        with_lat = [runs for runs in epochs if any(get(x, "protected_ops/lat_us") for x in runs)]
        if not with_lat:
            self.w("*No per-request latencies in these results (recorded since this report exists): no CDF.*\n")
            return
        fig, ax = plt.subplots(figsize=(8, 4.5))
        unprot = [v for runs in with_lat for x in runs for v in (get(x, "unprotected/lat_us") or [])]
        curves = [("unprotected (all settings' baselines)", unprot, "black")]
        colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
        for i, runs in enumerate(with_lat):
            label = "protected, %s epochs" % epoch_label(runs[0]["epoch_ms_set"])
            curves.append((label, [v for x in runs for v in (get(x, "protected_ops/lat_us") or [])], colors[i % len(colors)]))
        for label, v, color in curves:
            if not v:
                continue
            v = sorted(x / 1e3 for x in v)
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", color=color,
                    label="%s (n=%d, p50 %.2f ms)" % (label, len(v), median(v)))
        ax.set_xscale("log")
        ax.set_xlabel("request latency, ms (log)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title("kv set/get latency with random think time, protected vs unprotected", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        self.figure(fig, ax, "protect", "kv-latency-cdf.png", "kv latency CDF, protected vs unprotected")

    def protect_bytes(self, r):
        windows = []
        for runs in r.get("pause") or []:
            if runs:
                windows.append(("dirty rate=%s @%s ms" % (runs[0]["rate"], runs[0]["epoch_ms_set"]), runs))
        for v in r.get("dirty") or []:
            for runs in v:
                if runs:
                    windows.append(("dirty %s @%s" % (runs[0]["variant"].split(":")[0], epoch_label(runs[0]["epoch_ms_set"])), runs))
        for runs in r.get("kv") or []:
            if runs:
                windows.append(("kv @%s" % epoch_label(runs[0]["epoch_ms_set"]), runs))
        if not windows:
            return
        self.w("### Bytes on the wire per epoch (the protected windows above)\n")
        rows = []
        for label, runs in windows:
            m = lambda k: median([num(x, "protected/" + k) for x in runs])
            rows.append([label, f(m("epochs_per_s"), 1), f(m("dirty_pages_per_epoch_mean")),
                         f((m("status_bytes_sent_per_epoch") or 0) / 1e3, 1), f((m("udp_lo_bytes_per_epoch") or 0) / 1e3, 1),
                         f(m("udp_lo_mb_per_s"), 1), f(m("cpu_ms_per_s/primary_total") and
                                                      m("cpu_ms_per_s/primary_total") - (m("cpu_ms_per_s/vcpu") or 0)),
                         f(m("cpu_ms_per_s/backup_total"))])
        self.w(table(["workload, epoch", "epochs/s", "dirty pages/epoch", "status Δ`bytes_sent`/Δepochs KB (encoded)",
                      "UDP on lo KB/epoch", "UDP MB/s", "primary CPU ms/s (not vCPU)", "backup CPU ms/s"], rows))

    # -----------------------------------------------------------------------------------------

    def faults(self):
        self.w("## Failover per fault point\n")
        r = self.results("faults")
        if not r:
            return self.missing("faults")
        self.provenance("faults", "%s run(s) per point, seed %s" % (r.get("runs_per_point"), r.get("seed")))
        by = {}
        for x in r.get("runs", []):
            by.setdefault(x["point"], []).append(x)  # every point present, in the order it ran
        rows = []
        for point, runs in by.items():
            fo = [x.get("failover_ms") for x in runs]
            rec = [get(x, "migration/recovery/after_fault_ms") for x in runs]
            gaps = [x.get("max_gap_ms") for x in runs]
            rows.append(["`%s`" % point, len(runs), sum(x.get("outcome") == "pass" for x in runs),
                         sum(bool(x.get("promoted")) for x in runs), sum(x.get("lost_writes") or 0 for x in runs),
                         sum(x.get("contradictions") or 0 for x in runs), sum(x.get("reconnects") or 0 for x in runs),
                         "%s / %s" % (f(median(fo)), f(pct(fo, 0.99))) if median(fo) is not None else "-",
                         "%s / %s" % (f(median(rec)), f(pct(rec, 0.99))) if median(rec) is not None else "-",
                         f(pct(gaps, 1.0))])
        self.w(table(["point", "runs", "pass", "promoted", "lost acked writes", "contradictions", "client reconnects",
                      "failover p50 / p99 ms (first reply after the fault)", "migration recovery p50 / p99 ms",
                      "longest reply wait ms"], rows))
        self.w("What each point does and what it expects: [history](%s#failover-issue-5). With few runs the p99 is "
               "the slowest run.\n" % HISTORY)
        failed = [x for x in r.get("runs", []) if x.get("outcome") not in ("pass", None)]
        if failed:
            self.w("**Runs that did not pass** (%d of %d):\n" % (len(failed), len(r.get("runs", []))))
            for x in failed:
                self.w("- `%s` run %s: %s; %s" % (x["point"], x.get("run"), x.get("outcome"),
                                                  "; ".join(x.get("problems") or []) or "no problem recorded"))
            self.w("")
        plotted = [(p, [x.get("failover_ms") if x.get("failover_ms") is not None else get(x, "migration/recovery/after_fault_ms")
                        for x in runs], any(x.get("promoted") for x in runs)) for p, runs in by.items()]
        plotted = [(p, [v for v in vs if isinstance(v, (int, float))], pr) for p, vs, pr in plotted]
        plotted = [t for t in plotted if t[1]]
        if not plotted:
            return
        fig, ax = plt.subplots(figsize=(8, 0.9 + 0.32 * len(plotted)))
        for i, (p, vs, promoted) in enumerate(plotted[::-1]):
            color = "tab:red" if promoted else "tab:blue"
            ax.scatter(vs, [i] * len(vs), color=color, alpha=0.45, s=16)
            ax.scatter([median(vs)], [i], color=color, marker="|", s=300)
        ax.set_yticks(range(len(plotted)))
        ax.set_yticklabels([p for p, _, _ in plotted[::-1]], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("fault → first client reply (or migration recovery), ms (log); bar: median")
        ax.set_title("Failover time per fault point (red: promoted; blue: no promotion, the stall)", fontsize=10)
        ax.grid(True, axis="x", which="both", alpha=0.3)
        self.figure(fig, ax, "faults", "failover-per-fault-point.png", "failover time per fault point")

    # -----------------------------------------------------------------------------------------

    def migration(self):
        self.w("## Live migration vs QEMU\n")
        r = self.results("migrate")
        if not r:
            return self.missing("migrate")
        self.provenance("migrate", "%s run(s) per configuration, interleaved; %s" % (r.get("runs"), r.get("qemu", "QEMU ?")))
        groups = {}
        for x in r.get("results", []):
            groups.setdefault((x["workload"], x["config"]), []).append(x)
        rows = []
        for (w, c), runs in groups.items():
            done = [x for x in runs if x.get("outcome") == "completed"]
            def span(k):
                v = [x.get(k) for x in done]
                if median(v) is None:
                    return "-"
                return g(median(v)) if len(done) == 1 else "%s [%s-%s]" % (g(median(v)), g(pct(v, 0.0)), g(pct(v, 1.0)))
            b = median([x.get("bytes") for x in done])
            rows.append([w, c, "%d/%d" % (len(done), len(runs)), span("total_ms"), span("downtime_ms"), span("paused_ms"),
                         "%s MB" % f(b / 1e6, 1) if b else "-", span("outage_ms"),
                         sum(x.get("lost_writes") or 0 for x in runs) if w == "W3" else ""])
        self.w(table(["workload", "configuration", "converged", "total ms, median [min-max]", "downtime ms",
                      "paused ms (QEMU STOP→RESUME)", "sent, median", "client outage ms (W3)", "lost writes (W3)"], rows))
        self.w("Per-run lines: `%s`. How each column is measured, the workloads and configurations: "
               "[history](%s#migration-issue-13).\n" % (os.path.relpath(os.path.join(self.src["migrate"][0], "migrate.md"), ROOT), HISTORY))
        import plot_migration
        for w, path in plot_migration.plot_all(r, self.img_dir, self.stamp_text("migrate")):
            self.images.append(path)
            self.w("![migration %s](%s)\n" % (w, self.rel(path)))
        self.w("(W1/W2: pages the `dirty` guest wrote per second; W3: the kv client's replies per second; shaded: the "
               "guest paused. Each panel's title names its run.)\n")

    def write(self):
        self.header()
        self.goals()
        self.transport()
        self.codecs()
        self.vm()
        self.protect()
        self.faults()
        self.migration()
        with open(self.out_md, "w") as fh:
            fh.write("\n".join(self.md))
        return self.images


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", action="append",
                    help="results directory; repeated: older campaigns (newest first) for the benchmarks the first did "
                         "not run and the goals' previous figures (default: the newest docs/results/bench-*, with the "
                         "older ones)")
    ap.add_argument("--and-older", action="store_true",
                    help="after the --results directories, the stored docs/results/bench-* older than the first")
    ap.add_argument("--out-md", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--img-dir", default=os.path.join(ROOT, "docs", "benchmarks"))
    a = ap.parse_args()
    dirs = [os.path.abspath(x) for x in a.results] if a.results else campaigns()
    if a.results and a.and_older:
        stored = campaigns()
        dirs += stored[stored.index(dirs[0]) + 1:] if dirs[0] in stored else [x for x in stored if x not in dirs]
    images = Report(dirs, a.out_md, a.img_dir).write()
    print("bench_report: wrote %s and %d figures from %s" % (a.out_md, len(images), os.path.relpath(dirs[0], ROOT)))


if __name__ == "__main__":
    main()
