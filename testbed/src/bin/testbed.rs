//! `testbed`: the testbed's command line. `testbed faults --runs N [--points a,b] [--out f.json]`
//! runs the fault-injection harness (`testbed::faults`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use testbed::faults::{self, Point};

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
        /// Comma-separated points: kill, primary.paused, primary.harvest, primary.shipped,
        /// primary.acked, backup.committed, witness, partition, netem (default: all).
        #[arg(long, value_delimiter = ',')]
        points: Vec<String>,
        /// Write the JSON report here (rewritten after every run).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Copy each run's logs to DIR/<point>-<n>/.
        #[arg(long)]
        logs: Option<PathBuf>,
        /// Bound of one run, seconds.
        #[arg(long, default_value_t = 45)]
        run_timeout_s: u64,
        /// Bound of the whole command, seconds (no new run starts after it).
        #[arg(long, default_value_t = 3600)]
        total_timeout_s: u64,
        /// Seed of the random fault moments (default: from the clock; printed in the report).
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Faults { runs, points, out, logs, run_timeout_s, total_timeout_s, seed } => {
            let points = if points.is_empty() {
                Point::ALL.to_vec()
            } else {
                points.iter().map(|p| Point::parse(p)).collect::<anyhow::Result<Vec<_>>>()?
            };
            let mut opts = faults::Options::new(runs, points);
            opts.out = out;
            opts.logs = logs;
            opts.run_timeout = Duration::from_secs(run_timeout_s);
            opts.total_timeout = Duration::from_secs(total_timeout_s);
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
    }
    Ok(())
}
