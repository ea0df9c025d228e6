#!/usr/bin/python3
"""Runs every benchmark and stores the results for the report (`make bench`).

usage: bench_run.py [--quick] [--only STEP,...] [--goals GOAL,...] [--out DIR] [--no-report]

Steps (each writes JSON beside its printed tables; its output goes to DIR/<step>.log):
  transport  cargo bench -p transport --bench throughput           -> transport.json
  codecs     cargo bench -p replication-proto --bench codecs        -> codecs.json
  vm         cargo bench -p vmm --bench vm                          -> vm.json
  protect    cargo bench -p testbed --bench protect                 -> protect.json
  migrate    target/release/testbed migrate-bench                   -> migrate.json, migrate.md
  faults     target/release/testbed faults                          -> faults.json
  goals      issue 16's goals, "before" and "now" alternating in one run (see goal_runs):
             the protect bench (kv, pause, dirty) with BENCH_VARIANTS  -> goals-kv.json,
             goals-pause.json, goals-dirty.json; `testbed faults --points kill.untuned` with and
             without the backup's inbound log and LAN copies, in alternating chunks -> goals-faults-untuned.json,
             goals-faults-untuned-before.json (chunks in goals-parts/); the tuned kill points
             -> goals-faults-tuned.json. Each sub-run's log is DIR/goals-<name>.log; the step's
             entry in meta.json records every command line (`runs`, `commands`). --goals
             kv,pause,dirty,faults-untuned,faults-tuned: only some of them.
--quick runs fewer points and configurations, 3 runs each (see step_command). DIR defaults to
docs/results/bench-<UTC date>[-N]. DIR/meta.json records the commit (and whether the tree had
changes), the time, the machine's cores and load average, and per step its command, how long it
took, its exit status and what else ran: the cores used by processes other than this runner and
its children over the step (machine busy time from /proc/stat minus our children's CPU time),
and the other processes that used the most. Then docs/benchmarks.md and its plots are
regenerated from DIR (bench_report.py) unless --no-report.

Needs root and /dev/kvm (protect, migrate, faults), `make guest` and the release binaries
(`make bench` builds them first). A step that fails is recorded as failed; the others go on.
"""
import argparse, datetime, json, os, resource, shlex, subprocess, sys, time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
STEPS = ["transport", "codecs", "vm", "protect", "migrate", "faults", "goals"]

# Issue 16's "before": the policy and pause of the session that filed it (adaptive 10-50 ms
# epochs that output does not end, one copy thread, every dirty page write-protected again at
# every checkpoint); "now": today's defaults. --epoch-min-ms 10 is the old default (now 1); with
# fixed epochs (pause, dirty) it does nothing.
# (--output-burst-end, on by default since session 12, acts only inside the output window, which
# --output-coalesce-us 0 removes: "before" needs no flag for it.)
GOALS_VARIANTS = ("before=--epoch-min-ms 10 --output-coalesce-us 0 --output-idle-end false "
                  "--pause-copy-threads 1 --hot-page-epochs 0 --pause-rt-priority 0 --epoch-precopy-us 0;now=")
GOALS_SEED = 20261216
# kill.untuned runs per chunk: "now" (inbound log on) and "before" (--no-inbound-log) alternate
# chunk by chunk, each chunk's pair with the same seed (the same fault moments).
GOALS_CHUNK = 5


def step_command(name, quick, out):
    """(argv, extra env) of one step; JSON results go under `out`."""
    j = os.path.join(out, name + ".json")
    env = {"BENCH_JSON": j}
    if name == "transport":
        if quick:
            env.update(BENCH_MIB="128", BENCH_RUNS="3")
        return ["cargo", "bench", "-p", "transport", "--bench", "throughput"], env
    if name == "codecs":
        return ["cargo", "bench", "-p", "replication-proto", "--bench", "codecs"], env
    if name == "vm":
        return ["cargo", "bench", "-p", "vmm", "--bench", "vm"], env
    if name == "protect":
        env["BENCH_NO_BUILD"] = "1"
        if quick:
            # Four pause points (~10, ~100, ~1,000 and ~10,000 pages), fixed 10 ms and the default
            # adaptive epochs, 3 runs each (the full campaign: 6 points, 40/20/10/5 ms).
            env.update(BENCH_RUNS="3", BENCH_POINTS="0,1,4,5", BENCH_EPOCHS_MS="10,adaptive", BENCH_WINDOW_S="3")
        return ["cargo", "bench", "-p", "testbed", "--bench", "protect"], env
    if name == "migrate":
        argv = ["target/release/testbed", "migrate-bench", "--json", j, "--out", os.path.join(out, "migrate.md")]
        if quick:
            argv += ["--workloads", "W1,W3", "--runs", "3",
                     "--configs", "qemu-best,qemu-best-tls,precopy,stopcopy,postcopy,auto"]
        else:
            argv += ["--workloads", "W1,W2,W3", "--runs", "5"]
        return argv, {}
    if name == "goals":
        return None, {}  # several commands: goal_runs
    if name == "faults":
        logs = os.path.join("/tmp", "bench-faults-logs-%d" % os.getpid())
        argv = ["target/release/testbed", "faults", "--out", j, "--logs", logs, "--seed", "20261206"]
        if quick:
            argv += ["--runs", "3", "--points",
                     "kill,primary.acked,committed-unacked,backup,witness,partition,link.loss,migrate.dest-kill"]
        else:
            argv += ["--runs", "5"]
        return argv, {}
    raise SystemExit("unknown step %r (steps: %s)" % (name, ", ".join(STEPS)))


def goal_runs(quick, out):
    """The goals step's sub-runs, in order: [(name, argv, extra env, JSON path)], and the
    copy-pasteable command of each goal's results file, by file name (what the report shows)."""
    protect = ["cargo", "bench", "-p", "testbed", "--bench", "protect"]
    base = {"BENCH_NO_BUILD": "1", "BENCH_VARIANTS": GOALS_VARIANTS}
    runs = []
    for name, env in (
            ("kv", dict(BENCH_ONLY="kv", BENCH_EPOCHS_MS="adaptive", BENCH_RUNS="3" if quick else "5")),
            ("pause", dict(BENCH_ONLY="pause", BENCH_POINTS="4", BENCH_RUNS="3")),  # ~1,000 pages @50 ms
            ("dirty", dict(BENCH_ONLY="dirty", BENCH_EPOCHS_MS="10,5", BENCH_RUNS="2" if quick else "3"))):
        j = os.path.join(out, "goals-%s.json" % name)
        runs.append((name, protect, dict(env, **base, BENCH_JSON=j), j))
    faults = ["target/release/testbed", "faults"]
    parts = os.path.join(out, "goals-parts")
    chunks = (10 if quick else 20) // GOALS_CHUNK
    for c in range(chunks):
        seed = str(GOALS_SEED + c)
        pair = []
        for name, extra in (("faults-untuned", []), ("faults-untuned-before", ["--no-inbound-log", "--no-lan-copy"])):
            j = os.path.join(parts, "%s-%s.json" % (name, seed))
            pair.append((name, faults + ["--points", "kill.untuned", "--runs", str(GOALS_CHUNK), "--seed", seed]
                         + extra + ["--out", j], {}, j))
        runs += pair if c % 2 == 0 else pair[::-1]  # who goes first alternates too
    j = os.path.join(out, "goals-faults-tuned.json")
    runs.append(("faults-tuned", faults + ["--points", "kill,primary.paused,primary.acked", "--runs", "5",
                                           "--seed", str(GOALS_SEED), "--out", j], {}, j))
    commands = {os.path.basename(j): shown_command(argv, env, out)
                for name, argv, env, j in runs if not name.startswith("faults-untuned")}
    seeds = " ".join(str(GOALS_SEED + c) for c in range(chunks))
    for name, extra in (("faults-untuned", ""), ("faults-untuned-before", " --no-inbound-log --no-lan-copy")):
        commands["goals-%s.json" % name] = (
            "for seed in %s; do target/release/testbed faults --points kill.untuned --runs %d --seed $seed%s "
            "--out %s/%s-$seed.json; done" % (seeds, GOALS_CHUNK, extra, shown_path(parts), name))
    return runs, commands


def merge_faults(files, path):
    """One `testbed faults` report from several (the chunks of one variant): their runs in
    order, the seeds listed."""
    parts = [load_json(x) for x in files if os.path.isfile(x)]
    if not parts:
        return False
    merged = dict(parts[0])
    merged["runs"] = [r for p in parts for r in p.get("runs", [])]
    merged["seeds"] = [p.get("seed") for p in parts]
    merged["runs_per_point"] = sum(p.get("runs_per_point") or 0 for p in parts)
    merged["parts"] = [os.path.relpath(x, os.path.dirname(path)) for x in files if os.path.isfile(x)]
    merged.pop("summary_markdown", None)
    with open(path, "w") as fh:
        json.dump(merged, fh, indent=1)
    return True


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine_busy_s():
    """Busy CPU seconds of the whole machine so far (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / hz  # without idle and iowait


def children_cpu_s():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def process_cpu():
    """{pid: (name, CPU seconds)} of every process now."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                s = f.read()
        except OSError:
            continue
        name = s[s.find("(") + 1:s.rfind(")")]
        fields = s[s.rfind(")") + 2:].split()
        out[int(pid)] = (name, (float(fields[11]) + float(fields[12])) / hz)
    return out


class Window:
    """What the machine did between start() and stop(), apart from this runner and its children."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.time(), machine_busy_s(), children_cpu_s()
        self.load0, self.procs0 = loadavg(), process_cpu()

    def stop(self):
        secs = max(time.time() - self.t0, 1e-3)
        own = children_cpu_s() - self.own0
        others = (machine_busy_s() - self.busy0 - own) / secs
        now, me = process_cpu(), os.getpid()
        top = []
        for pid, (name, c1) in now.items():
            if pid == me or pid not in self.procs0:
                continue
            d = c1 - self.procs0[pid][1]
            if d > 0.02 * secs:
                top.append({"process": "%s (pid %d)" % (name, pid), "cores": round(d / secs, 3)})
        top.sort(key=lambda x: -x["cores"])
        return {"secs": round(secs, 1), "load_before": self.load0, "load_after": loadavg(),
                "others_cores": round(max(others, 0.0), 2), "others_top": top[:6]}


def git(*args):
    r = subprocess.run(["git", "-C", ROOT] + list(args), capture_output=True, text=True)
    return r.stdout.strip()


def default_out():
    base = os.path.join(ROOT, "docs", "results", "bench-" + datetime.datetime.utcnow().strftime("%Y-%m-%d"))
    out, n = base, 2
    while os.path.exists(out):
        out, n = "%s-%d" % (base, n), n + 1
    return out


def shown_path(path):
    """`path` relative to the workspace root when it is under it (commands run from there)."""
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def shown_command(argv, env, out):
    """`argv` with `env` in front, copy-pasteable from the workspace root (paths under `out`
    relative to it)."""
    rel = lambda a: shown_path(a) if a.startswith(out) else a
    shown = " ".join("%s=%s" % (k, shlex.quote(rel(v))) for k, v in env.items())
    return (shown + " " if shown else "") + " ".join(shlex.quote(rel(a)) for a in argv)


# `make bench`'s own variables. make exports command-line variables to its recipes, so they
# reach this runner's environment; the benches must not see them: the protect bench reads
# BENCH_ONLY as its own sections (`make bench BENCH_ONLY=protect` once ran no section at all).
CAMPAIGN_VARS = ("BENCH_ONLY", "BENCH_QUICK", "BENCH_GOALS")


def child_env(env):
    """The environment of a step's command: ours without the campaign's variables, plus `env`."""
    base = {k: v for k, v in os.environ.items() if k not in CAMPAIGN_VARS}
    return dict(base, **env)


def run_one(argv, env, log):
    """Runs one command from the workspace root, its output to `log`: (exit status, what the
    machine did meanwhile)."""
    w = Window()
    with open(log, "w") as f:
        rc = subprocess.run(argv, cwd=ROOT, env=child_env(env), stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, w.stop()


def run_step(name, quick, out, goals=None):
    if name == "goals":
        return run_goals(quick, out, goals)
    argv, env = step_command(name, quick, out)
    log = os.path.join(out, name + ".log")
    command = shown_command(argv, env, out)
    print("bench: %s: %s" % (name, command), flush=True)
    started = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
    rc, took = run_one(argv, env, log)
    result = os.path.join(out, name + ".json")
    step = {"step": name, "command": command, "started": started, "exit": rc, "log": name + ".log",
            "results": name + ".json" if os.path.exists(result) else None, **took}
    print("bench: %s: exit %d in %.0f s; other processes used %.2f cores" % (name, rc, took["secs"], took["others_cores"]),
          flush=True)
    return step


GOALS = ["kv", "pause", "dirty", "faults-untuned", "faults-tuned"]


def run_goals(quick, out, only=None):
    """The goals step: every sub-run of goal_runs in turn (only those of the goals named in
    `only`, if given; a failed one is recorded, the others go on), then the kill.untuned chunks
    merged per variant."""
    runs, commands = goal_runs(quick, out)
    if only:
        runs = [r for r in runs if r[0].replace("-before", "") in only]
        commands = {k: v for k, v in commands.items() if k[len("goals-"):-len(".json")].replace("-before", "") in only}
    os.makedirs(os.path.join(out, "goals-parts"), exist_ok=True)
    started = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
    whole = Window()
    done = []
    step = lambda: {"step": "goals", "command": "\n".join(commands.values()), "started": started,
                    "exit": next((r["exit"] for r in done if r["exit"] != 0), 0), "log": None,
                    "results": sorted(f for f in commands if os.path.exists(os.path.join(out, f))) or None,
                    "variants": GOALS_VARIANTS, "commands": commands, "runs": done}
    try:
        run_goal_list(runs, out, done)
    except KeyboardInterrupt:
        merge_untuned(runs, out)
        raise Interrupted(dict(step(), interrupted=True, **whole.stop()))
    merge_untuned(runs, out)
    return dict(step(), **whole.stop())


class Interrupted(KeyboardInterrupt):
    """An interrupt in the middle of a step, with what the step recorded so far."""

    def __init__(self, step):
        super().__init__()
        self.step = step


def merge_untuned(runs, out):
    for name in ("faults-untuned", "faults-untuned-before"):
        merge_faults([j for n, _, _, j in runs if n == name], os.path.join(out, "goals-%s.json" % name))


def run_goal_list(runs, out, done):
    """Runs the goals' commands in turn, appending each one's record to `done`."""
    for i, (name, argv, env, j) in enumerate(runs):
        log = os.path.basename(j)[:-len(".json")] + ".log"
        log = log if log.startswith("goals-") else "goals-" + log
        command = shown_command(argv, env, out)
        print("bench: goals %d/%d: %s" % (i + 1, len(runs), command), flush=True)
        t0 = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
        rc, took = run_one(argv, env, os.path.join(out, log))
        seed = argv[argv.index("--seed") + 1] if name.startswith("faults-untuned") else None
        done.append({"name": name, "seed": seed, "command": command, "started": t0, "exit": rc, "log": log,
                     "results": os.path.relpath(j, out) if os.path.exists(j) else None, **took})
        print("bench: goals %s: exit %d in %.0f s; other processes used %.2f cores" % (
            name, rc, took["secs"], took["others_cores"]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs and points")
    ap.add_argument("--only", default=",".join(STEPS), help="comma-separated steps (default: all)")
    ap.add_argument("--out", help="results directory (default docs/results/bench-<date>)")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate docs/benchmarks.md")
    ap.add_argument("--goals", help="the goals step runs only these goals (comma-separated: %s)" % ",".join(GOALS))
    a = ap.parse_args()
    steps = [s.strip() for s in a.only.split(",") if s.strip()]
    goals = [g.strip() for g in (a.goals or "").split(",") if g.strip()]
    for g in goals:
        if g not in GOALS:
            raise SystemExit("unknown goal %r (goals: %s)" % (g, ", ".join(GOALS)))
    for s in steps:
        step_command(s, a.quick, "/")  # unknown names fail before anything runs
    out = os.path.abspath(a.out or default_out())
    os.makedirs(out, exist_ok=True)
    meta = {
        "commit": git("rev-parse", "--short", "HEAD"),
        "tree_changed": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs")),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "started": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
        "quick": a.quick,
        "command": "make bench" + (" BENCH_QUICK=1" if a.quick else ""),
        "cores": os.cpu_count(),
        "kernel": os.uname().release,
        "steps": [],
    }
    path = os.path.join(out, "meta.json")
    whole = Window()
    try:
        for s in steps:
            meta["steps"].append(run_step(s, a.quick, out, goals))
            with open(path, "w") as f:  # rewritten after every step: an interrupted campaign keeps what ran
                json.dump(meta, f, indent=1)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            meta["steps"].append(e.step)
        meta["interrupted"] = True
        with open(path, "w") as f:
            json.dump(meta, f, indent=1)
        sys.exit("bench: interrupted; the steps that ended are in %s (`make bench-report` reports them)"
                 % os.path.relpath(out, ROOT))
    meta["whole"] = whole.stop()
    meta["finished"] = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    print("bench: results in %s (%.0f s, other processes %.2f cores on average)" % (
        os.path.relpath(out, ROOT), meta["whole"]["secs"], meta["whole"]["others_cores"]), flush=True)
    failed = [s["step"] for s in meta["steps"] if s["exit"] != 0]
    if not a.no_report:
        rc = subprocess.run([sys.executable, os.path.join(ROOT, "testbed", "scripts", "bench_report.py"),
                             "--results", out, "--and-older"]).returncode
        if rc != 0:
            sys.exit(rc)
    if failed:
        sys.exit("bench: failed steps: %s (see their logs in %s)" % (", ".join(failed), os.path.relpath(out, ROOT)))


if __name__ == "__main__":
    main()
