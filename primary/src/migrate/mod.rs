//! The migration source: pre-copy rounds while the guest runs, stop-and-copy, switch-over and
//! hand-over to a destination (`docs/migration.md`).
//!
//! Round 0 sends every non-zero page while the guest runs (zero pages are not sent: the
//! destination's memory starts zeroed, and the report counts them), then each round sends the
//! pages the guest dirtied during the previous one, with the protocol's codecs and dedup. After
//! each acknowledged round [`precopy::Policy`] decides; on stop the source pauses the guest,
//! sends the last dirty pages with `VmState` as the switch-over epoch, waits for its ack, hands
//! over, and waits for the destination to say the guest runs there. Until the hand-over any
//! failure or a cancel resumes the guest here, untouched; after it the source never resumes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replication_proto::migration::SwitchMode;
use replication_proto::precopy::{Decision, Policy, PolicyConfig, RoundStats};
use replication_proto::{MemoryLayout, PageEncoding, Role, Sender, SenderConfig, SenderEvent, SubmitError, VmIdentity};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use transport::session::{AbortOnDrop, Session, StreamCommand, StreamCore};
use transport::{Endpoint, Identity};
use vmm::memory::{PAGE_SIZE, copy_pages};
use vmm::vm::Vm;

pub mod auto;
mod postcopy;
mod reverse;

use postcopy::Held;

/// Pages per epoch within a round: rounds are split so encoding, sending and the destination's
/// commit overlap, and a cancel or the bandwidth limit acts between pieces.
const CHUNK_PAGES: usize = 4096;

/// How a migration moves the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Rounds while the guest runs, then a short stop-and-copy (the default).
    #[default]
    Precopy,
    /// Pause, send everything, resume at the destination (the baseline).
    Stopcopy,
    /// Resume at the destination at once, pages on demand and pushed (issue 14).
    Postcopy,
    /// Pre-copy round 0, then post-copy (issue 14).
    Hybrid,
    /// Post-copy without the background push (issue 14).
    Demand,
    /// Pick one from the workload and the link (issue 14).
    Auto,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Precopy, Self::Stopcopy, Self::Postcopy, Self::Hybrid, Self::Demand, Self::Auto]
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("mode {s:?} is not one of precopy, stopcopy, postcopy, hybrid, demand, auto"))
    }
}

impl Mode {
    /// The mode's name as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Precopy => "precopy",
            Self::Stopcopy => "stopcopy",
            Self::Postcopy => "postcopy",
            Self::Hybrid => "hybrid",
            Self::Demand => "demand",
            Self::Auto => "auto",
        }
    }
}

/// What `understudy migrate` asks the source's process for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// The destination's address.
    pub to: SocketAddr,
    /// The destination's certificate name.
    pub dest_name: String,
    /// Directory with `ca.pem` and this host's certificate and key.
    pub certs: PathBuf,
    /// This host's certificate name.
    pub name: String,
    /// How.
    #[serde(default)]
    pub mode: Mode,
    /// Stop pre-copying once the predicted downtime fits this, ms.
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Most bytes a second put on the link (`None`: unlimited).
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Stop once the data re-sent since round 0 reaches this share of round 0's.
    #[serde(default = "default_share")]
    pub stop_share: f64,
    /// Stop after this many rounds, round 0 included.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Stop pre-copying after this many seconds; the whole migration fails after twice that.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Digest guest memory at the switch-over (paused), for tests: costs downtime.
    #[serde(default)]
    pub verify: bool,
    /// Post-copy without reverse checkpoints: the destination's output is not held, and a
    /// destination that dies (or a link cut for longer than `timeout_s`) loses the guest.
    #[serde(default)]
    pub no_reverse: bool,
}

fn default_downtime() -> u64 {
    5
}
fn default_share() -> f64 {
    0.75
}
fn default_rounds() -> u32 {
    30
}
fn default_timeout() -> u64 {
    60
}

impl MigrateRequest {
    /// Checks the settings; the error names the bad one.
    pub fn validate(&self) -> Result<(), MigrateError> {
        let bad = |what: String| Err(MigrateError::Setting(what));
        if self.downtime_ms > 60_000 {
            return bad(format!("--downtime-ms {} is over 60 s", self.downtime_ms));
        }
        if !self.stop_share.is_finite() || self.stop_share < 0.0 {
            return bad(format!("--stop-share {} is not a share of 0 or more", self.stop_share));
        }
        if self.max_rounds == 0 || self.max_rounds > 10_000 {
            return bad(format!("--max-rounds {} is not within 1..=10000", self.max_rounds));
        }
        if self.timeout_s == 0 || self.timeout_s > 86_400 {
            return bad(format!("--timeout-s {} is not within 1..=86400", self.timeout_s));
        }
        if self.max_bandwidth == Some(0) {
            return bad("--max-bandwidth 0 would never send anything".into());
        }
        Ok(())
    }
}

/// Why a migration failed. Before the hand-over the guest runs on at the source, untouched.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A bad setting.
    #[error("{0}")]
    Setting(String),
    /// The VM cannot migrate now.
    #[error("{0}")]
    Busy(String),
    /// This host's certificates could not be loaded.
    #[error(transparent)]
    Identity(#[from] transport::certs::LoadError),
    /// Our certificate may not carry a migration.
    #[error(transparent)]
    Policy(#[from] transport::PolicyError),
    /// No endpoint to connect from.
    #[error("bind {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: Box<transport::EndpointError>,
    },
    /// The destination could not be reached or refused us (its certificate is checked here).
    #[error("connect to the destination {addr} ({name})")]
    Connect {
        /// Its address.
        addr: SocketAddr,
        /// Its expected certificate name.
        name: String,
        /// Why.
        #[source]
        source: Box<transport::EndpointError>,
    },
    /// The session with the destination ended.
    #[error("the session with the destination ended: {0}")]
    Session(String),
    /// The destination's process is gone (its liveness line closed).
    #[error("the destination's process is gone ({0})")]
    DestinationDied(String),
    /// The VM failed during a harvest.
    #[error("vm")]
    Vm(#[from] vmm::vm::VmError),
    /// Reading guest memory failed.
    #[error("read guest memory")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// Encoding the state failed.
    #[error("encode vm state")]
    State(#[from] vmm::state::StateError),
    /// The sender refused an epoch.
    #[error("epoch refused by the sender: {0}")]
    Submit(SubmitError),
    /// Cancelled (`migrate-cancel`).
    #[error("cancelled by request in phase {0}")]
    Cancelled(&'static str),
    /// A step took too long.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What.
        what: &'static str,
        /// How long.
        secs: u64,
    },
    /// Post-copy broke off: the guest ran at the destination with pages only this host had.
    #[error(
        "post-copy from epoch {epoch} broke off ({why}): the guest resumed at the destination while this host \
         held pages it had not received; it is lost (reverse checkpoints close this window); this host stays paused"
    )]
    PostcopyLost {
        /// The switch-over epoch.
        epoch: u64,
        /// What happened.
        why: String,
    },
    /// Post-copy broke off, and the guest runs here again from the destination's last reverse
    /// checkpoint this host committed: nothing the outside world saw is lost; the destination
    /// is fenced (it learns it was superseded if it reaches this host again).
    #[error(
        "post-copy from epoch {switchover} broke off ({why}): recovered: the guest runs here again from reverse \
         checkpoint {epoch} (resumed in {recover_ms:.1} ms; {commits} reverse checkpoints committed); a \
         destination that lives on is fenced when it reaches this host again"
    )]
    Recovered {
        /// The switch-over epoch.
        switchover: u64,
        /// The reverse checkpoint the guest resumed from (the switch-over epoch if none came).
        epoch: u64,
        /// What happened to the destination.
        why: String,
        /// Decision to the guest running here, ms.
        recover_ms: f64,
        /// Reverse checkpoints committed during post-copy.
        commits: u64,
    },
    /// After the hand-over the destination never said it runs the guest: the source stays
    /// paused (it may not resume: the destination may be running the guest).
    #[error(
        "handed over at epoch {epoch}, but the destination did not confirm it runs the guest ({why}); the \
         source stays paused: check the destination before doing anything"
    )]
    Unconfirmed {
        /// The switch-over epoch.
        epoch: u64,
        /// What happened.
        why: String,
    },
}

/// Where a migration stands (for `status` on the source and the CLI's progress).
#[derive(Debug, Clone, Serialize, Default)]
pub struct MigrationStatus {
    /// `connecting`, `round-0`, `rounds`, `stop-and-copy`, `handover`, `completed`, `failed`.
    pub phase: String,
    /// The mode.
    pub mode: String,
    /// The destination.
    pub to: String,
    /// Round being sent (0 = the full copy).
    pub round: u32,
    /// Pages of guest memory.
    pub total_pages: u64,
    /// Pages sent so far (all rounds).
    pub pages_sent: u64,
    /// Pages of the current round still to send.
    pub round_pages_left: u64,
    /// Bytes put on the link so far.
    pub bytes_sent: u64,
    /// Pages dirtied per second during the last round.
    pub dirty_rate_pages_s: Option<f64>,
    /// The link's rate during the last round, bytes/s.
    pub link_rate_bytes_s: Option<u64>,
    /// Predicted downtime of a stop-and-copy now, ms.
    pub predicted_downtime_ms: Option<f64>,
    /// Time since the migration started, ms.
    pub elapsed_ms: f64,
    /// Estimated time to the end of the current round, ms.
    pub eta_ms: Option<f64>,
    /// Post-copy: pages the destination does not hold yet and the push has not sent.
    pub postcopy_pages_left: Option<u64>,
    /// `auto`: the mode chosen, once chosen.
    pub chosen_mode: Option<String>,
    /// Post-copy: times the link broke and was reconnected.
    pub postcopy_reconnects: u32,
    /// Post-copy with reverse checkpoints: those committed here so far.
    pub reverse_commits: Option<u64>,
    /// Post-copy with reverse checkpoints: whether the destination's reverse session is up.
    pub reverse_up: Option<bool>,
    /// Why it failed, once it did.
    pub error: Option<String>,
}

/// Shared between the migration task and the admin API: progress and cancel.
#[derive(Default)]
pub struct Control {
    cancel: AtomicBool,
    wake: Notify,
    status: Mutex<MigrationStatus>,
    started: Mutex<Option<Instant>>,
}

impl Control {
    /// Asks the migration to stop; true if it may still (before the hand-over).
    pub fn cancel(&self) -> bool {
        let phase = self.status().phase;
        if matches!(phase.as_str(), "handover" | "postcopy" | "completed" | "failed" | "recovered") {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
        tracing::warn!(phase, "migration: cancel requested");
        true
    }

    /// The status now.
    pub fn status(&self) -> MigrationStatus {
        let mut s = lock(&self.status).clone();
        if let Some(t) = *lock(&self.started) {
            s.elapsed_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        s
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }

    fn phase(&self, phase: &str) {
        let mut s = lock(&self.status);
        if s.phase != phase {
            tracing::info!("migration: {} -> {phase}", if s.phase.is_empty() { "idle" } else { &s.phase });
            s.phase = phase.into();
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One round in the report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoundReport {
    /// Round number (0: the full copy).
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Bytes put on the link.
    pub bytes: u64,
    /// Pages the guest dirtied meanwhile, per second.
    pub dirty_rate_pages_s: Option<f64>,
    /// The link's rate, bytes/s.
    pub link_rate_bytes_s: Option<u64>,
    /// Duration, ms.
    pub ms: f64,
}

/// Pages sent, by how.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct PageCounts {
    /// Zero pages (round 0's are not sent at all; later ones as one-byte records).
    pub zero: u64,
    /// References to a page with the same content sent before.
    pub dedup: u64,
    /// Unchanged since last sent.
    pub unchanged: u64,
    /// XOR delta against the last sent copy.
    pub delta: u64,
    /// lz4.
    pub lz4: u64,
    /// Raw.
    pub raw: u64,
}

/// What `understudy migrate` prints when the guest runs at the destination.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The mode.
    pub mode: String,
    /// Why pre-copy stopped (`downtime_fits`, `resent_share`, `max_rounds`, `time_limit`;
    /// `stopcopy` for the baseline mode).
    pub stop_reason: String,
    /// The predicted downtime when it stopped, ms.
    pub predicted_downtime_ms: Option<f64>,
    /// The rounds before the stop-and-copy.
    pub rounds: Vec<RoundReport>,
    /// Pages sent in the stop-and-copy.
    pub final_pages: u64,
    /// Migrate call to guest running at the destination, ms.
    pub total_ms: f64,
    /// Guest paused at the source to the destination's word that it runs it, ms (half a round
    /// trip too much).
    pub downtime_ms: f64,
    /// Where the downtime went, ms: pause and capture (harvest, copy, state), the last pages
    /// and state to the destination's ack, hand-over to the destination's word that it runs.
    pub downtime_parts: DowntimeParts,
    /// Whether the downtime exceeded the prediction (and the target) by more than 1 ms.
    pub downtime_over_prediction: bool,
    /// Bytes put on the link (every frame, control included).
    pub bytes_transferred: u64,
    /// Bytes of every epoch after round 0 (the rounds and the stop-and-copy; for `stopcopy`, 0).
    pub bytes_retransferred: u64,
    /// Pages by encoding.
    pub pages: PageCounts,
    /// The switch-over epoch.
    pub switchover_epoch: u64,
    /// CPU the source's process spent on the migration (its vCPUs left out), ms.
    pub source_cpu_ms: f64,
    /// CPU the destination's process spent up to the resume (its vCPUs left out), ms.
    pub dest_cpu_ms: f64,
    /// The source's peak resident set, bytes.
    pub source_peak_rss_bytes: u64,
    /// The destination's peak resident set at the resume, bytes.
    pub dest_peak_rss_bytes: u64,
    /// Guest memory digest at the switch-over (with `verify`).
    pub memory_digest: Option<String>,
    /// `auto`: the mode it chose (`precopy`, `hybrid`, `postcopy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chosen_mode: Option<String>,
    /// `auto`: why, with the numbers behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choice_reason: Option<String>,
    /// Hybrid (and `auto` when it switched): the pre-copy rounds done before post-copy (round 0
    /// counts as one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_round: Option<u32>,
    /// Post-copy's numbers (post-copy, demand, hybrid, and `auto` when it switched).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<PostcopyReport>,
}

/// What post-copy did (`docs/migration.md`, "The report").
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct PostcopyReport {
    /// Pages the destination held at the switch-over (sent and not dirtied since, or known zero).
    pub pages_held_at_switchover: u64,
    /// Pages it did not hold: moved after the resume.
    pub pages_postcopied: u64,
    /// Faults on missing pages at the destination that needed a page from here.
    pub postcopy_faults: u64,
    /// Fault raised to page placed at the destination, µs, median.
    pub fault_us_p50: f64,
    /// The same, 99th percentile.
    pub fault_us_p99: f64,
    /// Time the destination's vCPUs (and VMM threads) waited for missing pages, ms.
    pub vcpu_blocked_ms: f64,
    /// Pages pushed unasked.
    pub pages_pushed: u64,
    /// Pages sent because the destination asked.
    pub pages_demanded: u64,
    /// Page requests answered.
    pub page_requests: u64,
    /// Times the link broke during post-copy and was reconnected.
    pub reconnects: u32,
    /// The destination resumed to every page there (and, with reverse checkpoints, its
    /// confirmation of the hand-over), ms.
    pub postcopy_ms: f64,
    /// Reverse checkpoints' numbers (absent with `--no-reverse`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseReport>,
}

/// What reverse checkpoints did during a post-copy that completed.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
pub struct ReverseReport {
    /// Reverse checkpoints the source committed.
    pub reverse_checkpoints: u64,
    /// Pages they carried.
    pub reverse_pages: u64,
    /// Reverse sessions the destination opened (more than 1: reconnects).
    pub reverse_sessions: u32,
    /// Whether the destination confirmed the source's hand-over (it then released the output it
    /// held); without it the destination holds its output until it learns of the hand-over.
    pub handover_confirmed: bool,
}

/// Where the downtime went, ms.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct DowntimeParts {
    /// Pause, harvest, state capture.
    pub capture_ms: f64,
    /// The last pages and the state sent, committed and acknowledged.
    pub transfer_ms: f64,
    /// Hand-over sent to `Resumed` received (the destination's restore and resume, and a round
    /// trip).
    pub resume_ms: f64,
}

/// What the driver needs besides the request.
pub struct Source {
    /// The VM.
    pub vm: Arc<Mutex<Vm>>,
    /// Its identity on the wire.
    pub identity: VmIdentity,
    /// Its memory layout on the wire.
    pub layout: MemoryLayout,
    /// Progress and cancel.
    pub control: Arc<Control>,
    /// QUIC tuning.
    pub tuning: transport::Tuning,
    /// Heartbeat and idle timing of the session.
    pub timing: replication_proto::Timing,
    /// Speak this protocol version instead of this build's (tests of mixed versions).
    pub version: Option<u16>,
}

/// Migrates the guest. On `Ok` the destination runs it and this process's copy is paused for
/// good; on `Err` before the hand-over it runs on here.
pub async fn migrate(src: Source, req: MigrateRequest) -> Result<Report, MigrateError> {
    let t0 = Instant::now();
    *lock(&src.control.started) = Some(t0);
    src.control.update(|s| {
        s.mode = req.mode.name().into();
        s.to = req.to.to_string();
        s.error = None;
    });
    src.control.phase("connecting");
    let cpu0 = vmm::procstat::cpu_ns_excluding_vcpus().unwrap_or(0);
    let result = run(&src, &req, t0, cpu0).await;
    match &result {
        Ok(r) => {
            src.control.phase("completed");
            tracing::info!(total_ms = r.total_ms, downtime_ms = r.downtime_ms, "migration completed");
        }
        Err(e) => {
            let why = transport::error_chain(e);
            src.control.update(|s| s.error = Some(why.clone()));
            src.control.phase(if matches!(e, MigrateError::Recovered { .. }) { "recovered" } else { "failed" });
            tracing::error!("migration failed: {why}");
        }
    }
    result
}

/// What it takes to connect again (post-copy survives a broken link).
struct Redial {
    endpoint: Option<Endpoint>,
    cfg: SenderConfig,
    to: SocketAddr,
    dest_name: String,
    /// Post-copy: the paused guest's memory, once the switch-over is sent; the session answers
    /// page requests from it in its own task ([`postcopy::answer_tap`]).
    serve_from: Arc<std::sync::OnceLock<vmm::memory::GuestMemory>>,
}

struct Link {
    redial: Redial,
    session: Session<StreamCore<Sender>>,
    conn: transport::Connection,
    line: std::pin::Pin<Box<dyn std::future::Future<Output = transport::liveness::End> + Send>>,
    line_open: bool,
    acked: u64,
    resumed: Option<replication_proto::migration::Resumed>,
    up: bool,
    /// Epochs submitted.
    submitted: u64,
    /// Page buffers the sender is done with (warm memory for the next copies).
    spare: Vec<Vec<u8>>,
    control: Arc<Control>,
    deadline: Instant,
}

async fn run(src: &Source, req: &MigrateRequest, t0: Instant, cpu0: u64) -> Result<Report, MigrateError> {
    req.validate()?;
    let identity = Identity::load_named(&req.certs, &req.name)?;
    transport::PeerPolicy::replication().check_own(&identity)?;
    let instance = transport::random_u64().map_err(|e| MigrateError::Setting(format!("instance number: {e}")))?;
    let mut scfg = SenderConfig::new(Role::MigrationSource, src.identity.clone(), src.layout.clone(), instance);
    scfg.timing = src.timing;
    scfg.push_low_water = postcopy::PUSH_LOW_WATER;
    if let Some(v) = src.version {
        scfg.version = v;
    }
    let redial = Redial {
        endpoint: None,
        cfg: scfg.clone(),
        to: req.to,
        dest_name: req.dest_name.clone(),
        serve_from: Arc::new(std::sync::OnceLock::new()),
    };
    let sender = Sender::new(scfg);
    let bind = if req.to.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    };
    let endpoint = Endpoint::bind(bind, &identity, transport::proto::protocol_versions(), src.tuning.clone())
        .map_err(|e| MigrateError::Bind { addr: bind, source: Box::new(e) })?;
    let result = async {
        let conn = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(req.to, &req.dest_name))
            .await
            .map_err(|_| MigrateError::Timeout { what: "the destination to answer", secs: 10 })?
            .map_err(|e| MigrateError::Connect { addr: req.to, name: req.dest_name.clone(), source: Box::new(e) })?;
        let line = hold_line(req.to, &conn);
        let session =
            transport::proto::sender_session_tapped(conn.clone(), sender, postcopy::answer_tap(&redial.serve_from));
        let mut link = Link {
            redial: Redial { endpoint: Some(endpoint.clone()), ..redial },
            session,
            conn,
            line,
            line_open: true,
            acked: 0,
            resumed: None,
            up: false,
            submitted: 0,
            spare: Vec::new(),
            control: Arc::clone(&src.control),
            deadline: t0 + Duration::from_secs(req.timeout_s.saturating_mul(2).max(10)),
        };
        let r = drive(src, req, &mut link, t0, cpu0).await;
        if let Err(MigrateError::Recovered { .. }) = &r {
            // The guest runs here again; the destination is gone or cut off: nothing to say to
            // it on this session (the reverse endpoint tells it, should it come back).
            return r;
        }
        if r.is_err() {
            let detail = match &r {
                Err(MigrateError::Cancelled(_)) => "cancelled by the operator".to_string(),
                Err(e) => transport::error_chain(e),
                Ok(_) => unreachable!(),
            };
            let _ = link.session.command(StreamCommand::with(move |s: &mut Sender, _| s.cancel(&detail))).await;
            let _ = tokio::time::timeout(Duration::from_millis(500), link.session.finish()).await;
        } else {
            let _ = link.session.close("migration complete").await;
            let _ = tokio::time::timeout(Duration::from_millis(500), link.session.finish()).await;
        }
        r
    }
    .await;
    // A recovered migration's endpoint lives on a while: it tells the destination it was
    // superseded (`reverse::supersede`), then closes.
    if !matches!(result, Err(MigrateError::Recovered { .. })) {
        endpoint.shutdown().await;
    }
    result
}

/// The destination's liveness line, held on a task of its own from the session's start, so that
/// it is set up (connect, hello, acknowledgement) at once whatever the migration awaits
/// meanwhile. Polled only inside [`Link::until`], as it was, its set-up waited for the driver's
/// next wait there; a line still not up when the destination dies is a refused connection, no
/// line at all, and the session's silence is reported a second later instead of the death (what
/// a CI run of `a_dead_peer_or_a_cut_link_ends_the_migration_cleanly` saw; that this was its
/// cause is the likeliest reading, not a reproduced one). Dropping the future ends the task, and
/// the line says goodbye.
fn hold_line(
    to: SocketAddr,
    conn: &transport::Connection,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = transport::liveness::End> + Send>> {
    let mut task = AbortOnDrop(tokio::spawn(transport::liveness::hold(to, conn)));
    Box::pin(async move {
        match (&mut task.0).await {
            Ok(end) => end,
            // Only a panic in the line's task: no line, heartbeats alone decide.
            Err(_) => std::future::pending().await,
        }
    })
}

/// Pages harvested (copied) and waiting to go out.
struct Pages {
    pfns: Vec<u64>,
    data: Vec<u8>,
}

impl Link {
    /// Takes events until `done` holds, failing on the session's end, the destination's death,
    /// a cancel (when `cancellable`) or the deadline.
    async fn until(
        &mut self,
        what: &'static str,
        cancellable: bool,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), MigrateError> {
        self.until_at(what, cancellable, done, None).await
    }

    /// [`Link::until`], also checking `done` at `wake` (a time-based condition: the bandwidth
    /// limit's pacing, which so keeps watching the destination's line and the session).
    async fn until_at(
        &mut self,
        what: &'static str,
        cancellable: bool,
        done: impl Fn(&Self) -> bool,
        wake: Option<Instant>,
    ) -> Result<(), MigrateError> {
        loop {
            if done(self) {
                return Ok(());
            }
            if cancellable && self.control.cancelled() {
                return Err(MigrateError::Cancelled(phase_name(&self.control)));
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrateError::Timeout { what, secs: self.deadline_secs() });
            }
            let control = Arc::clone(&self.control);
            let nap = wake.map_or(left, |w| w.saturating_duration_since(Instant::now())).min(left);
            tokio::select! {
                // The line first: a destination whose process died also ends the session soon
                // after, and its death is the reason to report.
                biased;
                end = &mut self.line, if self.line_open => {
                    self.line_open = false;
                    if let transport::liveness::End::Died(why) = end {
                        // A destination that refused the migration says why and exits: its
                        // reason, not its death, is what to report.
                        if let Some(reason) = self.refusal().await {
                            return Err(MigrateError::Session(reason));
                        }
                        return Err(MigrateError::DestinationDied(why.to_string()));
                    }
                }
                ev = self.session.next_event() => match ev {
                    None => return Err(MigrateError::Session("the session task ended without a reason".into())),
                    Some(SenderEvent::Connected { .. }) => self.up = true,
                    Some(SenderEvent::Acked { epoch, .. }) => self.acked = self.acked.max(epoch),
                    Some(SenderEvent::Resumed(r)) => self.resumed = Some(r),
                    Some(SenderEvent::Disconnected { error }) => return Err(MigrateError::Session(self.explain(&error))),
                    Some(SenderEvent::BaselineRequired { reason }) if !matches!(reason, replication_proto::BaselineReason::Initial) => {
                        return Err(MigrateError::Session(format!("the destination refused an epoch and asked for a new baseline ({reason:?})")));
                    }
                    Some(_) => {}
                },
                _ = control.wake.notified(), if cancellable => {}
                _ = tokio::time::sleep(nap.min(Duration::from_millis(100))) => {}
            }
        }
    }

    /// Connects to the destination again (post-copy: the destination accepts the same source
    /// again), retrying every 100 ms to 1 s until `until`; the old session is dropped.
    async fn reconnect(&mut self, until: Instant) -> Result<(), MigrateError> {
        let endpoint = self
            .redial
            .endpoint
            .clone()
            .ok_or_else(|| MigrateError::Session("no endpoint to reconnect from".into()))?;
        let mut wait = Duration::from_millis(100);
        let mut tries = 0u32;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrateError::Timeout {
                    what: "the link to the destination to come back",
                    secs: self.deadline_secs(),
                });
            }
            tries += 1;
            let attempt = tokio::time::timeout(
                left.min(Duration::from_secs(2)),
                endpoint.connect(self.redial.to, &self.redial.dest_name),
            )
            .await;
            match attempt {
                Ok(Ok(conn)) => {
                    let mut cfg = self.redial.cfg.clone();
                    cfg.instance =
                        transport::random_u64().map_err(|e| MigrateError::Setting(format!("instance number: {e}")))?;
                    self.line = hold_line(self.redial.to, &conn);
                    self.line_open = true;
                    let tap = postcopy::answer_tap(&self.redial.serve_from);
                    self.session = transport::proto::sender_session_tapped(conn.clone(), Sender::new(cfg), tap);
                    self.conn = conn;
                    self.up = false;
                    let deadline = self.deadline;
                    self.deadline = until.min(Instant::now() + Duration::from_secs(5));
                    let r = self.until("the destination's hello after a reconnect", false, |l| l.up).await;
                    self.deadline = deadline;
                    match r {
                        Ok(()) => {
                            tracing::info!(tries, "post-copy: reconnected to the destination");
                            return Ok(());
                        }
                        Err(e) => tracing::warn!("post-copy: reconnect: {}", transport::error_chain(&e)),
                    }
                }
                Ok(Err(e)) => tracing::debug!("post-copy: reconnect attempt {tries}: {}", transport::error_chain(&e)),
                Err(_) => tracing::debug!("post-copy: reconnect attempt {tries} timed out"),
            }
            tokio::time::sleep(wait.min(until.saturating_duration_since(Instant::now()))).await;
            wait = (wait * 2).min(Duration::from_secs(1));
        }
    }

    fn deadline_secs(&self) -> u64 {
        let started = lock(&self.control.started).unwrap_or_else(Instant::now);
        self.deadline.saturating_duration_since(started).as_secs()
    }

    /// Submits one epoch; waits for room in the window. Returns its epoch and the sender's
    /// counters after it; the page buffer goes back to the spare pool.
    async fn submit(
        &mut self,
        pages: Pages,
        state: Vec<u8>,
        baseline: bool,
    ) -> Result<(u64, replication_proto::SenderStats), MigrateError> {
        let mut job = Some((pages, state));
        loop {
            let (tx, rx) = oneshot::channel();
            let mine = job.take().expect("the job comes back with every answer");
            let cmd = StreamCommand::with(move |s: &mut Sender, now: Instant| {
                let (pages, state) = &mine;
                let it = pages.pfns.iter().copied().zip(pages.data.chunks(PAGE_SIZE));
                let r = if baseline { s.submit_baseline(now, it, state) } else { s.submit(now, it, state) };
                let stats = s.stats();
                let _ = tx.send((r.map(|e| (e, stats)), mine));
            });
            if self.session.command(cmd).await.is_err() {
                return Err(self.gone().await);
            }
            match rx.await {
                Ok((Ok(r), (pages, _))) => {
                    self.submitted += 1;
                    if self.spare.len() < 4 {
                        self.spare.push(pages.data);
                    }
                    return Ok(r);
                }
                Ok((Err(SubmitError::WindowFull { .. } | SubmitError::RetainedFull { .. }), back)) => {
                    job = Some(back);
                    let before = self.acked;
                    self.until("room in the send window", true, |l| l.acked > before).await?;
                }
                Ok((Err(e), _)) => return Err(MigrateError::Submit(e)),
                Err(_) => return Err(self.gone().await),
            }
        }
    }

    /// Sends the hand-over of `epoch`: this copy gives the guest up for good.
    async fn handover(&mut self, epoch: u64) -> Result<(), MigrateError> {
        let cmd = StreamCommand::with(move |s: &mut Sender, _| {
            if let Err(e) = s.handover(epoch) {
                tracing::error!("migration: hand-over: {e}");
            }
        });
        self.session
            .command(cmd)
            .await
            .map_err(|_| MigrateError::Unconfirmed { epoch, why: "the session task ended".into() })
    }

    /// The forward series' lineage (a reverse series starts from it).
    async fn lineage(&mut self) -> Result<Option<replication_proto::message::Lineage>, MigrateError> {
        let (tx, rx) = oneshot::channel();
        let cmd = StreamCommand::with(move |s: &mut Sender, _| {
            let _ = tx.send(s.lineage());
        });
        if self.session.command(cmd).await.is_err() {
            return Err(self.gone().await);
        }
        rx.await.map_err(|_| MigrateError::Session("the session task ended".into()))
    }

    async fn stats(&mut self) -> Result<replication_proto::SenderStats, MigrateError> {
        let (tx, rx) = oneshot::channel();
        let cmd = StreamCommand::with(move |s: &mut Sender, _| {
            let _ = tx.send(s.stats());
        });
        if self.session.command(cmd).await.is_err() {
            return Err(self.gone().await);
        }
        match rx.await {
            Ok(s) => Ok(s),
            Err(_) => Err(self.gone().await),
        }
    }

    /// A session error, with the peer's reason for closing the connection when that is all the
    /// session saw (a goodbye overtaken by the connection's close).
    fn explain(&self, error: &replication_proto::SessionError) -> String {
        match (error, self.conn.close_reason()) {
            (replication_proto::SessionError::ConnectionLost, Some(reason)) => format!("{error}: {reason}"),
            _ => error.to_string(),
        }
    }

    /// The error of the session's `Disconnected` event, if one comes (or is queued) within
    /// `within`.
    async fn disconnected_within(&mut self, within: Duration) -> Option<replication_proto::SessionError> {
        tokio::time::timeout(within, async {
            while let Some(ev) = self.session.next_event().await {
                if let SenderEvent::Disconnected { error } = ev {
                    return Some(error);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// The reason the destination gave for ending the session (a refusal, a goodbye), if one
    /// comes within 200 ms; a lost connection or a silence is no reason (its death says more).
    async fn refusal(&mut self) -> Option<String> {
        match self.disconnected_within(Duration::from_millis(200)).await? {
            replication_proto::SessionError::ConnectionLost | replication_proto::SessionError::Idle { .. } => None,
            e => Some(self.explain(&e)),
        }
    }

    /// Why the session task ended: the `Disconnected` event still queued, if any.
    async fn gone(&mut self) -> MigrateError {
        let why = self.disconnected_within(Duration::from_millis(500)).await.map(|e| self.explain(&e));
        MigrateError::Session(why.unwrap_or_else(|| "the session task ended without a reason".into()))
    }
}

fn phase_name(c: &Control) -> &'static str {
    match c.status().phase.as_str() {
        "connecting" => "connecting",
        "round-0" => "round-0",
        "rounds" => "rounds",
        "stop-and-copy" => "stop-and-copy",
        _ => "migration",
    }
}

/// Copies `pfns` from the running (or paused) guest into `buf` (a recycled buffer); in round 0,
/// leaves zero pages out (counted).
async fn copy(
    vm: &Arc<Mutex<Vm>>,
    pfns: Vec<u64>,
    skip_zero: bool,
    buf: Vec<u8>,
) -> Result<(Pages, u64), MigrateError> {
    joined(start_copy(vm, pfns, skip_zero, buf)).await
}

type CopyTask = tokio::task::JoinHandle<Result<(Pages, u64), MigrateError>>;

/// [`copy`] started on a blocking thread, to overlap with sending the previous piece.
fn start_copy(vm: &Arc<Mutex<Vm>>, pfns: Vec<u64>, skip_zero: bool, buf: Vec<u8>) -> CopyTask {
    let vm = Arc::clone(vm);
    tokio::task::spawn_blocking(move || {
        let vm = lock(&vm);
        let mut out = Pages { pfns: Vec::with_capacity(pfns.len()), data: buf };
        out.data.clear();
        let mut zero = 0;
        if skip_zero {
            zero = vmm::memory::copy_nonzero_pages(vm.memory(), pfns.into_iter(), &mut out.pfns, &mut out.data)?;
        } else {
            copy_pages(vm.memory(), pfns.iter().copied(), &mut out.data)?;
            out.pfns = pfns;
        }
        Ok::<_, MigrateError>((out, zero))
    })
}

async fn joined(task: CopyTask) -> Result<(Pages, u64), MigrateError> {
    task.await.map_err(|e| MigrateError::Session(format!("copy task: {e}")))?
}

/// Sends `pfns` as one round (in pieces of [`CHUNK_PAGES`]), paced to `max_bandwidth`, and
/// waits until the destination acknowledged it. Returns (pages sent, zero pages skipped).
#[allow(clippy::too_many_arguments)]
async fn send_round(
    src: &Source,
    req: &MigrateRequest,
    link: &mut Link,
    pfns: &[u64],
    (baseline, skip_zero): (bool, bool),
    pace: &mut Pace,
    round: u32,
    held: &mut Held,
) -> Result<(u64, u64), MigrateError> {
    let mut sent = 0;
    let mut zero = 0;
    let mut first = baseline;
    let mut last_epoch = 0;
    let (mut t_copy, mut t_submit) = (Duration::ZERO, Duration::ZERO);
    src.control.update(|s| {
        s.round = round;
        s.round_pages_left = pfns.len() as u64;
    });
    // Copy piece i + 1 while piece i is encoded and sent.
    let chunks: Vec<&[u64]> = pfns.chunks(CHUNK_PAGES).collect();
    let mut next =
        chunks.first().map(|c| start_copy(&src.vm, c.to_vec(), skip_zero, link.spare.pop().unwrap_or_default()));
    for (i, chunk) in chunks.iter().enumerate() {
        if src.control.cancelled() {
            return Err(MigrateError::Cancelled(phase_name(&src.control)));
        }
        let tc = Instant::now();
        let (pages, z) = joined(next.take().expect("a copy per piece")).await?;
        t_copy += tc.elapsed();
        if let Some(c) = chunks.get(i + 1) {
            next = Some(start_copy(&src.vm, c.to_vec(), skip_zero, link.spare.pop().unwrap_or_default()));
        }
        zero += z;
        // Sent now, or zero (which the destination's fresh memory is): held until dirtied.
        held.set(chunk.iter().copied(), true);
        if pages.pfns.is_empty() && !first {
            src.control.update(|s| s.round_pages_left = s.round_pages_left.saturating_sub(chunk.len() as u64));
            continue;
        }
        let n = pages.pfns.len() as u64;
        let ts = Instant::now();
        let (epoch, stats) = link.submit(pages, Vec::new(), first).await?;
        t_submit += ts.elapsed();
        first = false;
        last_epoch = epoch;
        sent += n;
        src.control.update(|s| {
            s.pages_sent += n;
            s.round_pages_left = s.round_pages_left.saturating_sub(chunk.len() as u64);
            s.bytes_sent = stats.bytes_sent;
            if let Some(rate) = s.link_rate_bytes_s.filter(|&r| r > 0) {
                s.eta_ms = Some(s.round_pages_left as f64 * PAGE_SIZE as f64 / rate as f64 * 1e3);
            }
        });
        if let Some(due) = pace.due(stats.epoch_bytes, req.max_bandwidth) {
            link.until_at("the bandwidth limit", true, |_| Instant::now() >= due, Some(due)).await?;
        }
    }
    let tw = Instant::now();
    if last_epoch > 0 {
        link.until("the destination to acknowledge a round", true, |l| l.acked >= last_epoch).await?;
    }
    tracing::debug!(
        round,
        copy_ms = t_copy.as_secs_f64() * 1e3,
        submit_ms = t_submit.as_secs_f64() * 1e3,
        last_ack_wait_ms = tw.elapsed().as_secs_f64() * 1e3,
        "migration: where the round's time went"
    );
    Ok((sent, zero))
}

/// `--max-bandwidth`: keeps the bytes handed to the link at or under the rate since the start.
struct Pace {
    start: Instant,
}

impl Pace {
    /// When `bytes` may have been handed to the link at `rate` (`None`: no limit). The wait goes
    /// through [`Link::until_at`], so a destination that dies meanwhile is noticed at once.
    fn due(&self, bytes: u64, rate: Option<u64>) -> Option<Instant> {
        let rate = rate.filter(|&r| r > 0)?;
        Some(self.start + Duration::from_secs_f64(bytes as f64 / rate as f64))
    }
}

fn all_pfns(layout: &MemoryLayout) -> Vec<u64> {
    let ps = u64::from(layout.page_size);
    layout.ranges.iter().flat_map(|r| r.start / ps..(r.start + r.len) / ps).collect()
}

/// `auto` probes the link and the guest with the first pieces of round 0: at least this many
/// bytes acknowledged...
const PROBE_BYTES: u64 = 2 << 20;
/// ...and at least this long.
const PROBE_MIN: Duration = Duration::from_millis(20);
/// ...in pieces of this many pages (a probe that decides for post-copy costs what it sent
/// slower than post-copy would have: keep it short).
const PROBE_PAGES: usize = 1024;
/// The state's size for predictions made before it is captured (a vCPU's registers and the
/// devices: ~10-20 KiB measured).
const STATE_BYTES_GUESS: u64 = 32 << 10;

/// How the rounds before the pause ended.
#[derive(Default)]
struct Precopied {
    rounds: Vec<RoundReport>,
    zero_skipped: u64,
    stop_reason: String,
    predicted: Option<f64>,
    round0_bytes: u64,
    /// Dirtied during the last round: the stop-and-copy sends them (pre-copy).
    pending: Vec<u64>,
    /// Switch to post-copy instead of a complete stop-and-copy.
    postcopy: bool,
    /// `auto`: (mode, reason).
    chosen: Option<(String, String)>,
    /// Rounds finished (round 0 included).
    rounds_done: u32,
}

/// The end of `auto`'s probe.
enum Probe {
    /// Switch to post-copy now.
    Switch { zero: u64, reason: String },
    /// Go on with pre-copy from `next`; `dirtied` are due in round 1.
    Continue { sent: u64, zero: u64, next: usize, dirtied: Vec<u64> },
}

async fn harvest(src: &Source) -> Result<Vec<u64>, MigrateError> {
    let vm = Arc::clone(&src.vm);
    let dirty = tokio::task::spawn_blocking(move || lock(&vm).harvest_dirty())
        .await
        .map_err(|e| MigrateError::Session(format!("harvest task: {e}")))??;
    Ok(dirty.pages().collect())
}

async fn enable_dirty_log(src: &Source) -> Result<(), MigrateError> {
    let vm = Arc::clone(&src.vm);
    tokio::task::spawn_blocking(move || lock(&vm).enable_dirty_log())
        .await
        .map_err(|e| MigrateError::Session(format!("dirty log task: {e}")))??;
    Ok(())
}

/// How many of `pfns` the guest ever touched (the others are zero and cost nothing to move).
async fn touched(src: &Source, pfns: Vec<u64>) -> Result<u64, MigrateError> {
    let n = pfns.len() as u64;
    Ok(n - untouched(src, pfns).await?.len() as u64)
}

/// Those of `pfns` the guest never touched (zero, as the destination's fresh memory is).
async fn untouched(src: &Source, pfns: Vec<u64>) -> Result<Vec<u64>, MigrateError> {
    let vm = Arc::clone(&src.vm);
    tokio::task::spawn_blocking(move || {
        let u = vmm::memory::never_touched(lock(&vm).memory(), &pfns);
        pfns.into_iter().zip(u).filter(|&(_, u)| u).map(|(p, _)| p).collect()
    })
    .await
    .map_err(|e| MigrateError::Session(format!("pagemap task: {e}")))
}

/// `auto`: sends round 0 piece by piece until the link and the guest are measured, then
/// decides whether pre-copy is worth going on with.
async fn probe(
    src: &Source,
    req: &MigrateRequest,
    link: &mut Link,
    to_send: &[u64],
    pace: &mut Pace,
    held: &mut Held,
) -> Result<Probe, MigrateError> {
    let t = Instant::now();
    let b0 = link.stats().await?.epoch_bytes;
    let (mut sent, mut zero, mut i, mut bytes) = (0, 0, 0, 0);
    while i < to_send.len() {
        let chunk = &to_send[i..(i + PROBE_PAGES).min(to_send.len())];
        let (s, z) = send_round(src, req, link, chunk, (i == 0, true), pace, 0, held).await?;
        (sent, zero, i) = (sent + s, zero + z, i + chunk.len());
        bytes = link.stats().await?.epoch_bytes - b0;
        if bytes >= PROBE_BYTES && t.elapsed() >= PROBE_MIN {
            break;
        }
    }
    if i >= to_send.len() {
        // Round 0 is over before the probe: decide at its end, as after any round.
        return Ok(Probe::Continue { sent, zero, next: i, dirtied: Vec::new() });
    }
    let dirtied = harvest(src).await?;
    held.set(dirtied.iter().copied(), false);
    let secs = t.elapsed().as_secs_f64();
    let rest = touched(src, to_send[i..].to_vec()).await?;
    let m = auto::Measured {
        link_bytes_s: bytes as f64 / secs,
        dirty_pages_s: dirtied.len() as f64 / secs,
        bytes_per_page: if sent > 0 { bytes as f64 / sent as f64 } else { (PAGE_SIZE + 4) as f64 },
        pages_left: rest + dirtied.len() as u64,
        working_set_pages: None,
        state_bytes: STATE_BYTES_GUESS,
        rtt_s: link.conn.stats().rtt.as_secs_f64(),
        downtime_target_s: req.downtime_ms as f64 / 1e3,
    };
    let (choice, reason) = auto::choose(&m);
    tracing::info!(?choice, probe_ms = secs * 1e3, "auto: after probing {} pages: {reason}", i);
    Ok(match choice {
        auto::Choice::PostcopyNow => {
            // The rest of round 0 that the guest never touched is zero, as the destination's
            // fresh memory is: held (the dirty log, on since before, takes back any page touched
            // before the pause).
            held.set(untouched(src, to_send[i..].to_vec()).await?, true);
            Probe::Switch { zero, reason }
        }
        auto::Choice::Precopy => Probe::Continue { sent, zero, next: i, dirtied },
    })
}

/// Pre-copy rounds (`precopy`, `hybrid`, `auto`) until the stopping rule (or, for `hybrid` and
/// `auto`, the switch to post-copy) says pause.
async fn precopy(
    src: &Source,
    req: &MigrateRequest,
    link: &mut Link,
    all: &[u64],
    held: &mut Held,
) -> Result<Precopied, MigrateError> {
    let mut policy = Policy::new(PolicyConfig {
        downtime_target: Duration::from_millis(req.downtime_ms),
        stop_share: req.stop_share,
        max_rounds: req.max_rounds,
        time_limit: Duration::from_secs(req.timeout_s),
        ..PolicyConfig::new(PAGE_SIZE as u32)
    });
    let mut out = Precopied::default();
    let mut pace = Pace { start: Instant::now() };
    src.control.phase("round-0");
    enable_dirty_log(src).await?;
    let mut round = 0u32;
    let mut to_send = all.to_vec();
    let mut round_start = Instant::now();
    let mut prev_dirtied: Option<u64> = None;
    loop {
        let before = link.stats().await?.epoch_bytes;
        let mut carried = Vec::new();
        let (sent, zero) = if round == 0 && req.mode == Mode::Auto {
            match probe(src, req, link, &to_send, &mut pace, held).await? {
                Probe::Switch { zero, reason, .. } => {
                    out.zero_skipped += zero;
                    out.round0_bytes = link.stats().await?.epoch_bytes - before;
                    out.stop_reason = "auto".into();
                    out.postcopy = true;
                    out.chosen = Some(("postcopy".into(), reason));
                    src.control.update(|s| s.chosen_mode = Some("postcopy".into()));
                    return Ok(out);
                }
                Probe::Continue { sent, zero, next, dirtied } => {
                    carried = dirtied;
                    let (s, z) =
                        send_round(src, req, link, &to_send[next..], (false, true), &mut pace, 0, held).await?;
                    (sent + s, zero + z)
                }
            }
        } else {
            send_round(src, req, link, &to_send, (round == 0, round == 0), &mut pace, round, held).await?
        };
        out.zero_skipped += zero;
        let after = link.stats().await?.epoch_bytes;
        if round == 0 {
            out.round0_bytes = after - before;
        }
        let dirty = harvest(src).await?;
        held.set(dirty.iter().copied(), false);
        to_send = dirty;
        if !carried.is_empty() {
            to_send.extend(carried);
            to_send.sort_unstable();
            to_send.dedup();
        }
        let stats = RoundStats {
            pages_sent: sent,
            bytes_sent: after - before,
            duration: round_start.elapsed(),
            pages_dirtied: to_send.len() as u64,
            link_rate: None,
            rtt: link.conn.stats().rtt,
        };
        round_start = Instant::now();
        let decision = policy.record(stats);
        let rec = policy.rounds().last().copied();
        let p = decision.prediction();
        let pred_ms = p.downtime.map(|d| d.as_secs_f64() * 1e3);
        if let Some(rec) = rec {
            out.rounds.push(RoundReport {
                round,
                pages: sent,
                bytes: stats.bytes_sent,
                dirty_rate_pages_s: rec.dirty_rate,
                link_rate_bytes_s: rec.link_rate,
                ms: stats.duration.as_secs_f64() * 1e3,
            });
            src.control.update(|s| {
                s.dirty_rate_pages_s = rec.dirty_rate;
                s.link_rate_bytes_s = rec.link_rate;
                s.predicted_downtime_ms = pred_ms;
            });
        }
        tracing::info!(
            round,
            pages = sent,
            bytes = stats.bytes_sent,
            ms = stats.duration.as_secs_f64() * 1e3,
            dirtied = to_send.len(),
            predicted_downtime_ms = ?pred_ms,
            "migration: round done"
        );
        out.rounds_done = round + 1;
        let dirtied = to_send.len() as u64;
        let converging = prev_dirtied.is_none_or(|p| auto::still_converging(p, dirtied));
        let stalled_why = prev_dirtied.map(|p| format!("round {round} dirtied {dirtied} pages after {p}"));
        prev_dirtied = Some(dirtied);
        let stop = match decision {
            Decision::Stop { reason, prediction } => Some((reason, prediction.downtime.map(|d| d.as_secs_f64() * 1e3))),
            Decision::Continue(_) => None,
        };
        let fits = matches!(stop, Some((replication_proto::precopy::StopReason::DowntimeFits, _)));
        let switch = match req.mode {
            Mode::Precopy => {
                if let Some((reason, predicted)) = stop {
                    out.stop_reason = reason.name().into();
                    out.predicted = predicted;
                    tracing::info!(reason = %out.stop_reason, predicted_downtime_ms = ?predicted, "migration: pre-copy stops");
                    break;
                }
                None
            }
            // Hybrid: more rounds only while they shrink; then post-copy, whatever the rule says.
            Mode::Hybrid => match (stop, converging) {
                (Some((reason, _)), _) => Some(format!("hybrid: pre-copy stopped ({})", reason.name())),
                (None, false) => {
                    Some(format!("hybrid: pre-copy stopped converging ({})", stalled_why.unwrap_or_default()))
                }
                (None, true) if round == 0 => None,
                (None, true) => None,
            },
            Mode::Auto => {
                if fits {
                    let (reason, predicted) = stop.expect("fits is a stop");
                    out.stop_reason = reason.name().into();
                    out.predicted = predicted;
                    let why = format!(
                        "pre-copy: round {round} left {dirtied} dirty pages, a predicted {:.1} ms stop-and-copy within the {} ms target",
                        predicted.unwrap_or(0.0),
                        req.downtime_ms
                    );
                    out.chosen = Some(("precopy".into(), why));
                    src.control.update(|s| s.chosen_mode = Some("precopy".into()));
                    break;
                } else if let Some((reason, _)) = stop {
                    Some(format!("hybrid: pre-copy gave up ({}) instead of a long stop-and-copy", reason.name()))
                } else if !converging {
                    Some(format!("hybrid: pre-copy stopped converging ({})", stalled_why.unwrap_or_default()))
                } else if round == 0 {
                    let r = rec.expect("a recorded round");
                    let secs = stats.duration.as_secs_f64().max(1e-6);
                    let m = auto::Measured {
                        link_bytes_s: r.link_rate.map_or(stats.bytes_sent as f64 / secs, |l| l as f64),
                        dirty_pages_s: r.dirty_rate.unwrap_or(dirtied as f64 / secs),
                        bytes_per_page: if sent > 0 {
                            stats.bytes_sent as f64 / sent as f64
                        } else {
                            (PAGE_SIZE + 4) as f64
                        },
                        pages_left: dirtied,
                        working_set_pages: Some(dirtied),
                        state_bytes: STATE_BYTES_GUESS,
                        rtt_s: stats.rtt.as_secs_f64(),
                        downtime_target_s: req.downtime_ms as f64 / 1e3,
                    };
                    let (choice, reason) = auto::choose(&m);
                    tracing::info!(?choice, "auto: after round 0: {reason}");
                    match choice {
                        auto::Choice::PostcopyNow => Some(format!("hybrid after round 0: {reason}")),
                        auto::Choice::Precopy => {
                            src.control.update(|s| s.chosen_mode = Some("precopy".into()));
                            None
                        }
                    }
                } else {
                    None
                }
            }
            Mode::Stopcopy | Mode::Postcopy | Mode::Demand => unreachable!("no pre-copy rounds"),
        };
        if let Some(why) = switch {
            out.stop_reason = match stop {
                Some((reason, _)) => reason.name().into(),
                None => "not_converging".into(),
            };
            out.postcopy = true;
            if req.mode == Mode::Auto {
                out.chosen = Some(("hybrid".into(), why.clone()));
                src.control.update(|s| s.chosen_mode = Some("hybrid".into()));
            }
            tracing::info!(rounds = round + 1, "migration: switching to post-copy: {why}");
            return Ok(out);
        }
        round += 1;
        src.control.phase("rounds");
    }
    out.pending = to_send;
    Ok(out)
}

async fn drive(
    src: &Source,
    req: &MigrateRequest,
    link: &mut Link,
    t0: Instant,
    cpu0: u64,
) -> Result<Report, MigrateError> {
    link.until("the destination's hello", true, |l| l.up).await?;
    let all = all_pfns(&src.layout);
    src.control.update(|s| s.total_pages = all.len() as u64);
    let mut held = Held::new(&src.layout);
    let mut pre = match req.mode {
        Mode::Stopcopy => Precopied { stop_reason: "stopcopy".into(), ..Precopied::default() },
        Mode::Postcopy | Mode::Demand => {
            // Pages the guest never touched are zero, as the destination's fresh memory is:
            // they are held. The dirty log (on first) takes back any touched before the pause.
            enable_dirty_log(src).await?;
            held.set(untouched(src, all.clone()).await?, true);
            Precopied { stop_reason: req.mode.name().into(), postcopy: true, ..Precopied::default() }
        }
        Mode::Precopy | Mode::Hybrid | Mode::Auto => precopy(src, req, link, &all, &mut held).await?,
    };
    let postcopy = pre.postcopy;

    // Stop: pause; the last dirty pages (everything for stopcopy, nothing for post-copy, whose
    // pages move after the resume) and the state.
    src.control.phase("stop-and-copy");
    if src.control.cancelled() {
        return Err(MigrateError::Cancelled("stop-and-copy"));
    }
    let stopcopy = req.mode == Mode::Stopcopy;
    let verify = req.verify;
    let vm = Arc::clone(&src.vm);
    let all2 = all.clone();
    let pending = std::mem::take(&mut pre.pending);
    let paused_at = Instant::now();
    let (pfns, dirty, state, digest) = tokio::task::spawn_blocking(move || {
        let mut g = lock(&vm);
        g.pause()?;
        let r = (|| {
            let dirty: Vec<u64> = if stopcopy { Vec::new() } else { g.harvest_dirty()?.pages().collect() };
            let pfns: Vec<u64> = if stopcopy {
                all2
            } else if postcopy {
                Vec::new()
            } else {
                let mut v: Vec<u64> = dirty.iter().copied().chain(pending).collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            let state = g.save_state()?.encode()?;
            let digest = if verify { Some(g.memory_digest()?) } else { None };
            Ok::<_, MigrateError>((pfns, dirty, state, digest))
        })();
        if r.is_err() {
            g.resume();
        }
        r
    })
    .await
    .map_err(|e| MigrateError::Session(format!("pause task: {e}")))??;
    held.set(dirty, false);
    failover::failpoint::hit("migrate.paused");
    let captured_at = Instant::now();
    let mut zero_skipped = pre.zero_skipped;
    let mut round0_bytes = pre.round0_bytes;
    let result = async {
        if failover::failpoint::fires("migrate.stall-switchover") {
            // Tests: hold the paused guest long enough for a cancel to land.
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && !src.control.cancelled() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let before = link.stats().await?.epoch_bytes;
        // The last pieces; the final one carries the state.
        let chunks: Vec<&[u64]> = if pfns.is_empty() { vec![&[][..]] } else { pfns.chunks(CHUNK_PAGES).collect() };
        let n = chunks.len();
        let mut epoch = 0;
        let mut final_pages = 0;
        for (i, chunk) in chunks.into_iter().enumerate() {
            if src.control.cancelled() {
                return Err(MigrateError::Cancelled("stop-and-copy"));
            }
            let buf = link.spare.pop().unwrap_or_default();
            let (pages, z) = copy(&src.vm, chunk.to_vec(), stopcopy, buf).await?;
            zero_skipped += z;
            final_pages += pages.pfns.len() as u64;
            let st = if i + 1 == n { state.clone() } else { Vec::new() };
            // The session's first epoch is a baseline (stop-and-copy, and a post-copy with no
            // round before it).
            let baseline = i == 0 && (stopcopy || link.submitted == 0);
            epoch = link.submit(pages, st, baseline).await?.0;
        }
        let after = link.stats().await?.epoch_bytes;
        if stopcopy {
            round0_bytes = after - before;
        }
        if postcopy {
            // From here the source never resumes: the destination runs the guest as soon as it
            // has the state and the map.
            return Ok((epoch, final_pages));
        }
        let switch = StreamCommand::with(move |s: &mut Sender, _| {
            if let Err(e) = s.switch_over(epoch, SwitchMode::Complete, &[]) {
                tracing::error!("migration: switch-over: {e}");
            }
        });
        if link.session.command(switch).await.is_err() {
            return Err(link.gone().await);
        }
        link.until("the destination to acknowledge the switch-over epoch", true, |l| l.acked >= epoch).await?;
        if failover::failpoint::fires("migrate.stall-handover") {
            // Tests: the destination holds the whole guest (and builds it, paused); hold the
            // hand-over long enough for a cancel to land.
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && !src.control.cancelled() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if src.control.cancelled() {
            return Err(MigrateError::Cancelled("stop-and-copy"));
        }
        Ok((epoch, final_pages))
    }
    .await;
    let (epoch, final_pages) = match result {
        Ok(v) => v,
        Err(e) => {
            // Before the hand-over (or the post-copy switch-over): the guest runs on here.
            let vm = Arc::clone(&src.vm);
            let _ = tokio::task::spawn_blocking(move || lock(&vm).resume()).await;
            tracing::warn!(
                "migration: guest resumed at the source after {} ms paused",
                paused_at.elapsed().as_millis()
            );
            return Err(e);
        }
    };
    let (resumed_at, acked_at, postcopy_report) = if postcopy {
        let runs = held.runs();
        let held_pages = held.count();
        let missing = held.missing();
        let map_runs = runs.len();
        src.control.phase("postcopy");
        // From here the guest's memory changes only by reverse checkpoints (pages the
        // destination holds): the session answers page requests from it directly.
        let mem = lock(&src.vm).memory().clone();
        let _ = link.redial.serve_from.set(mem.clone());
        let (reverse, prepared) = if req.no_reverse {
            (None, None)
        } else {
            let lineage = link.lineage().await.map_err(|e| MigrateError::PostcopyLost {
                epoch,
                why: format!("the forward lineage for the reverse session: {}", transport::error_chain(&e)),
            })?;
            let lineage = lineage.ok_or_else(|| MigrateError::PostcopyLost {
                epoch,
                why: "the forward session has no lineage for the reverse session".into(),
            })?;
            let start =
                replication_proto::migration::reverse_start(replication_proto::message::Position { lineage, epoch });
            let mut cfg = replication_proto::ReceiverConfig::new(
                Role::MigrationSource,
                src.identity.clone(),
                src.layout.clone(),
                0,
            );
            cfg.timing = src.timing;
            cfg.resend_timeout = Duration::from_secs(1);
            let setup = reverse::Setup {
                endpoint: link.redial.endpoint.clone().ok_or_else(|| MigrateError::PostcopyLost {
                    epoch,
                    why: "no endpoint for the reverse session".into(),
                })?,
                dest_name: req.dest_name.clone(),
                cfg,
                start,
            };
            // SAFETY: the guest stays paused until `Reverse::stop` returned: `recover` stops it
            // before the rebuild and resume, and a completed post-copy stops it before handing
            // over (the guest never runs here again then).
            let rev =
                unsafe { reverse::Reverse::start(setup, mem, reverse::Committed { epoch, state: state.clone() }) }
                    .map_err(|e| MigrateError::PostcopyLost { epoch, why: transport::error_chain(&e) })?;
            // The VM a recovery would resume, built now: a recovery then only loads state.
            let vm = Arc::clone(&src.vm);
            let prepared = tokio::task::spawn_blocking(move || lock(&vm).prepare_rebuild());
            (Some(rev), Some(prepared))
        };
        let mode = if reverse.is_some() { SwitchMode::PostCopyReverse } else { SwitchMode::PostCopy };
        let cmd = StreamCommand::with(move |s: &mut Sender, _| {
            if let Err(e) = s.switch_over(epoch, mode, &runs) {
                tracing::error!("migration: post-copy switch-over: {e}");
            }
        });
        link.session.command(cmd).await.map_err(|_| MigrateError::PostcopyLost {
            epoch,
            why: "the session task ended at the switch-over".into(),
        })?;
        tracing::info!(epoch, held = held_pages, missing, map_runs, "migration: post-copy switch-over sent");
        failover::failpoint::hit("migrate.postcopy");
        let acked_at = Instant::now();
        link.deadline =
            link.deadline.max(Instant::now() + Duration::from_secs(req.timeout_s.saturating_mul(2).max(30)));
        let recover = Duration::from_secs(req.timeout_s);
        let served = postcopy::serve(src, link, &held, req.mode == Mode::Demand, recover, reverse.as_ref()).await;
        let (served, reverse_report) = match (served, reverse) {
            (Ok(s), None) => (s, None),
            (Err(e), None) => return Err(MigrateError::PostcopyLost { epoch, why: transport::error_chain(&e) }),
            (Err(e), Some(rev)) => {
                let prepared = match prepared {
                    Some(p) => {
                        p.await.ok().and_then(|r| r.map_err(|e| tracing::warn!("prepare the recovery vm: {e}")).ok())
                    }
                    None => None,
                };
                return Err(reverse::recover(src, rev, prepared, epoch, transport::error_chain(&e)).await);
            }
            (Ok(s), Some(rev)) => {
                // Every page is at the destination: give this copy up for good (no more acks),
                // then tell the destination, which only now stops holding the guest's output.
                let (_, copy, counts) = rev.stop().await;
                tracing::info!(
                    last = copy.epoch,
                    commits = counts.commits,
                    pages = counts.pages,
                    sessions = counts.sessions,
                    "post-copy: reverse checkpoints stopped; handing the guest over"
                );
                failover::failpoint::hit("migrate.reverse-given-up");
                let before = link.resumed.take();
                link.handover(epoch).await?;
                let deadline = link.deadline;
                link.deadline = Instant::now() + Duration::from_secs(5);
                let confirmed =
                    link.until("the destination to confirm the hand-over", false, |l| l.resumed.is_some()).await;
                if let Err(e) = &confirmed {
                    tracing::warn!(
                        "post-copy: the destination did not confirm the hand-over ({}): it holds the guest's output until it learns of it",
                        transport::error_chain(e)
                    );
                }
                link.deadline = deadline;
                link.resumed = link.resumed.or(before);
                let r = ReverseReport {
                    reverse_checkpoints: counts.commits,
                    reverse_pages: counts.pages,
                    reverse_sessions: counts.sessions,
                    handover_confirmed: confirmed.is_ok(),
                };
                (s, Some(r))
            }
        };
        let complete = served.complete.unwrap_or_default();
        let resumed_at = served.resumed_at.unwrap_or_else(Instant::now);
        let report = PostcopyReport {
            pages_held_at_switchover: held_pages,
            pages_postcopied: missing,
            postcopy_faults: complete.faults,
            fault_us_p50: f64::from(complete.fault_us_p50),
            fault_us_p99: f64::from(complete.fault_us_p99),
            vcpu_blocked_ms: complete.blocked_us as f64 / 1e3,
            pages_pushed: served.pages_pushed,
            pages_demanded: served.pages_served,
            page_requests: served.requests,
            reconnects: served.reconnects,
            postcopy_ms: resumed_at.elapsed().as_secs_f64() * 1e3,
            reverse: reverse_report,
        };
        (resumed_at, acked_at, Some(report))
    } else {
        // The hand-over: from here on this copy never runs again.
        let acked_at = Instant::now();
        src.control.phase("handover");
        failover::failpoint::hit("migrate.handover");
        link.handover(epoch).await?;
        link.deadline = link.deadline.max(Instant::now() + Duration::from_secs(30));
        if let Err(e) = link.until("the destination to resume the guest", false, |l| l.resumed.is_some()).await {
            return Err(MigrateError::Unconfirmed { epoch, why: transport::error_chain(&e) });
        }
        (Instant::now(), acked_at, None)
    };
    let downtime = resumed_at - paused_at;
    let resumed = link.resumed.unwrap_or(replication_proto::migration::Resumed { epoch, cpu_us: 0, peak_rss_bytes: 0 });
    let stats = link.stats().await?;
    tracing::info!(
        frames_sent = stats.frames_sent,
        frames_resent = stats.frames_resent,
        bytes_sent = stats.bytes_sent,
        epoch_bytes = stats.epoch_bytes,
        "migration: sender counters"
    );
    let by = |e: PageEncoding| stats.pages_by_encoding[e as usize];
    let downtime_ms = downtime.as_secs_f64() * 1e3;
    let bytes_retransferred = stats.epoch_bytes.saturating_sub(round0_bytes);
    let cpu1 = vmm::procstat::cpu_ns_excluding_vcpus().unwrap_or(cpu0);
    let (chosen_mode, choice_reason) = pre.chosen.map_or((None, None), |(m, r)| (Some(m), Some(r)));
    Ok(Report {
        mode: req.mode.name().into(),
        stop_reason: pre.stop_reason,
        predicted_downtime_ms: pre.predicted,
        rounds: pre.rounds,
        final_pages,
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        downtime_ms,
        downtime_parts: DowntimeParts {
            capture_ms: (captured_at - paused_at).as_secs_f64() * 1e3,
            transfer_ms: (acked_at - captured_at).as_secs_f64() * 1e3,
            resume_ms: resumed_at.saturating_duration_since(acked_at).as_secs_f64() * 1e3,
        },
        downtime_over_prediction: pre.predicted.is_some_and(|p| downtime_ms > p.max(req.downtime_ms as f64) + 1.0),
        bytes_transferred: stats.bytes_sent,
        bytes_retransferred,
        pages: PageCounts {
            zero: by(PageEncoding::Zero) + zero_skipped,
            dedup: by(PageEncoding::Dedup),
            unchanged: by(PageEncoding::Unchanged),
            delta: by(PageEncoding::Delta),
            lz4: by(PageEncoding::Lz4),
            raw: by(PageEncoding::Raw),
        },
        switchover_epoch: epoch,
        source_cpu_ms: cpu1.saturating_sub(cpu0) as f64 / 1e6,
        dest_cpu_ms: resumed.cpu_us as f64 / 1e3,
        source_peak_rss_bytes: vmm::procstat::peak_rss_bytes().unwrap_or(0),
        dest_peak_rss_bytes: resumed.peak_rss_bytes,
        memory_digest: digest.map(|d| format!("{d:016x}")),
        chosen_mode,
        choice_reason,
        switchover_round: if postcopy && pre.rounds_done > 0 { Some(pre.rounds_done) } else { None },
        postcopy: postcopy_report,
    })
}
