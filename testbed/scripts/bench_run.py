#!/usr/bin/python3
"""Runs every benchmark and stores the results for the report (`make bench`).

usage: bench_run.py [--quick] [--only STEP,...] [--out DIR] [--no-report]

Steps (each writes JSON beside its printed tables; its output goes to DIR/<step>.log):
  transport  cargo bench -p transport --bench throughput           -> transport.json
  codecs     cargo bench -p replication-proto --bench codecs        -> codecs.json
  vm         cargo bench -p vmm --bench vm                          -> vm.json
  protect    cargo bench -p testbed --bench protect                 -> protect.json
  migrate    target/release/testbed migrate-bench                   -> migrate.json, migrate.md
  faults     target/release/testbed faults                          -> faults.json
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
STEPS = ["transport", "codecs", "vm", "protect", "migrate", "faults"]


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


def run_step(name, quick, out):
    argv, env = step_command(name, quick, out)
    log = os.path.join(out, name + ".log")
    shown = " ".join("%s=%s" % (k, shlex.quote(os.path.relpath(v, ROOT) if k == "BENCH_JSON" else v))
                     for k, v in env.items())
    command = (shown + " " if shown else "") + " ".join(
        shlex.quote(os.path.relpath(a, ROOT) if a.startswith(out) else a) for a in argv)
    print("bench: %s: %s" % (name, command), flush=True)
    started = datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC")
    w = Window()
    with open(log, "w") as f:
        rc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, **env), stdout=f, stderr=subprocess.STDOUT).returncode
    took = w.stop()
    result = os.path.join(out, name + ".json")
    step = {"step": name, "command": command, "started": started, "exit": rc, "log": name + ".log",
            "results": name + ".json" if os.path.exists(result) else None, **took}
    print("bench: %s: exit %d in %.0f s; other processes used %.2f cores" % (name, rc, took["secs"], took["others_cores"]),
          flush=True)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs and points")
    ap.add_argument("--only", default=",".join(STEPS), help="comma-separated steps (default: all)")
    ap.add_argument("--out", help="results directory (default docs/results/bench-<date>)")
    ap.add_argument("--no-report", action="store_true", help="do not regenerate docs/benchmarks.md")
    a = ap.parse_args()
    steps = [s.strip() for s in a.only.split(",") if s.strip()]
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
            meta["steps"].append(run_step(s, a.quick, out))
            with open(path, "w") as f:  # rewritten after every step: an interrupted campaign keeps what ran
                json.dump(meta, f, indent=1)
    except KeyboardInterrupt:
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
                             "--results", out]).returncode
        if rc != 0:
            sys.exit(rc)
    if failed:
        sys.exit("bench: failed steps: %s (see their logs in %s)" % (", ".join(failed), os.path.relpath(out, ROOT)))


if __name__ == "__main__":
    main()
