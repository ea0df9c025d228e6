//! `understudy`: hot-standby replication for KVM virtual machines. This binary is thin: it
//! parses, wires and reports; the logic lives in the library crates.

mod config;
mod migrate;
mod progress;
mod protect;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};

use node::api::{self, AfterSnapshot, Request};
use node::arbitration::AgentArgs;
use node::status::Origin;
use node::{Node, SerialTarget};

#[derive(Parser)]
#[command(name = "understudy", version, about = "Hot-standby replication for KVM virtual machines")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM from a kernel and run it until it stops or is told to.
    Run {
        #[arg(long, value_name = "FILE", help = config::HELP)]
        config: Option<PathBuf>,
        /// ELF kernel with a PVH entry (e.g. target/guest/understudy-guest).
        #[arg(long)]
        kernel: PathBuf,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Guest memory: a size with a K/M/G suffix (256M), or bytes (at least 1 MiB).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// COM1 output: `stdout`, `none` or a file path (appended).
        #[arg(long, default_value = "stdout")]
        serial: SerialTarget,
        /// Admin API socket (created with mode 0600).
        #[arg(long)]
        api: Option<PathBuf>,
        /// Attach a virtio-net device backed by this TAP device (created if missing).
        #[arg(long)]
        tap: Option<String>,
        /// The guest's MAC address (with --tap), e.g. 02:55:44:00:00:01.
        #[arg(long, value_parser = parse_mac)]
        mac: Option<[u8; 6]>,
        /// The VM's name (the arbitration group and the backup know it by this name).
        #[arg(long, default_value = "vm")]
        vm: String,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9400). Only a loopback
        /// address unless --metrics-public.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Allow --metrics on a non-loopback address (the endpoint is unauthenticated: anyone
        /// who reaches it learns the VM's state and numbers).
        #[arg(long, requires = "metrics")]
        metrics_public: bool,
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Write a snapshot (memory + state) of a running VM into a directory.
    Snapshot {
        /// The VM's admin API socket.
        #[arg(long)]
        api: PathBuf,
        /// What the VM does afterwards.
        #[arg(long, value_enum, default_value = "resume")]
        then: AfterSnapshot,
        /// Target directory.
        dir: PathBuf,
    },
    /// Bring a snapshot back to life in this process.
    Restore {
        /// Snapshot directory.
        dir: PathBuf,
        /// COM1 output: `stdout`, `none` or a file path (appended).
        #[arg(long, default_value = "stdout")]
        serial: SerialTarget,
        /// Admin API socket (created with mode 0600).
        #[arg(long)]
        api: Option<PathBuf>,
        /// Stay paused after restoring (resume through the API).
        #[arg(long)]
        paused: bool,
        /// TAP device for the saved virtio-net device.
        #[arg(long)]
        tap: Option<String>,
    },
    /// Show what a VM is doing.
    Status {
        /// The VM's admin API socket.
        #[arg(long)]
        api: PathBuf,
        /// Print JSON instead of text (the schema: docs/operations.md, "Status").
        #[arg(long)]
        json: bool,
        /// Refresh every this many seconds until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<f64>,
    },
    /// Pause, resume, stop a VM, digest its memory or read its verification journal.
    Ctl {
        /// The VM's admin API socket.
        #[arg(long)]
        api: PathBuf,
        /// pause | resume | shutdown | memory-digest | verify-journal | output-journal
        action: String,
    },
    /// Start protecting a running VM: checkpoint it to a backup every epoch, hold its output
    /// until the backup has the state that produced it.
    Protect {
        /// The VM's admin API socket.
        #[arg(long)]
        api: PathBuf,
        #[command(flatten)]
        req: node::protect::ProtectRequest,
        /// Follow the sync until the VM is protected (progress on stderr: a line that updates
        /// on a terminal, a line per round otherwise); exit non-zero if protection degrades or
        /// fails first. Interrupting only stops following: protection goes on.
        #[arg(long)]
        wait: bool,
    },
    /// Stop protecting a VM.
    Unprotect {
        /// The VM's admin API socket.
        #[arg(long)]
        api: PathBuf,
    },
    /// Run a backup: receive a protected VM's checkpoints into a replica.
    Backup {
        #[arg(long, value_name = "FILE", help = config::HELP)]
        config: Option<PathBuf>,
        /// Address to listen on (UDP, QUIC).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Directory with ca.pem and this host's certificate and key.
        #[arg(long)]
        certs: PathBuf,
        /// This host's certificate name.
        #[arg(long, default_value = "backup")]
        name: String,
        /// The certificate name of the primary to admit; any other peer is refused.
        #[arg(long, default_value = "primary")]
        primary_name: String,
        /// The protected VM's name (as given to `protect --vm`).
        #[arg(long, default_value = "vm")]
        vm: String,
        /// The protected VM's memory size.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        /// Admin API socket (created with mode 0600).
        #[arg(long)]
        api: Option<PathBuf>,
        /// TAP device for the VM once promoted.
        #[arg(long)]
        tap: Option<String>,
        /// COM1 output of the VM once promoted.
        #[arg(long, default_value = "stdout")]
        serial: SerialTarget,
        /// Digest the replica after every consistent commit (tests).
        #[arg(long)]
        verify: bool,
        /// Heartbeat interval to the primary, ms.
        #[arg(long, default_value_t = 20)]
        heartbeat_ms: u64,
        /// Silence after which the primary counts as gone, ms.
        #[arg(long, default_value_t = 1000)]
        detect_ms: u64,
        /// With arbitration: silence after which the primary is *suspect* and this backup asks
        /// the group for activity while the session goes on (the group grants it only once the
        /// primary's lease is over, and not while the primary still renews it). Default: half of
        /// --detect-ms; 0: ask only when the session ends.
        #[arg(long)]
        suspect_ms: Option<u64>,
        /// Do not build the VM over the replica ahead of promotion: promotion then takes 7-10
        /// ms longer, but this process dies ~15-20 ms faster (the primary notices a dead
        /// backup sooner and holds its output that much less).
        #[arg(long)]
        no_prepare_vm: bool,
        /// Most frames kept in the inbound log (frames the primary delivered after the replica's
        /// checkpoint, replayed at promotion); 0 keeps no log.
        #[arg(long, default_value_t = backup::inbound::DEFAULT_MAX_FRAMES)]
        inbound_log_frames: usize,
        /// Most bytes kept in the inbound log.
        #[arg(long, default_value = "8M", value_parser = parse_size)]
        inbound_log_bytes: u64,
        /// UDP port (on the --listen address's IP) where the primary also sends each frame as an
        /// authenticated datagram, so a frame is in the log even when the primary dies before
        /// the session's copy arrives; 0 takes any free port (announced to the primary).
        #[arg(long, default_value_t = 0)]
        side_copy_port: u16,
        /// Take no side copies (frames reach the inbound log by the replication session only).
        #[arg(long)]
        no_side_copy: bool,
        /// Hold --tap open while standing by and keep the frames the LAN hands it (LAN copies):
        /// promotion replays the ones the dead primary never delivered, so a request sent as
        /// it died is answered at once. Needs a TAP of this host's own (not one the primary
        /// uses) on a LAN that hands the guest's inbound frames to both hosts (a bridge that
        /// does not learn the guest's address, an overlay listing both hosts, a mirror port).
        #[arg(long, requires = "tap")]
        lan_copy: bool,
        /// Most frames kept in the output log (each epoch's output, until the primary releases
        /// it; a promoted replica writes those of its epochs the primary had not released);
        /// 0 keeps no log (the primary then sends none).
        #[arg(long, default_value_t = backup::output_log::DEFAULT_MAX_FRAMES)]
        output_log_frames: usize,
        /// Most bytes kept in the output log.
        #[arg(long, default_value = "8M", value_parser = parse_size)]
        output_log_bytes: u64,
        /// Promote by itself when the primary is gone. Without a witness this cannot tell a dead
        /// primary from a partition (split brain): use only where a partition is impossible
        /// (one host, the demo) until arbitration is configured.
        #[arg(long)]
        auto_promote: bool,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9401). Only a loopback
        /// address unless --metrics-public.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Allow --metrics on a non-loopback address (the endpoint is unauthenticated: anyone
        /// who reaches it learns the VM's state and numbers).
        #[arg(long, requires = "metrics")]
        metrics_public: bool,
        #[command(flatten)]
        agent: AgentArgs,
        #[command(flatten)]
        reprotect: node::reprotect::ReprotectArgs,
    },
    /// Run a witness: the third voter of the arbitration group, on a third host.
    Witness {
        #[arg(long, value_name = "FILE", help = config::HELP)]
        config: Option<PathBuf>,
        /// This witness's node id (by convention 3).
        #[arg(long, default_value_t = 3)]
        id: u64,
        /// Directory of its persisted raft state.
        #[arg(long)]
        data: PathBuf,
        /// UDP address to listen on (QUIC with mutual TLS).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The two agents (repeat): `ID=NAME@HOST:PORT`, NAME being the name in the agent's
        /// certificate. Arbitration runs only over QUIC with mutual TLS.
        #[arg(long = "peer", value_parser = node::arbitration::peer_arg)]
        peers: Vec<failover::net::PeerSpec>,
        /// Certificates (ca.pem and this host's pair) for the QUIC link.
        #[arg(long)]
        certs: Option<PathBuf>,
        /// This host's certificate name.
        #[arg(long, default_value = "witness")]
        name: String,
    },
    /// Turn a backup's replica into the running VM (by hand). With arbitration configured the
    /// group must grant it (it does once the primary's lease ran out); without, it promotes.
    Promote {
        /// The backup's admin API socket.
        #[arg(long)]
        api: PathBuf,
        /// Promote without the arbitration group's grant. If the primary is in fact alive,
        /// two copies of the guest then run and both release output (split brain); the
        /// promoted copy's output is not gated by any lease. For a group that lost its quorum
        /// for good, after making sure the primary is dead.
        #[arg(long)]
        force: bool,
    },
    /// Wait for one migration of a VM (`understudy migrate` on the source), then run it: this
    /// process is then the VM's process (same admin API).
    Receive {
        #[arg(long, value_name = "FILE", help = config::HELP)]
        config: Option<PathBuf>,
        /// Address to listen on (UDP, QUIC).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Directory with ca.pem and this host's certificate and key.
        #[arg(long)]
        certs: PathBuf,
        /// The guest's memory size (must equal the source's).
        #[arg(long, value_parser = parse_size)]
        memory: u64,
        /// This host's certificate name.
        #[arg(long, default_value = "dest")]
        name: String,
        /// The certificate name of the source to admit; any other peer is refused.
        #[arg(long, default_value = "src")]
        source_name: String,
        /// The VM's name (as the source runs it with `run --vm`).
        #[arg(long, default_value = "vm")]
        vm: String,
        /// Admin API socket (created with mode 0600).
        #[arg(long)]
        api: Option<PathBuf>,
        /// COM1 output of the VM once it runs here: `stdout`, `none` or a file path.
        #[arg(long, default_value = "stdout")]
        serial: SerialTarget,
        /// TAP device for the VM's net device once it runs here.
        #[arg(long)]
        tap: Option<String>,
        /// Record the received memory's digest at the switch-over (tests; costs downtime).
        #[arg(long)]
        verify: bool,
    },
    /// Move a running VM to a destination (`understudy receive` there). Returns once the guest
    /// runs at the destination (exit 0 with the report; the source process then exits) or the
    /// migration failed (non-zero; the guest runs on here, untouched).
    Migrate {
        /// The source VM's admin API socket.
        #[arg(long)]
        api: PathBuf,
        #[command(flatten)]
        args: node::migrate::MigrateArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a CA and certificates for the hosts (mutual TLS on every link).
    Certs {
        /// Output directory: ca.pem and each host's pair (never the CA key).
        #[arg(long)]
        out: PathBuf,
        /// A VM host (primary or backup) to issue a certificate for, role `host` (repeat);
        /// `NAME` or `NAME=SAN,SAN,...` (extra DNS names or IP addresses).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// A witness to issue a certificate for, role `witness`: arbitration only, never a
        /// replication session (repeat; same form as --host).
        #[arg(long = "witness")]
        witnesses: Vec<String>,
        /// Keep the CA key in this directory (ca.key 0600, ca.pem) to issue more hosts later;
        /// a CA already there signs. Without it the CA key is discarded.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("size {s:?} is not a number with an optional K/M/G suffix"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))?;
    // A bare small number is almost certainly meant in MiB (QEMU's `-m 256`): say so rather
    // than fail later on a 256-byte guest.
    if mult == 1 && bytes < 1 << 20 {
        return Err(format!(
            "size {s} is {s} bytes, less than 1 MiB: did you mean {s}M? (sizes are bytes unless they end in K, M or G)"
        ));
    }
    Ok(bytes)
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("mac {s:?} is not six hex bytes like 02:55:44:00:00:01");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("mac {s} is a multicast address"));
    }
    Ok(mac)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it spawns afterwards;
/// call first thing in `main`.
fn block_termination_signals() {
    // SAFETY: plain sigset manipulation on a local set; pthread_sigmask on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits for SIGINT or SIGTERM (blocked in every thread by `block_termination_signals`).
fn wait_for_termination_signal() -> i32 {
    // SAFETY: sigwait on a local set of signals blocked in every thread (see
    // `block_termination_signals`).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
        sig
    }
}

/// Runs `node` until it exits: a signal asks it to, as the API's `shutdown` does.
fn run_node(node: &std::sync::Arc<Node>, api: Option<&std::path::Path>) -> Result<()> {
    let n = std::sync::Arc::clone(node);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = wait_for_termination_signal();
            n.request_exit(format!("signal {sig}"));
        })
        .context("spawn signal thread")?;
    Ok(node.run_until_exit(api)?)
}

fn main() {
    block_termination_signals();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv = config::apply(&Cli::command(), argv).unwrap_or_else(|e| {
        eprintln!("understudy: error: {e}");
        std::process::exit(2);
    });
    let cli = Cli::parse_from(argv);
    init_logging();
    if let Err(e) = real_main(cli) {
        eprintln!("understudy: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let t0 = Instant::now();
    if matches!(cli.command, Command::Run { .. } | Command::Backup { .. } | Command::Receive { .. }) {
        // A bad UNDERSTUDY_LINK_THREADS is refused before anything boots.
        node::runtime::link_threads()?;
    }
    match cli.command {
        Command::Run {
            config: _,
            kernel,
            cmdline,
            memory,
            vcpus,
            serial,
            api,
            tap,
            mac,
            vm,
            metrics,
            metrics_public,
            agent,
        } => {
            if let Some(addr) = metrics {
                node::metrics::check_addr(addr, metrics_public)?;
            }
            if !kernel.exists() {
                bail!("kernel {} does not exist (build the fixture guest with `make guest`)", kernel.display());
            }
            let vm_ = vmm::vm::Vm::boot(vmm::vm::VmConfig {
                kernel: kernel.clone(),
                cmdline,
                memory_bytes: memory,
                vcpus,
                serial: serial.open()?,
                net: tap.map(|tap| vmm::vm::NetSpec { tap, mac }),
            })
            .context("boot vm")?;
            let node = Node::run(vm_, Origin::Booted { kernel }, memory, &vm)?;
            if let Some(addr) = metrics {
                node.serve_metrics(addr, metrics_public)?;
            }
            if agent.enabled() {
                node.start_primary_agent(&agent.config()?)?;
            }
            run_node(&node, api.as_deref())
        }
        Command::Restore { dir, serial, api, paused, tap } => {
            let (mem, state, info) =
                vmm::snapshot::read(&dir).with_context(|| format!("read snapshot {}", dir.display()))?;
            let memory_bytes = info.memory_bytes;
            let opts = vmm::vm::RestoreOptions { serial: serial.open()?, tap, open_tap: None };
            let mut vm = vmm::vm::Vm::restore(mem, &state, opts).context("restore vm")?;
            if !paused {
                vm.resume();
            }
            let restore_ms = t0.elapsed().as_secs_f64() * 1e3;
            let digest = format!("{:016x}", info.memory_digest);
            tracing::info!(from = %dir.display(), digest = %digest, restore_ms, "vm restored");
            let origin = Origin::Restored { from: dir, memory_digest: digest, restore_ms };
            let node = Node::run(vm, origin, memory_bytes, "vm")?;
            run_node(&node, api.as_deref())
        }
        Command::Snapshot { api, then, dir } => {
            let dir = std::path::absolute(&dir).unwrap_or(dir);
            call_and_print(&api, &Request::Snapshot { dir, then }, Duration::from_secs(300))
        }
        Command::Status { api, json, watch } => {
            let every = match watch {
                Some(w) if !(0.1..=3600.0).contains(&w) => bail!("--watch {w} is not within 0.1..=3600 seconds"),
                w => w.map(Duration::from_secs_f64),
            };
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
            loop {
                let v = api::call(&api, &Request::Status, Duration::from_secs(10))?;
                let text = if json { serde_json::to_string_pretty(&v)? + "\n" } else { node::status_text::render(&v) };
                if every.is_some() && tty {
                    // Clear the screen and go home: one screenful per refresh.
                    print!("\x1b[2J\x1b[H");
                }
                print!("{text}");
                match every {
                    Some(d) => {
                        if !tty {
                            println!();
                        }
                        std::thread::sleep(d);
                    }
                    None => return Ok(()),
                }
            }
        }
        Command::Ctl { api, action } => {
            let req = match action.as_str() {
                "pause" => Request::Pause,
                "resume" => Request::Resume,
                "shutdown" => Request::Shutdown,
                "memory-digest" => Request::MemoryDigest,
                "verify-journal" => Request::VerifyJournal,
                "output-journal" => Request::OutputJournal,
                "migrate-cancel" => Request::MigrateCancel,
                other => {
                    bail!(
                        "unknown action {other:?}; use pause, resume, shutdown, memory-digest, verify-journal, \
                         output-journal or migrate-cancel"
                    )
                }
            };
            let v = api::call(&api, &req, Duration::from_secs(60))?;
            println!("{}", serde_json::to_string(&v)?);
            Ok(())
        }
        Command::Protect { api, mut req, wait } => {
            req.certs = std::path::absolute(&req.certs).unwrap_or(req.certs);
            call_and_print(&api, &Request::Protect(req), Duration::from_secs(30))?;
            if wait { protect::follow(&api) } else { Ok(()) }
        }
        Command::Unprotect { api } => call_and_print(&api, &Request::Unprotect, Duration::from_secs(30)),
        Command::Promote { api, force } => call_and_print(&api, &Request::Promote { force }, Duration::from_secs(60)),
        Command::Backup {
            config: _,
            listen,
            certs,
            name,
            primary_name,
            vm,
            memory,
            api,
            tap,
            serial,
            verify,
            heartbeat_ms,
            detect_ms,
            suspect_ms,
            no_prepare_vm,
            inbound_log_frames,
            inbound_log_bytes,
            side_copy_port,
            no_side_copy,
            lan_copy,
            output_log_frames,
            output_log_bytes,
            auto_promote,
            metrics,
            metrics_public,
            agent,
            reprotect,
        } => {
            if let Some(addr) = metrics {
                node::metrics::check_addr(addr, metrics_public)?;
            }
            let reprotect = reprotect.plan(node::reprotect::Own {
                node: agent.id,
                peers: agent.peers.clone(),
                arbiter_listen: agent.listen,
                listen,
                certs: std::path::absolute(&certs).unwrap_or_else(|_| certs.clone()),
                name: name.clone(),
                vm: vm.clone(),
                heartbeat_ms,
                detect_ms,
            })?;
            let identity = transport::Identity::load(&certs, &name)
                .with_context(|| format!("load certificates for {name} from {}", certs.display()))?;
            let cfg = backup::server::BackupConfig {
                listen,
                identity,
                primary_name,
                tuning: transport::Tuning::default(),
                vm: backup::server::vm_identity(&vm),
                layout: vmm::layout::ram_regions(memory),
                verify,
                timing: node::protect::timing(heartbeat_ms, detect_ms, suspect_ms.unwrap_or(detect_ms / 2)),
                on_primary_lost: None,
                prepare_vm: !no_prepare_vm,
                inbound_log: backup::inbound::InboundLimits {
                    max_frames: inbound_log_frames,
                    max_bytes: usize::try_from(inbound_log_bytes).unwrap_or(usize::MAX),
                },
                side_copy_port: (!no_side_copy).then_some(side_copy_port),
                lan_copy,
                output_log: backup::output_log::OutputLimits {
                    max_frames: output_log_frames,
                    max_bytes: usize::try_from(output_log_bytes).unwrap_or(usize::MAX),
                },
            };
            let agent = agent.or_identity(&certs, &name);
            let node = Node::backup(cfg, tap, serial, memory, auto_promote)?;
            if let Some(plan) = reprotect {
                node.set_reprotect(plan);
            }
            if let Some(addr) = metrics {
                node.serve_metrics(addr, metrics_public)?;
            }
            if agent.enabled() {
                node.start_backup_agent(&agent.config()?)?;
            }
            run_node(&node, api.as_deref())
        }
        Command::Witness { config: _, id, data, listen, peers, certs, name } => {
            if peers.len() != 2 {
                bail!("a witness needs the two agents as --peer ID=NAME@HOST:PORT");
            }
            let certs = certs.context("a witness needs --certs (the CA and its certificate, `understudy certs`)")?;
            let identity = transport::Identity::load(&certs, &name)
                .with_context(|| format!("load certificates for {name} from {}", certs.display()))?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .context("start the async runtime")?;
            std::thread::spawn(|| {
                let sig = wait_for_termination_signal();
                tracing::info!("witness stopping: signal {sig}");
                std::process::exit(0);
            });
            let cfg = failover::net::WitnessQuicConfig::new(id, data, listen, identity, peers);
            rt.block_on(failover::net::run_witness_quic(cfg)).context("witness")
        }
        Command::Receive { config: _, listen, certs, memory, name, source_name, vm, api, serial, tap, verify } => {
            let (cfg, ranges) =
                node::migrate::destination_config(listen, &certs, &name, &source_name, &vm, memory, verify)?;
            let node = Node::destination(cfg, &ranges, tap, serial, memory)?;
            run_node(&node, api.as_deref())
        }
        Command::Migrate { api, args, json } => {
            let req = args.into_request();
            req.validate()?;
            migrate::run(&api, req, json)
        }
        Command::Certs { out, hosts, witnesses, ca_dir } => certs(&out, &hosts, &witnesses, ca_dir),
    }
}

/// Sends `req` to the process at `api` and prints its answer as JSON.
fn call_and_print(api: &std::path::Path, req: &Request, timeout: Duration) -> Result<()> {
    let v = api::call(api, req, timeout)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// `understudy certs`.
fn certs(out: &std::path::Path, hosts: &[String], witnesses: &[String], ca_dir: Option<PathBuf>) -> Result<()> {
    use transport::certs::{CaKey, HostSpec, Role};
    if hosts.is_empty() && witnesses.is_empty() {
        bail!("no hosts given: name them with --host NAME (VM hosts) and --witness NAME (witnesses)");
    }
    let spec = |text: &String, role| text.parse::<HostSpec>().map(|s| s.with_role(role));
    let specs = hosts.iter().map(|h| spec(h, Role::Host)).chain(witnesses.iter().map(|w| spec(w, Role::Witness)));
    let specs = specs.collect::<Result<Vec<_>, _>>()?;
    let ca = ca_dir.map_or(CaKey::Discard, CaKey::Keep);
    let generated = transport::certs::generate(out, &specs, &ca)
        .with_context(|| format!("generate certificates in {}", out.display()))?;
    for host in &generated.hosts {
        println!("{} (role {}): {} {}", host.name, host.role, host.cert.display(), host.key.display());
    }
    println!("ca certificate: {}", generated.ca_cert.display());
    match &generated.ca_key {
        Some(key) if generated.ca_created => println!("ca key (keep it off the hosts): {}", key.display()),
        Some(key) => println!("signed by the ca in {}", key.display()),
        None => println!("ca key discarded (pass --ca-dir DIR to keep it and issue more hosts later)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        let hint = parse_size("256").unwrap_err();
        assert!(hint.contains("did you mean 256M"), "{hint}");
        assert!(parse_size("4096").is_err());
        assert!(parse_size("lots").unwrap_err().contains("not a number"));
        assert_eq!(parse_mac("02:55:44:00:00:0a").unwrap(), [2, 0x55, 0x44, 0, 0, 10]);
        assert!(parse_mac("01:00:00:00:00:00").unwrap_err().contains("multicast"));
        assert!(parse_mac("nope").is_err());
    }
}
