//! Prometheus metrics on an optional `--metrics <addr>`: the numbers of `understudy status` by
//! the Prometheus naming conventions ([`render`]: base units in the names, `_total` counters,
//! histograms of the checkpoint pause and ack latency, states as state sets), and the node's
//! role with a counter of its transitions ([`render_role`]). docs/operations.md lists them.
//!
//! The text format and the HTTP server are written here by hand: the format is a few lines
//! per family, and the server is a blocking loop with the bounds below (no async runtime
//! on this thread, no HTTP library to keep within them). Read-only, but it tells
//! about the VM: it binds only a loopback address unless `--metrics-public` says otherwise.
//!
//! No client can hold it: each connection is served on its own thread, at most
//! [`Limits::max_connections`] at a time (more wait in the kernel's accept queue until one
//! ends); a request must arrive whole within [`Limits::request_timeout`] (a deadline for the
//! whole request, not per read, so a byte-a-second client is cut off too) and within
//! [`Limits::max_request_bytes`], else it is answered 408 or 431 and closed; a response that
//! the client does not read is given up after [`WRITE_TIMEOUT`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::status::Status;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A non-loopback address without the opt-in.
    #[error(
        "metrics address {0} is not a loopback address: the endpoint is unauthenticated and tells \
         anyone who reaches it about the VM; bind 127.0.0.1 or [::1] (and scrape through a tunnel or \
         proxy), or pass --metrics-public to serve it on {0} anyway"
    )]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("bind metrics endpoint {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The bound address could not be read back.
    #[error("metrics endpoint address")]
    LocalAddr(#[source] std::io::Error),
    /// The serving thread could not start.
    #[error("spawn metrics thread")]
    Spawn(#[source] std::io::Error),
}

/// How long writing a response may take before the connection is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one client can make the endpoint hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time from accepting a connection to the end of its request's headers. Default 2 s.
    pub request_timeout: Duration,
    /// Largest request (request line and headers). Default 8 KiB.
    pub max_request_bytes: usize,
    /// Connections served at once. Default 8.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { request_timeout: Duration::from_secs(2), max_request_bytes: 8 << 10, max_connections: 8 }
    }
}

/// Refuses a non-loopback `addr` unless `public`: the endpoint is unauthenticated.
pub fn check_addr(addr: SocketAddr, public: bool) -> Result<(), MetricsError> {
    if !public && !addr.ip().to_canonical().is_loopback() {
        return Err(MetricsError::NotLoopback(addr));
    }
    Ok(())
}

/// Phases a migration source goes through (`understudy_migration_phase`).
pub const SOURCE_PHASES: [&str; 9] =
    ["connecting", "round-0", "rounds", "stop-and-copy", "handover", "postcopy", "completed", "failed", "recovered"];
/// Phases a migration destination goes through (`understudy_migration_destination_phase`).
pub const DESTINATION_PHASES: [&str; 6] = ["waiting", "receiving", "switch-over", "resuming", "running", "failed"];
/// Protection states (`understudy_protection_state`).
pub const PROTECTION_STATES: [&str; 6] = ["unprotected", "syncing", "protected", "degraded", "stopping", "failed"];
/// Backup states (`understudy_backup_state`).
pub const BACKUP_STATES: [&str; 4] = ["waiting", "syncing", "consistent", "promoted"];

/// Writes the Prometheus text format: each family once, with `# HELP` and `# TYPE`.
#[derive(Default)]
struct Writer {
    out: String,
}

impl Writer {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        self.out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    }

    fn line(&mut self, name: &str, labels: &str, v: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push_str(&format!("{{{labels}}}"));
        }
        self.out.push_str(&format!(" {}\n", fmt_value(v)));
    }

    fn gauge(&mut self, name: &str, help: &str, v: f64) {
        self.head(name, "gauge", help);
        self.line(name, "", v);
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        self.head(name, "counter", help);
        self.line(name, "", v as f64);
    }

    /// A state set: one sample per known state (and `now` if it is not one of them), 1 for
    /// `now` and 0 for the others.
    fn state_set(&mut self, name: &str, label: &str, help: &str, known: &[&str], now: &str) {
        self.head(name, "gauge", help);
        let extra = (!known.contains(&now)).then_some(now);
        for s in known.iter().copied().chain(extra) {
            self.line(name, &format!("{label}=\"{}\"", escape(s)), f64::from(u8::from(s == now)));
        }
    }

    fn histogram(&mut self, name: &str, help: &str, h: &primary::stats::Histogram) {
        self.head(name, "histogram", help);
        for (le, n) in h.cumulative() {
            let le = if le.is_infinite() { "+Inf".to_string() } else { fmt_value(le) };
            self.line(&format!("{name}_bucket"), &format!("le=\"{le}\""), n as f64);
        }
        self.line(&format!("{name}_sum"), "", h.sum);
        self.line(&format!("{name}_count"), "", h.count as f64);
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders a status in the Prometheus text format, by the naming conventions: base units in
/// the names (`_seconds`, `_bytes`), counters ending in `_total`, states as state sets
/// (`understudy_protection_state{state="protected"} 1`, the other states 0).
pub fn render(status: &Status) -> String {
    let mut w = Writer::default();
    match status {
        Status::Vm(vm) => {
            w.gauge("understudy_uptime_seconds", "Seconds since the process started.", vm.uptime_s);
            w.gauge("understudy_memory_bytes", "Guest memory size in bytes.", vm.memory_bytes as f64);
            let state = serde_json::to_value(vm.state).ok();
            let state = state.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown");
            w.state_set("understudy_vm_state", "state", "The VM's state.", &["running", "paused", "stopped"], state);
            if let crate::status::Origin::Promoted { replayed_frames, output_written_frames, .. } = &vm.origin {
                w.counter(
                    "understudy_promotion_replayed_frames_total",
                    "Inbound frames replayed into this guest when it was promoted.",
                    *replayed_frames,
                );
                w.counter(
                    "understudy_promotion_output_written_frames_total",
                    "Output frames of the replica's epochs the primary had not released, written when this guest was promoted.",
                    *output_written_frames,
                );
            }
            render_protection(&mut w, vm.protection.as_ref());
            if let Some(m) = &vm.migration {
                render_migration_source(&mut w, m);
            }
            render_arbitration(&mut w, vm.arbitration.as_ref());
            if let Some(r) = &vm.reprotect {
                render_reprotect(&mut w, r);
            }
        }
        Status::Backup(b) => {
            w.gauge("understudy_uptime_seconds", "Seconds since the process started.", b.uptime_s);
            w.gauge("understudy_memory_bytes", "Guest memory size in bytes.", b.memory_bytes as f64);
            if let Some(s) = &b.backup {
                render_backup(&mut w, s);
            }
            if let Some(m) = &b.migration {
                render_migration_destination(&mut w, m);
            }
            render_arbitration(&mut w, b.arbitration.as_ref());
        }
    }
    w.out
}

fn render_protection(w: &mut Writer, p: Option<&primary::stats::StatusReport>) {
    let state = p.map_or("unprotected".to_string(), |p| p.state.to_string());
    w.state_set("understudy_protection_state", "state", "The VM's protection state.", &PROTECTION_STATES, &state);
    let Some(p) = p else { return };
    w.gauge("understudy_protection_state_seconds", "Seconds in the current protection state.", p.state_for_s);
    w.counter("understudy_epochs_total", "Epochs checkpointed since protection started.", p.epochs);
    w.histogram(
        "understudy_checkpoint_pause_seconds",
        "Time the guest was paused per checkpoint, seconds.",
        &p.pause_seconds,
    );
    w.histogram(
        "understudy_ack_latency_seconds",
        "Time from submitting a checkpoint to the backup's acknowledgement, seconds.",
        &p.ack_latency_seconds,
    );
    w.gauge(
        "understudy_replica_lag_epochs",
        "Epochs shipped to the backup but not yet committed there.",
        p.replica_lag_epochs as f64,
    );
    w.gauge(
        "understudy_hot_pages",
        "Pages the guest rewrites every epoch, kept writable and copied at every checkpoint.",
        p.hot_pages as f64,
    );
    w.gauge("understudy_acked_epoch", "Last epoch the backup committed (harvest sequence).", p.last_acked_epoch as f64);
    w.gauge(
        "understudy_output_held_bytes",
        "Guest output bytes held until the backup acknowledges their epoch.",
        p.held_output_bytes as f64,
    );
    w.gauge("understudy_output_held_frames", "Guest output frames held.", p.held_output_frames as f64);
    w.gauge(
        "understudy_output_held_cap_bytes",
        "Cap on held output bytes; frames beyond it are dropped.",
        primary::output::DEFAULT_HOLD_CAP as f64,
    );
    if let Some(sync) = &p.sync {
        w.gauge("understudy_sync_round", "The sync's round under way (0: the full copy).", f64::from(sync.round));
        w.gauge(
            "understudy_sync_scanned_ratio",
            "Share of guest memory the sync's round has looked at (0-1).",
            sync.scanned as f64 / sync.total_pages.max(1) as f64,
        );
    }
    if let Some(last) = &p.last_sync {
        w.gauge(
            "understudy_last_sync_seconds",
            "How long the last completed sync took, seconds.",
            last.ms as f64 / 1e3,
        );
        w.gauge(
            "understudy_last_sync_largest_piece_pages",
            "Pages of the largest piece (epoch on the wire) of the last completed sync.",
            last.largest_piece_pages as f64,
        );
    }
    w.counter("understudy_bytes_sent_total", "Encoded checkpoint bytes sent to the backup.", p.bytes_sent);
    w.counter(
        "understudy_raw_bytes_sent_total",
        "Raw harvested bytes handed to the sender, before encoding.",
        p.raw_bytes_sent,
    );
    if let Some(i) = &p.inbound {
        w.counter(
            "understudy_inbound_forwarded_frames_total",
            "Frames delivered to the guest and forwarded to the backup's inbound log.",
            i.forwarded_frames,
        );
        w.counter(
            "understudy_inbound_queue_dropped_frames_total",
            "Delivered frames not forwarded because the forwarding queue was full.",
            i.queue_dropped_frames,
        );
        w.counter(
            "understudy_inbound_refused_frames_total",
            "Delivered frames the replication session refused to forward (backlog, link down).",
            i.refused_frames,
        );
        w.counter(
            "understudy_inbound_side_copy_sent_frames_total",
            "Side copies (authenticated datagrams) of delivered frames handed to the kernel.",
            i.side_copy_sent_frames,
        );
        w.counter(
            "understudy_inbound_side_copy_dropped_frames_total",
            "Side copies not sent (socket buffer full, no route, refused, frame too large).",
            i.side_copy_dropped_frames,
        );
    }
}

fn render_backup(w: &mut Writer, s: &backup::server::BackupStatus) {
    w.state_set("understudy_backup_state", "state", "The backup's state.", &BACKUP_STATES, &s.state);
    w.gauge("understudy_backup_connected", "1 while a primary is connected.", f64::from(u8::from(s.connected)));
    if let Some(e) = s.committed_epoch {
        w.gauge("understudy_backup_committed_epoch", "Last epoch committed to the replica.", e as f64);
    }
    if let Some(e) = s.consistent_epoch {
        w.gauge("understudy_backup_consistent_epoch", "Last consistent (promotable) epoch.", e as f64);
    }
    if let Some(t) = s.since_last_commit_s {
        w.gauge("understudy_backup_last_commit_age_seconds", "Seconds since the last commit.", t);
    }
    w.counter("understudy_backup_commits_total", "Checkpoints committed.", s.commits);
    w.counter("understudy_backup_rejected_total", "Checkpoints refused (replica unchanged).", s.rejected);
    w.counter(
        "understudy_backup_failed_sessions_total",
        "Sessions that ended on an internal failure.",
        s.failed_sessions,
    );
    w.counter("understudy_backup_pages_written_total", "Pages written into the replica.", s.pages);
    let i = &s.inbound_log;
    w.gauge("understudy_backup_inbound_log_frames", "Frames in the inbound log now.", i.frames as f64);
    w.gauge("understudy_backup_inbound_log_bytes", "Bytes of the frames in the inbound log now.", i.bytes as f64);
    w.counter(
        "understudy_backup_inbound_received_frames_total",
        "Frames the primary forwarded to the inbound log.",
        i.received_frames,
    );
    w.counter(
        "understudy_backup_inbound_pruned_frames_total",
        "Inbound frames dropped because their epoch was committed.",
        i.pruned_frames,
    );
    w.counter(
        "understudy_backup_inbound_overflow_frames_total",
        "Inbound frames dropped to keep the log within its bounds.",
        i.overflow_frames,
    );
    w.counter(
        "understudy_backup_inbound_replayed_frames_total",
        "Inbound frames replayed into the promoted guest.",
        i.replayed_frames,
    );
    render_output_log(w, &s.output_log);
    let c = &i.side_copy;
    w.counter(
        "understudy_backup_inbound_side_copy_received_frames_total",
        "Side copies (datagrams beside the session) read from the side-copy socket.",
        c.side_copy_received_frames,
    );
    w.counter(
        "understudy_backup_inbound_side_copy_logged_frames_total",
        "Side copies logged (the session's copy had not come yet).",
        c.side_copy_logged_frames,
    );
    w.counter(
        "understudy_backup_inbound_side_copy_stale_frames_total",
        "Side copies not needed (epoch committed, frame already logged, earlier connection).",
        c.side_copy_stale_frames,
    );
    w.counter(
        "understudy_backup_inbound_side_copy_rejected_frames_total",
        "Side copies refused: malformed or failing authentication.",
        c.side_copy_rejected_frames,
    );
    let l = &i.lan_copy;
    w.gauge(
        "understudy_backup_lan_copy_frames",
        "LAN copies kept now (frames read from the standby's tap).",
        l.lan_copy_frames as f64,
    );
    w.counter(
        "understudy_backup_lan_copy_read_frames_total",
        "Frames read from the standby's tap (LAN copies).",
        l.lan_copy_frames_read,
    );
    w.counter(
        "understudy_backup_lan_copy_overflow_frames_total",
        "LAN copies let go to keep within their bounds.",
        l.lan_copy_overflow_frames,
    );
    w.counter(
        "understudy_backup_lan_copy_replayed_frames_total",
        "LAN copies replayed into the promoted guest (frames the primary never delivered).",
        l.lan_copy_replayed_frames,
    );
    w.counter(
        "understudy_backup_lan_copy_unmatched_total",
        "Promotions that replayed no LAN copy: the newest delivered frames were not among them.",
        l.lan_copy_unmatched,
    );
}

/// The backup's output log (see `backup::output_log`).
fn render_output_log(w: &mut Writer, o: &backup::output_log::OutputLogReport) {
    w.gauge("understudy_backup_output_log_frames", "Frames in the output log now.", o.frames as f64);
    w.gauge("understudy_backup_output_log_bytes", "Bytes of the frames in the output log now.", o.bytes as f64);
    w.gauge("understudy_backup_output_log_epochs", "Epochs whose output is in the output log now.", o.epochs as f64);
    for (name, help, v) in [
        ("received", "Output frames the primary forwarded to the output log.", o.received_frames),
        ("released", "Output frames dropped because the primary reported their epoch released.", o.released_frames),
        ("overflow", "Output frames dropped to keep the log within its bounds.", o.overflow_frames),
        ("written", "Output frames written to the TAP at promotion.", o.written_frames),
        ("dropped", "Output frames not written at promotion (epoch not in the replica, or refused).", o.dropped_frames),
    ] {
        w.counter(&format!("understudy_backup_output_{name}_frames_total"), help, v);
    }
}

fn render_migration_source(w: &mut Writer, m: &primary::migrate::MigrationStatus) {
    w.state_set("understudy_migration_phase", "phase", "The migration's phase (source).", &SOURCE_PHASES, &m.phase);
    w.gauge("understudy_migration_round", "Pre-copy round being sent (0 is the full copy).", f64::from(m.round));
    let left = m.postcopy_pages_left.unwrap_or(m.round_pages_left);
    w.gauge(
        "understudy_migration_pages_left",
        "Pages still to send: of the current round, or in post-copy those the destination lacks.",
        left as f64,
    );
    w.counter("understudy_migration_pages_sent_total", "Pages sent so far (all rounds).", m.pages_sent);
    w.counter("understudy_migration_bytes_sent_total", "Bytes put on the migration link.", m.bytes_sent);
    w.gauge("understudy_migration_elapsed_seconds", "Seconds since the migration started.", m.elapsed_ms / 1e3);
    if let Some(d) = m.predicted_downtime_ms {
        w.gauge(
            "understudy_migration_predicted_downtime_seconds",
            "Predicted downtime of a stop-and-copy now.",
            d / 1e3,
        );
    }
    w.counter(
        "understudy_migration_postcopy_reconnects_total",
        "Post-copy link breaks that were reconnected.",
        u64::from(m.postcopy_reconnects),
    );
    if let Some(n) = m.reverse_commits {
        w.counter("understudy_migration_reverse_commits_total", "Reverse checkpoints committed here.", n);
    }
    if let Some(up) = m.reverse_up {
        w.gauge(
            "understudy_migration_reverse_up",
            "1 while the reverse checkpoint session is up.",
            f64::from(u8::from(up)),
        );
    }
}

fn render_migration_destination(w: &mut Writer, m: &backup::receive::ReceiveStatus) {
    w.state_set(
        "understudy_migration_destination_phase",
        "phase",
        "The migration's phase (destination).",
        &DESTINATION_PHASES,
        &m.phase,
    );
    w.counter("understudy_migration_epochs_received_total", "Epochs committed here.", m.epochs);
    w.counter("understudy_migration_pages_received_total", "Pages written here.", m.pages);
    w.counter("understudy_migration_refused_peers_total", "Peers refused before a session.", m.refused_peers);
    w.counter(
        "understudy_migration_postcopy_faults_total",
        "Faults that needed a page from the source.",
        m.postcopy_faults,
    );
    if let Some(n) = m.postcopy_missing {
        w.gauge("understudy_migration_postcopy_missing_pages", "Post-copy: pages not here yet.", n as f64);
    }
}

fn render_reprotect(w: &mut Writer, r: &crate::reprotect::ReprotectStatus) {
    w.state_set(
        "understudy_reprotect_state",
        "state",
        "Automatic re-protection after a promotion.",
        &crate::reprotect::Phase::ALL,
        r.state.name(),
    );
    w.counter("understudy_reprotect_attempts_total", "Re-protection attempts (standbys probed).", r.attempts);
    w.counter("understudy_reprotect_failures_total", "Re-protection attempts that failed.", r.failures);
    if let Some(s) = r.took_s {
        w.gauge("understudy_reprotect_duration_seconds", "From the promotion to the standby recorded as backup.", s);
    }
}

fn render_arbitration(w: &mut Writer, a: Option<&crate::status::ArbitrationStatus>) {
    if let Some(a) = a {
        let state = match a.state {
            crate::status::ArbitrationState::Running => "running",
            crate::status::ArbitrationState::Failed => "failed",
        };
        w.state_set(
            "understudy_arbitration_state",
            "state",
            "The arbitration agent's state.",
            &["running", "failed"],
            state,
        );
    }
}

/// The node's role as a labelled gauge (`understudy_node_role{value="protected"} 1`) and how
/// often each transition happened (`understudy_node_role_transitions_total{from=..,to=..}`).
pub fn render_role(role: &str, transitions: &[(&str, &str, u64)]) -> String {
    let mut out = format!(
        "# HELP understudy_node_role The node's role.\n# TYPE understudy_node_role gauge\nunderstudy_node_role{{value=\"{role}\"}} 1\n"
    );
    out.push_str("# HELP understudy_node_role_transitions_total Role changes, by from and to.\n");
    out.push_str("# TYPE understudy_node_role_transitions_total counter\n");
    for (from, to, n) in transitions {
        out.push_str(&format!("understudy_node_role_transitions_total{{from=\"{from}\",to=\"{to}\"}} {n}\n"));
    }
    out
}

/// The text a scrape answers, made at each scrape.
pub type Source = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `addr` from `body()` (e.g. [`render`] of a status) in background
/// threads; returns the address bound. A non-loopback `addr` is refused unless `public`
/// ([`check_addr`]).
pub fn serve(addr: SocketAddr, public: bool, limits: Limits, body: Source) -> Result<SocketAddr, MetricsError> {
    check_addr(addr, public)?;
    let listener = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(MetricsError::LocalAddr)?;
    tracing::info!(addr = %bound, public, "prometheus metrics at /metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || accept_loop(listener, limits, body))
        .map_err(MetricsError::Spawn)?;
    Ok(bound)
}

/// Connections being served: the accept loop waits while it is at the bound.
struct Slots {
    open: Mutex<usize>,
    freed: Condvar,
}

/// Gives its slot back when the connection's thread ends, however it ends.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        *open -= 1;
        self.0.freed.notify_one();
    }
}

fn accept_loop(listener: TcpListener, limits: Limits, body: Source) {
    let slots = Arc::new(Slots { open: Mutex::new(0), freed: Condvar::new() });
    let max = limits.max_connections.max(1);
    let mut last_warned: Option<Instant> = None;
    loop {
        {
            let mut open = slots.open.lock().unwrap_or_else(|e| e.into_inner());
            if *open >= max {
                // At most once a minute: a client holding every slot must not flood the log.
                if last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(open = *open, "metrics: connection bound reached, new connections wait");
                    last_warned = Some(Instant::now());
                }
                while *open >= max {
                    open = slots.freed.wait(open).unwrap_or_else(|e| e.into_inner());
                }
            }
            *open += 1;
        }
        let slot = Slot(Arc::clone(&slots));
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of descriptors, say: do not spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                drop(slot);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let body = Arc::clone(&body);
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
            let _slot = slot;
            serve_one(conn, limits, &*body);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "metrics: cannot spawn a connection thread");
        }
    }
}

/// Why a request was not read.
#[derive(Debug, PartialEq, Eq)]
enum RequestError {
    /// The headers did not end within the size bound.
    TooLarge,
    /// The headers did not end before the deadline.
    Timeout,
    /// The client went away (or the socket failed).
    Gone,
}

/// Reads a request's line and headers (up to the blank line), within `max` bytes and by
/// `deadline`.
fn read_request(conn: &mut TcpStream, deadline: Instant, max: usize) -> Result<Vec<u8>, RequestError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Ok(buf);
        }
        if buf.len() >= max {
            return Err(RequestError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(RequestError::Timeout);
        }
        conn.set_read_timeout(Some(left)).map_err(|_| RequestError::Gone)?;
        let want = chunk.len().min(max - buf.len());
        match conn.read(&mut chunk[..want]) {
            Ok(0) => return Err(RequestError::Gone),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(RequestError::Timeout);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Err(RequestError::Gone),
        }
    }
}

/// Where the headers end (the blank line), if they do.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

/// Whether a request head asks for `GET /metrics` (with or without a query).
fn is_metrics_get(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next());
    method == Some(b"GET") && target.is_some_and(|t| t == b"/metrics" || t.starts_with(b"/metrics?"))
}

fn serve_one(mut conn: TcpStream, limits: Limits, body: &dyn Fn() -> String) {
    let deadline = Instant::now() + limits.request_timeout;
    let peer = conn.peer_addr().ok();
    let (code, body) = match read_request(&mut conn, deadline, limits.max_request_bytes) {
        Ok(head) if is_metrics_get(&head) => ("200 OK", body()),
        Ok(_) => ("404 Not Found", "try /metrics\n".to_string()),
        Err(RequestError::TooLarge) => {
            tracing::debug!(?peer, max = limits.max_request_bytes, "metrics: request too large");
            ("431 Request Header Fields Too Large", "request too large\n".to_string())
        }
        Err(RequestError::Timeout) => {
            tracing::debug!(?peer, "metrics: request not complete in time");
            ("408 Request Timeout", "request not complete in time\n".to_string())
        }
        Err(RequestError::Gone) => return,
    };
    let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = write!(
        conn,
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

/// Reads a scrape back (for tests and tools that check an endpoint).
pub mod read {
    /// The families of a scrape, `(name, type)`, checked by the conventions: each family has
    /// `# HELP` right before its `# TYPE` and appears once, each sample belongs to the family
    /// above it (a histogram's `_bucket`, `_sum`, `_count`), counters and only they end in
    /// `_total`, and no name carries a unit other than the base one (`_us`, `_ms`). The error
    /// names the first rule broken.
    pub fn families(text: &str) -> Result<Vec<(String, String)>, String> {
        let mut fams: Vec<(String, String)> = Vec::new();
        let mut helped = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helped = rest.split(' ').next().map(str::to_string);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or_else(|| format!("bad line {line:?}"))?;
                if helped.as_deref() != Some(name) {
                    return Err(format!("no # HELP right before # TYPE {name}"));
                }
                if fams.iter().any(|(n, _)| n == name) {
                    return Err(format!("family {name} appears twice"));
                }
                if (kind == "counter") != name.ends_with("_total") {
                    return Err(format!("{name} is a {kind}: counters and only they end in _total"));
                }
                if name.contains("_us") || name.contains("_ms") {
                    return Err(format!("{name} is not in a base unit"));
                }
                fams.push((name.into(), kind.into()));
            } else if !line.is_empty() {
                let sample = line.split(['{', ' ']).next().unwrap_or_default();
                let (fam, kind) = fams.last().ok_or_else(|| format!("sample {sample} before any # TYPE"))?;
                let ok = sample == fam
                    || (kind == "histogram"
                        && [format!("{fam}_bucket"), format!("{fam}_sum"), format!("{fam}_count")]
                            .iter()
                            .any(|s| s == sample));
                if !ok {
                    return Err(format!("sample {sample} under family {fam}"));
                }
            }
        }
        Ok(fams)
    }

    /// The value of the sample written exactly as `series` (name and labels), if there is one.
    pub fn sample(text: &str, series: &str) -> Option<f64> {
        let line = text.lines().find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))?;
        line.rsplit(' ').next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(limits: Limits) -> SocketAddr {
        let body = Arc::new(|| "# TYPE understudy_epochs_total counter\nunderstudy_epochs_total 7\n".to_string());
        serve("127.0.0.1:0".parse().unwrap(), false, limits, body).unwrap()
    }

    /// Sends `request` and reads the whole answer (the server closes), failing after `within`.
    fn ask(addr: SocketAddr, request: &[u8], within: Duration) -> std::io::Result<String> {
        let mut c = TcpStream::connect(addr)?;
        c.set_read_timeout(Some(within))?;
        c.write_all(request)?;
        let mut out = Vec::new();
        c.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn scrape(addr: SocketAddr, within: Duration) -> String {
        let t0 = Instant::now();
        let r = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", within)
            .unwrap_or_else(|e| panic!("scrape failed after {:?}: {e}", t0.elapsed()));
        assert!(r.starts_with("HTTP/1.1 200 OK") && r.contains("understudy_epochs_total 7"), "{r}");
        r
    }

    /// Reads what the server answers a stalled or oversized request: its status line, or
    /// "closed" when it hung up without one (a reset, since the client's bytes were unread).
    fn verdict(c: &mut TcpStream, within: Duration) -> String {
        c.set_read_timeout(Some(within)).unwrap();
        let mut out = Vec::new();
        match c.read_to_end(&mut out) {
            Ok(_) if out.is_empty() => "closed".into(),
            Ok(_) => String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed".into(),
            Err(e) => panic!("the server still holds the connection after {within:?}: {e}"),
        }
    }

    #[test]
    fn a_stalled_or_endless_request_does_not_block_a_scrape() {
        let limits = Limits { request_timeout: Duration::from_secs(5), ..Limits::default() };
        let addr = server(limits);
        // One client stops in the middle of its request line, another sends a header that
        // never ends.
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled.write_all(b"GET /metr").unwrap();
        let mut endless = TcpStream::connect(addr).unwrap();
        endless.write_all(b"GET /metrics HTTP/1.1\r\nX-Fill: ").unwrap();
        endless.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let fill = vec![b'a'; 4096];
        // Until the server stops reading it (it cannot take more than its bound).
        let mut sent = 0usize;
        while sent < 64 << 20 && endless.write_all(&fill).is_ok() {
            sent += fill.len();
        }
        assert!(sent < 64 << 20, "the server read 64 MiB of one request header");
        // A scrape is answered at once, long before the stalled client's deadline.
        let t0 = Instant::now();
        scrape(addr, Duration::from_secs(3));
        assert!(t0.elapsed() < Duration::from_secs(2), "scrape took {:?}", t0.elapsed());
        let v = verdict(&mut endless, Duration::from_secs(2));
        assert!(v == "closed" || v.contains("431"), "{v}");
    }

    #[test]
    fn a_request_that_never_ends_is_cut_off_at_the_deadline() {
        let limits = Limits { request_timeout: Duration::from_millis(400), ..Limits::default() };
        let addr = server(limits);
        // A byte every 100 ms: each read succeeds, the whole request never arrives.
        let mut slow = TcpStream::connect(addr).unwrap();
        let t0 = Instant::now();
        let mut cut = false;
        for b in b"GET /metrics HTTP/1.1\r\nHost: a-very-slow-client\r\n".iter().cycle().take(60) {
            if slow.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            if t0.elapsed() > Duration::from_secs(1) {
                break;
            }
        }
        let v = if cut { "closed".into() } else { verdict(&mut slow, Duration::from_secs(2)) };
        assert!(v == "closed" || v.contains("408"), "{v}");
        assert!(t0.elapsed() < Duration::from_secs(3), "cut off after {:?}", t0.elapsed());
        scrape(addr, Duration::from_secs(3));
    }

    #[test]
    fn connections_beyond_the_bound_wait_for_a_slot() {
        let limits = Limits { request_timeout: Duration::from_millis(500), max_connections: 2, ..Limits::default() };
        let addr = server(limits);
        let t0 = Instant::now();
        // Five clients that never finish: the server holds two at a time, each until its
        // deadline, so the third is answered no sooner than the first two's deadlines.
        let mut idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for c in &mut idle {
            c.write_all(b"GET").unwrap();
        }
        let mut answered = Vec::new();
        for c in &mut idle {
            let v = verdict(c, Duration::from_secs(5));
            assert!(v == "closed" || v.contains("408"), "{v}");
            answered.push(t0.elapsed());
        }
        assert!(answered[2] >= Duration::from_millis(900), "third answered after {:?}: {answered:?}", answered[2]);
        assert!(answered[4] >= Duration::from_millis(1400), "fifth answered after {:?}: {answered:?}", answered[4]);
        // And a scrape after them is served.
        scrape(addr, Duration::from_secs(3));
    }

    #[test]
    fn a_non_loopback_address_needs_the_opt_in() {
        let status = || Arc::new(String::new) as Source;
        for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:9400"] {
            let e = serve(addr.parse().unwrap(), false, Limits::default(), status()).unwrap_err().to_string();
            assert!(e.contains("is not a loopback address") && e.contains("--metrics-public"), "{e}");
        }
        for addr in ["127.0.0.1:0", "127.0.0.2:0", "[::1]:0"] {
            assert!(check_addr(addr.parse().unwrap(), false).is_ok(), "{addr}");
        }
        assert!(check_addr("[::ffff:127.0.0.1]:0".parse().unwrap(), false).is_ok());
        let bound = serve("0.0.0.0:0".parse().unwrap(), true, Limits::default(), status()).unwrap();
        assert!(bound.ip().is_unspecified());
    }

    #[test]
    fn requests_are_parsed_strictly() {
        assert!(is_metrics_get(b"GET /metrics HTTP/1.1\r\nHost: x"));
        assert!(is_metrics_get(b"GET /metrics?x=1 HTTP/1.1"));
        assert!(!is_metrics_get(b"GET /metricsfoo HTTP/1.1"));
        assert!(!is_metrics_get(b"POST /metrics HTTP/1.1"));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    fn protected_vm(epochs: u64, pauses_s: &[f64], bytes_sent: u64) -> Status {
        let mut pause_seconds = primary::stats::Histogram::default();
        for p in pauses_s {
            pause_seconds.observe(*p);
        }
        let mut ack_latency_seconds = primary::stats::Histogram::default();
        ack_latency_seconds.observe(0.0004);
        let report = primary::stats::StatusReport {
            state: primary::stats::ProtectionState::Protected,
            state_for_s: 3.0,
            reason: String::new(),
            backup: "127.0.0.1:7000".into(),
            epochs,
            epoch_rate_per_s: 90.0,
            last_submitted_epoch: epochs,
            last_acked_epoch: epochs - 1,
            replica_lag_epochs: 1,
            pause_us_p50: 0.0,
            pause_us_p99: 0.0,
            epoch_ms_mean: 10.0,
            dirty_pages_per_epoch_mean: 0.0,
            dirty_pages_per_epoch_p99: 0.0,
            hot_pages: 12,
            wire_bytes_per_epoch_mean: 0.0,
            raw_bytes_per_epoch_mean: 0.0,
            ack_latency_us_p50: 0.0,
            ack_latency_us_p99: 0.0,
            held_output_frames: 2,
            held_output_bytes: 3000,
            bytes_sent,
            raw_bytes_sent: bytes_sent * 2,
            sync: None,
            last_sync: Some(primary::stats::SyncSummary {
                rounds: 2,
                pages: 9000,
                pieces: 5,
                largest_piece_pages: 4096,
                ms: 1500,
                catch_up: false,
            }),
            inbound: Some(primary::inbound::InboundReport {
                active: true,
                forwarded_frames: 31,
                queue_dropped_frames: 2,
                refused_frames: 1,
                side_copy_to: Some("10.0.0.2:41000".parse().unwrap()),
                side_copy_sent_frames: 30,
                side_copy_dropped_frames: 3,
                side_copy_ns_mean: 4200,
            }),
            pause_seconds,
            ack_latency_seconds,
        };
        Status::Vm(crate::status::VmStatus {
            role: crate::status::RoleName::Primary,
            state: crate::status::VmState::Running,
            uptime_s: 5.0,
            memory_bytes: 64 << 20,
            cmdline: "workload=counter".into(),
            origin: crate::status::Origin::Booted { kernel: "guest.elf".into() },
            stopped_reason: None,
            protection: Some(report),
            arbitration: None,
            migration: Some(primary::migrate::MigrationStatus {
                phase: "recovered".into(),
                round_pages_left: 9,
                postcopy_pages_left: Some(4),
                bytes_sent: 1 << 20,
                reverse_commits: Some(12),
                ..Default::default()
            }),
            reprotect: None,
        })
    }

    fn families(text: &str) -> Vec<(String, String)> {
        super::read::families(text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
    }

    fn value(text: &str, series: &str) -> f64 {
        super::read::sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn renders_a_protected_vm_by_the_conventions() {
        let text = render(&protected_vm(7, &[40e-6, 150e-6, 150e-6, 3e-3, 0.5], 1000));
        let fams = families(&text);
        for (name, kind) in [
            ("understudy_epochs_total", "counter"),
            ("understudy_checkpoint_pause_seconds", "histogram"),
            ("understudy_ack_latency_seconds", "histogram"),
            ("understudy_replica_lag_epochs", "gauge"),
            ("understudy_hot_pages", "gauge"),
            ("understudy_output_held_bytes", "gauge"),
            ("understudy_bytes_sent_total", "counter"),
            ("understudy_protection_state", "gauge"),
            ("understudy_migration_phase", "gauge"),
            ("understudy_migration_bytes_sent_total", "counter"),
            ("understudy_migration_pages_left", "gauge"),
            ("understudy_migration_reverse_commits_total", "counter"),
        ] {
            assert!(fams.contains(&(name.to_string(), kind.to_string())), "no {kind} {name} in\n{text}");
        }
        assert_eq!(value(&text, "understudy_epochs_total"), 7.0);
        assert_eq!(value(&text, "understudy_hot_pages"), 12.0);
        assert_eq!(value(&text, "understudy_last_sync_seconds"), 1.5);
        assert_eq!(value(&text, "understudy_last_sync_largest_piece_pages"), 4096.0);
        assert_eq!(value(&text, "understudy_output_held_bytes"), 3000.0);
        assert_eq!(value(&text, r#"understudy_protection_state{state="protected"}"#), 1.0);
        assert_eq!(value(&text, r#"understudy_protection_state{state="degraded"}"#), 0.0);
        assert_eq!(value(&text, r#"understudy_migration_phase{phase="recovered"}"#), 1.0);
        assert_eq!(value(&text, r#"understudy_migration_phase{phase="failed"}"#), 0.0);
        assert_eq!(value(&text, "understudy_migration_pages_left"), 4.0);
        assert_eq!(value(&text, "understudy_migration_reverse_commits_total"), 12.0);
        // Input forwarding to the backup's inbound log.
        assert_eq!(value(&text, "understudy_inbound_forwarded_frames_total"), 31.0);
        assert_eq!(value(&text, "understudy_inbound_queue_dropped_frames_total"), 2.0);
        assert_eq!(value(&text, "understudy_inbound_refused_frames_total"), 1.0);
        assert_eq!(value(&text, "understudy_inbound_side_copy_sent_frames_total"), 30.0);
        assert_eq!(value(&text, "understudy_inbound_side_copy_dropped_frames_total"), 3.0);
        // The pause histogram: cumulative buckets from 50 µs, ending in +Inf with every sample.
        let buckets: Vec<(String, f64)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("understudy_checkpoint_pause_seconds_bucket{le=\""))
            .map(|r| {
                let (le, v) = r.split_once("\"} ").unwrap();
                (le.to_string(), v.parse().unwrap())
            })
            .collect();
        assert_eq!(buckets.first().unwrap(), &("0.00005".to_string(), 1.0), "{text}");
        assert_eq!(buckets.iter().find(|(le, _)| le == "0.0002").unwrap().1, 3.0, "{text}");
        assert_eq!(buckets.iter().find(|(le, _)| le == "0.1").unwrap().1, 4.0, "{text}");
        assert_eq!(buckets.last().unwrap(), &("+Inf".to_string(), 5.0), "{text}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "not cumulative: {buckets:?}");
        assert_eq!(value(&text, "understudy_checkpoint_pause_seconds_count"), 5.0);
        let sum = value(&text, "understudy_checkpoint_pause_seconds_sum");
        assert!((sum - (40e-6 + 300e-6 + 3e-3 + 0.5)).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn counters_never_decrease_between_scrapes() {
        let a = render(&protected_vm(7, &[1e-4; 3], 1000));
        let b = render(&protected_vm(9, &[1e-4; 5], 4000));
        let counters: Vec<String> = families(&a).into_iter().filter(|(_, k)| k == "counter").map(|(n, _)| n).collect();
        assert!(counters.len() >= 3, "{counters:?}");
        for c in counters.iter().map(String::as_str).chain(["understudy_checkpoint_pause_seconds_count"]) {
            assert!(value(&b, c) >= value(&a, c), "{c} went down:\n{a}\n{b}");
        }
        assert!(value(&b, "understudy_epochs_total") > value(&a, "understudy_epochs_total"));
    }

    #[test]
    fn renders_a_backup_and_an_unprotected_vm() {
        let b = Status::Backup(crate::status::BackupProcessStatus {
            role: crate::status::RoleName::Backup,
            uptime_s: 1.0,
            memory_bytes: 64 << 20,
            origin: crate::status::Origin::Backup { listen: "127.0.0.1:7000".into() },
            backup: Some(backup::server::BackupStatus {
                state: "consistent".into(),
                committed_epoch: Some(2113),
                consistent_epoch: Some(2113),
                commits: 40,
                since_last_commit_s: Some(0.008),
                inbound_log: backup::inbound::InboundLogReport {
                    frames: 3,
                    bytes: 180,
                    received_frames: 50,
                    pruned_frames: 46,
                    overflow_frames: 1,
                    replayed_frames: 0,
                    skipped_frames: 0,
                    side_copy: backup::side_copy::SideCopyReport {
                        side_copy_port: Some(41000),
                        side_copy_received_frames: 48,
                        side_copy_logged_frames: 5,
                        side_copy_stale_frames: 42,
                        side_copy_rejected_frames: 1,
                    },
                    lan_copy: backup::lan_copy::LanCopyReport {
                        lan_copy: true,
                        lan_copy_frames: 4000,
                        lan_copy_frames_read: 12_000,
                        lan_copy_overflow_frames: 8000,
                        lan_copy_replayed_frames: 2,
                        lan_copy_unmatched: 1,
                    },
                },
                output_log: backup::output_log::OutputLogReport {
                    frames: 2,
                    bytes: 140,
                    epochs: 1,
                    received_frames: 30,
                    released_frames: 27,
                    overflow_frames: 1,
                    written_frames: 0,
                    dropped_frames: 0,
                },
                ..Default::default()
            }),
            arbitration: None,
            migration: None,
        });
        let text = render(&b);
        let fams = families(&text);
        assert!(fams.contains(&("understudy_backup_committed_epoch".into(), "gauge".into())), "{text}");
        assert!(fams.contains(&("understudy_backup_commits_total".into(), "counter".into())), "{text}");
        assert_eq!(value(&text, "understudy_backup_committed_epoch"), 2113.0);
        assert_eq!(value(&text, "understudy_backup_last_commit_age_seconds"), 0.008);
        assert_eq!(value(&text, r#"understudy_backup_state{state="consistent"}"#), 1.0);
        // The inbound log: its size as gauges, what came and went as counters.
        assert!(fams.contains(&("understudy_backup_inbound_log_frames".into(), "gauge".into())), "{text}");
        assert!(fams.contains(&("understudy_backup_inbound_overflow_frames_total".into(), "counter".into())), "{text}");
        assert_eq!(value(&text, "understudy_backup_inbound_log_bytes"), 180.0);
        assert_eq!(value(&text, "understudy_backup_inbound_received_frames_total"), 50.0);
        assert_eq!(value(&text, "understudy_backup_inbound_pruned_frames_total"), 46.0);
        assert_eq!(value(&text, "understudy_backup_inbound_overflow_frames_total"), 1.0);
        assert_eq!(value(&text, "understudy_backup_inbound_replayed_frames_total"), 0.0);
        assert_eq!(value(&text, "understudy_backup_inbound_side_copy_received_frames_total"), 48.0);
        assert_eq!(value(&text, "understudy_backup_inbound_side_copy_logged_frames_total"), 5.0);
        assert_eq!(value(&text, "understudy_backup_inbound_side_copy_stale_frames_total"), 42.0);
        assert_eq!(value(&text, "understudy_backup_inbound_side_copy_rejected_frames_total"), 1.0);
        assert_eq!(value(&text, "understudy_backup_lan_copy_frames"), 4000.0);
        assert_eq!(value(&text, "understudy_backup_lan_copy_read_frames_total"), 12_000.0);
        assert_eq!(value(&text, "understudy_backup_lan_copy_overflow_frames_total"), 8000.0);
        assert_eq!(value(&text, "understudy_backup_lan_copy_replayed_frames_total"), 2.0);
        assert_eq!(value(&text, "understudy_backup_lan_copy_unmatched_total"), 1.0);
        // The output log likewise.
        assert!(fams.contains(&("understudy_backup_output_log_frames".into(), "gauge".into())), "{text}");
        assert_eq!(value(&text, "understudy_backup_output_log_bytes"), 140.0);
        assert_eq!(value(&text, "understudy_backup_output_log_epochs"), 1.0);
        assert_eq!(value(&text, "understudy_backup_output_received_frames_total"), 30.0);
        assert_eq!(value(&text, "understudy_backup_output_released_frames_total"), 27.0);
        assert_eq!(value(&text, "understudy_backup_output_overflow_frames_total"), 1.0);
        assert_eq!(value(&text, "understudy_backup_output_written_frames_total"), 0.0);
        assert_eq!(value(&text, "understudy_backup_output_dropped_frames_total"), 0.0);
        // A VM that is not protected says so (an alert on "not protected" needs the series).
        let Status::Vm(mut vm) = protected_vm(1, &[], 0) else { unreachable!() };
        vm.protection = None;
        vm.migration = None;
        let text = render(&Status::Vm(vm));
        families(&text);
        assert_eq!(value(&text, r#"understudy_protection_state{state="unprotected"}"#), 1.0);
        assert!(!text.contains("understudy_epochs_total"), "{text}");
    }

    #[test]
    fn renders_the_role_and_counts_transitions() {
        let text = render_role("protected", &[("booted", "protected", 2), ("protected", "booted", 1)]);
        assert!(
            text.contains("# TYPE understudy_node_role gauge\nunderstudy_node_role{value=\"protected\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE understudy_node_role_transitions_total counter\n"), "{text}");
        assert!(
            text.contains("understudy_node_role_transitions_total{from=\"booted\",to=\"protected\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("understudy_node_role_transitions_total{from=\"protected\",to=\"booted\"} 1\n"),
            "{text}"
        );
        let none = render_role("backup", &[]);
        assert_eq!(none.lines().filter(|l| !l.starts_with('#')).count(), 1, "{none}");
    }
}
