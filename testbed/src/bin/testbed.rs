//! `testbed`: the testbed's command line. `testbed faults --runs N [--points a,b] [--out f.json]`
//! runs the fault-injection harness (`testbed::faults`); `testbed impair ...` (hidden) is the
//! harness's UDP link impairment proxy (`testbed::impair`); `testbed migrate-bench --workloads
//! W1,W2,W3 --runs N [--configs ...] [--out table.md]` runs live migrations side by side with
//! QEMU (`testbed::migrate_bench`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use testbed::faults::{self, Point};
use testbed::impair;
use testbed::migrate_bench::{self, Config, Workload};

#[derive(Parser)]
#[command(name = "testbed", about = "Understudy's testbed")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fault injection: boot kv protected with arbitration in its own namespaces, drive a checker
    /// client, inject each fault, check no acknowledged write is lost and no reply contradicted,
    /// measure failover. Needs root, /dev/kvm, iproute2 and the built binaries.
    Faults {
        /// Runs per fault point.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Comma-separated points: kill, kill.untuned (an untuned client: no rto_min, no thin-stream option), primary.paused, primary.harvest, primary.shipped,
        /// primary.acked, committed-unacked, backup.committed, backup, witness, partition,
        /// partition.p-b, partition.p-w, partition.b-w, netem, link.loss, link.delay, link.dup,
        /// link.corrupt, link.mix, resync, resync.late, and live migration's
        /// migrate.dest-kill-precopy, migrate.source-kill-precopy, migrate.partition,
        /// migrate.link, migrate.dest-kill (default: all).
        #[arg(long, value_delimiter = ',')]
        points: Vec<String>,
        /// Write the JSON report here (rewritten after every run).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Copy each run's logs to DIR/<point>-<n>/.
        #[arg(long)]
        logs: Option<PathBuf>,
        /// Bound of one run, seconds (the re-sync points get at least 90).
        #[arg(long, default_value_t = 45)]
        run_timeout_s: u64,
        /// Bound of the whole command, seconds (no new run starts after it).
        #[arg(long, default_value_t = 3600)]
        total_timeout_s: u64,
        /// Seed of the random fault moments (default: from the clock; printed in the report).
        #[arg(long)]
        seed: Option<u64>,
        /// The replication link's detection time, ms (heartbeats every 10 ms).
        #[arg(long, default_value_t = faults::DEFAULT_DETECT_MS)]
        detect_ms: u64,
        /// Run the backup with `--no-prepare-vm` (promotion builds the VM; the A/B of preparing it).
        #[arg(long)]
        no_prepare_vm: bool,
        /// Run the backup with `--inbound-log-frames 0`: no input replay at promotion (the A/B
        /// of the inbound log; what an older backup does).
        #[arg(long)]
        no_inbound_log: bool,
        /// A LAN that learns the guest's address (its frames reach the primary's host only) and
        /// a backup without `--lan-copy` (the A/B of LAN copies). By default the LAN floods the
        /// guest's address to both hosts and the backup keeps LAN copies.
        #[arg(long)]
        no_lan_copy: bool,
        /// One more argument for `understudy protect` (repeat for more), e.g.
        /// `--protect-arg=--output-burst-end=true`.
        #[arg(long = "protect-arg", allow_hyphen_values = true)]
        protect_args: Vec<String>,
    },
    /// Live migration side by side with QEMU: the same guest, memory and workload under QEMU
    /// (`-M microvm -accel kvm`, migrated over QMP) and `understudy migrate`, configurations
    /// interleaved run by run; prints a markdown table of medians. Needs /dev/kvm and QEMU; W3
    /// needs root (a network namespace with TAP devices) and python3. Our configurations are
    /// skipped, loudly, while `understudy migrate` does not exist.
    MigrateBench {
        /// Comma-separated: W1 (dirty wss=64 rate=20000, 256 MiB), W2 (dirty wss=128
        /// rate=200000, 512 MiB), W3 (kv, 64 MiB, under a client's load).
        #[arg(long, value_delimiter = ',', default_value = "W1,W2,W3")]
        workloads: Vec<String>,
        /// Runs per configuration (median of them).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Comma-separated: qemu-default, qemu-best, qemu-postcopy, qemu-best-tls,
        /// qemu-postcopy-tls and our modes (precopy, stopcopy, postcopy, demand, hybrid, auto;
        /// postcopy-noreverse, demand-noreverse, hybrid-noreverse, auto-noreverse: the same
        /// with `--no-reverse`). Default: every QEMU configuration and all of ours.
        #[arg(long, value_delimiter = ',')]
        configs: Vec<String>,
        /// Write the markdown report here too (rewritten after every run).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write every run's numbers as JSON here (rewritten after every run).
        #[arg(long)]
        json: Option<PathBuf>,
        /// At the end, plot each workload's throughput over time through each configuration's
        /// migration into DIR/migration-<workload>.png (testbed/scripts/plot_migration.py,
        /// python3-matplotlib; the same script redraws them from a --json file).
        #[arg(long, value_name = "DIR")]
        plots: Option<PathBuf>,
        /// The understudy binary (default: target/release/understudy of this workspace).
        #[arg(long)]
        understudy: Option<PathBuf>,
        /// The guest image (default: target/guest/understudy-guest).
        #[arg(long)]
        guest: Option<PathBuf>,
        /// A QEMU migration still copying after this many seconds is cancelled (did not converge).
        #[arg(long, default_value_t = 30)]
        converge_timeout_s: u64,
        /// Keep the run directories (logs, serial output) and print where.
        #[arg(long)]
        keep: bool,
    },
    /// The harness's UDP impairment proxy (run by `testbed faults` inside a namespace): forwards
    /// datagrams between LISTEN's client and TO, with loss, delay ± jitter, duplication and
    /// corruption (percentages) while its window is open, deterministically from the seed.
    #[command(hide = true)]
    Impair {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        /// Percent of datagrams dropped.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
        /// Percent of datagrams sent twice.
        #[arg(long, default_value_t = 0.0)]
        dup: f64,
        /// Percent of datagram copies with 1-3 bytes flipped.
        #[arg(long, default_value_t = 0.0)]
        corrupt: f64,
        /// Delay without reordering (a datagram never overtakes an earlier one).
        #[arg(long)]
        keep_order: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Open the window when this file appears (default: at start).
        #[arg(long)]
        start_file: Option<PathBuf>,
        /// Close the window after this many ms (default: never).
        #[arg(long)]
        window_ms: Option<u64>,
        /// Also relay TCP connections to TO (unimpaired).
        #[arg(long)]
        tcp: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Faults {
            runs,
            points,
            out,
            logs,
            run_timeout_s,
            total_timeout_s,
            seed,
            detect_ms,
            no_prepare_vm,
            no_inbound_log,
            no_lan_copy,
            protect_args,
        } => {
            let points = Point::parse_list(&points)?;
            let mut opts = faults::Options::new(runs, points);
            opts.out = out;
            opts.logs = logs;
            opts.run_timeout = Duration::from_secs(run_timeout_s);
            opts.total_timeout = Duration::from_secs(total_timeout_s);
            opts.detect_ms = detect_ms;
            opts.no_prepare_vm = no_prepare_vm;
            opts.no_inbound_log = no_inbound_log;
            opts.no_lan_copy = no_lan_copy;
            opts.protect_args = protect_args;
            if let Some(s) = seed {
                opts.seed = s | 1;
            }
            eprintln!("testbed faults: seed {}", opts.seed);
            let reports = faults::run(&opts)?;
            println!("{}", faults::summary(&reports));
            let failed = reports.iter().filter(|r| r.outcome == "fail").count();
            if failed > 0 {
                eprintln!("testbed faults: {failed} run(s) failed");
                std::process::exit(1);
            }
        }
        Cmd::MigrateBench {
            workloads,
            runs,
            configs,
            out,
            json,
            plots,
            understudy,
            guest,
            converge_timeout_s,
            keep,
        } => {
            let workloads = workloads.iter().map(|w| Workload::parse(w)).collect::<anyhow::Result<Vec<_>>>()?;
            let configs = if configs.is_empty() {
                Config::defaults()
            } else {
                configs.iter().map(|c| Config::parse(c)).collect::<anyhow::Result<Vec<_>>>()?
            };
            anyhow::ensure!(runs > 0, "--runs must be at least 1");
            let mut opts = migrate_bench::Options::new(workloads, configs, runs);
            opts.out = out;
            opts.json = json;
            opts.plots = plots;
            if let Some(u) = understudy {
                opts.understudy = u;
            }
            opts.guest = guest;
            opts.converge_timeout = Duration::from_secs(converge_timeout_s);
            opts.keep = keep;
            opts.command = std::env::args().collect::<Vec<_>>().join(" ");
            let report = migrate_bench::run(&opts)?;
            println!("{}", report.markdown());
        }
        Cmd::Impair {
            listen,
            to,
            loss,
            delay_ms,
            jitter_ms,
            dup,
            corrupt,
            keep_order,
            seed,
            start_file,
            window_ms,
            tcp,
        } => {
            let pct = |x: f64, what: &str| -> anyhow::Result<f64> {
                anyhow::ensure!((0.0..=100.0).contains(&x), "--{what} is a percentage (0-100), not {x}");
                Ok(x / 100.0)
            };
            let cfg = impair::Config {
                listen,
                to,
                impairment: impair::Impairment {
                    loss: pct(loss, "loss")?,
                    delay: Duration::from_millis(delay_ms),
                    jitter: Duration::from_millis(jitter_ms),
                    dup: pct(dup, "dup")?,
                    corrupt: pct(corrupt, "corrupt")?,
                    keep_order,
                },
                seed,
                start_file,
                window: window_ms.map(Duration::from_millis),
                tcp,
            };
            impair::run(&cfg)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(args: &[&str]) -> anyhow::Result<Vec<Point>> {
        let cli = Cli::try_parse_from(["testbed", "faults"].iter().chain(args))?;
        let Cmd::Faults { points, .. } = cli.cmd else { unreachable!("a faults command") };
        Point::parse_list(&points)
    }

    #[test]
    fn points_parse_from_the_command_line() {
        assert_eq!(points(&["--points", "resync,resync.late"]).unwrap(), [Point::Resync, Point::ResyncLate]);
        assert_eq!(points(&["--points", "kill", "--points", "resync"]).unwrap(), [Point::Kill, Point::Resync]);
        assert_eq!(
            points(&["--points", "migrate.dest-kill-precopy,migrate.dest-kill"]).unwrap(),
            [Point::MigrateDestKillPrecopy, Point::MigrateDestKill]
        );
        assert_eq!(points(&[]).unwrap(), Point::ALL);
        let e = points(&["--points", "resync,resync.early"]).unwrap_err().to_string();
        assert!(e.contains("unknown fault point \"resync.early\"") && e.contains("resync.late"), "{e}");
    }
}
