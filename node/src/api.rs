//! The admin API: one JSON request per line on a Unix socket, one JSON response line back.
//!
//! The socket is created with mode 0600 in a directory the admin chooses: only its owner
//! (root) can talk to the VM. The CLI's `snapshot`, `status`, ... are clients of it
//! ([`call`]); a node serves it ([`serve`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest request line accepted.
const MAX_REQUEST: u64 = 64 << 10;

/// Errors of the admin API, on either end.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request line that is not a request.
    #[error("bad api request: {0}")]
    BadRequest(serde_json::Error),
    /// Another process answers on the socket.
    #[error("api socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// A stale socket file could not be removed.
    #[error("remove stale api socket {}", path.display())]
    RemoveStale {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be bound.
    #[error("bind api socket {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket's mode could not be set.
    #[error("chmod api socket {}", path.display())]
    Chmod {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Nobody answers on the socket.
    #[error("connect to api socket {} (is `understudy run` running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing the request failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The request could not be written as JSON.
    #[error(transparent)]
    Encode(serde_json::Error),
    /// Reading the response failed.
    #[error("read response from {}", path.display())]
    Read {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The process closed the connection without a response.
    #[error("api socket {} closed without answering", .0.display())]
    Closed(PathBuf),
    /// The response is not a response.
    #[error("malformed api response")]
    Malformed(#[source] serde_json::Error),
    /// The process answered with an error (its chain, as text).
    #[error("{0}")]
    Refused(String),
}

/// A request to a running `understudy` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// What the VM is doing.
    Status,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Write a snapshot into `dir`, then do `then`.
    Snapshot {
        /// Target directory.
        dir: PathBuf,
        /// What the VM does afterwards.
        #[serde(default)]
        then: AfterSnapshot,
    },
    /// Digest of guest memory (pauses for the time it takes).
    MemoryDigest,
    /// Stop the VM and the process.
    Shutdown,
    /// Start protecting the VM to a backup.
    Protect(crate::protect::ProtectRequest),
    /// Stop protecting.
    Unprotect,
    /// Verification points recorded (memory digest and state crc per sampled epoch).
    VerifyJournal,
    /// Backup: turn the replica into a running VM. With arbitration configured this asks the
    /// group and promotes only once granted; `force` promotes without the group.
    Promote {
        /// Promote without a grant from the arbitration group (risks two active copies).
        #[serde(default)]
        force: bool,
    },
    /// Output commit journal: per released frame its epoch, ack time and release time.
    OutputJournal,
    /// Migrate the VM to a destination; answered with the report when it ended.
    Migrate(primary::migrate::MigrateRequest),
    /// Call a running migration off (before the hand-over).
    MigrateCancel,
}

/// What a VM does after a snapshot.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSnapshot {
    /// Keep running.
    #[default]
    Resume,
    /// Stay paused.
    Pause,
    /// Stop the VM and exit the process.
    Exit,
}

/// A response: `ok` and either `result` or `error`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error chain, when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success.
    pub fn ok(v: impl Serialize) -> Self {
        Self { ok: true, result: Some(serde_json::to_value(v).unwrap_or(serde_json::Value::Null)), error: None }
    }

    /// A failure: the error and its sources, `: `-separated.
    pub fn err(e: &dyn std::error::Error) -> Self {
        Self { ok: false, result: None, error: Some(transport::error_chain(e)) }
    }
}

/// Parses one request line (surrounding white space ignored); the error names what is wrong.
pub fn parse_request(line: &str) -> Result<Request, ApiError> {
    serde_json::from_str(line.trim()).map_err(ApiError::BadRequest)
}

/// Binds the API socket with mode 0600, replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let path_buf = || path.to_path_buf();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale { path: path_buf(), source })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind { path: path_buf(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|source| ApiError::Chmod { path: path_buf(), source })?;
    Ok(listener)
}

/// Requests being handled or answered: a process that is told to exit waits for them, so a
/// `shutdown` is answered before the socket goes away.
pub type InFlight = std::sync::Arc<std::sync::atomic::AtomicUsize>;

/// Serves requests until the listener fails; `handle` runs one request.
pub fn serve(
    listener: UnixListener,
    in_flight: InFlight,
    handle: impl Fn(Request) -> Response + Send + Sync + 'static,
) {
    let handle = std::sync::Arc::new(handle);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let handle = std::sync::Arc::clone(&handle);
        let in_flight = std::sync::Arc::clone(&in_flight);
        let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
            let _ = serve_conn(conn, &in_flight, &*handle);
        });
    }
}

/// Waits up to `timeout` until no request is being handled or answered.
pub fn drain(in_flight: &InFlight, timeout: Duration) {
    let t0 = std::time::Instant::now();
    while in_flight.load(std::sync::atomic::Ordering::SeqCst) > 0 && t0.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn serve_conn(conn: UnixStream, in_flight: &InFlight, handle: &dyn Fn(Request) -> Response) -> std::io::Result<()> {
    let mut writer = conn.try_clone()?;
    let mut reader = BufReader::new(std::io::Read::take(conn, MAX_REQUEST));
    let mut line = String::new();
    while {
        line.clear();
        reader.read_line(&mut line)? > 0
    } {
        in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let resp = match parse_request(&line) {
            Ok(req) => handle(req),
            Err(e) => Response::err(&e),
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_default();
        out.push(b'\n');
        let written = writer.write_all(&out);
        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        written?;
    }
    Ok(())
}

/// Sends one request and waits for its response.
pub fn call(path: &Path, req: &Request, timeout: Duration) -> Result<serde_json::Value, ApiError> {
    let conn = UnixStream::connect(path).map_err(|source| ApiError::Connect { path: path.to_path_buf(), source })?;
    conn.set_read_timeout(Some(timeout))?;
    let mut w = conn.try_clone()?;
    let mut line = serde_json::to_vec(req).map_err(ApiError::Encode)?;
    line.push(b'\n');
    w.write_all(&line)?;
    let mut reader = BufReader::new(conn);
    let mut resp = String::new();
    reader.read_line(&mut resp).map_err(|source| ApiError::Read { path: path.to_path_buf(), source })?;
    if resp.is_empty() {
        return Err(ApiError::Closed(path.to_path_buf()));
    }
    let resp: Response = serde_json::from_str(&resp).map_err(ApiError::Malformed)?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ApiError::Refused(resp.error.unwrap_or_else(|| "unknown error".into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protect(seed: u64) -> crate::protect::ProtectRequest {
        crate::protect::ProtectRequest {
            backup: if seed.is_multiple_of(2) {
                "10.0.0.2:7000".parse().unwrap()
            } else {
                "[fe80::1%3]:7000".parse().unwrap()
            },
            backup_name: format!("backup-{seed}"),
            certs: PathBuf::from(format!("/etc/understudy/ \"quoted\" {seed}")),
            name: "primary".into(),
            vm_name: "vm\u{e9}\n".into(),
            epoch_ms: seed,
            epoch_min_ms: seed.wrapping_mul(3),
            epoch_max_ms: u64::MAX - seed,
            output_coalesce_us: seed % 1000,
            output_idle_end: seed.is_multiple_of(2),
            output_burst_end: seed.is_multiple_of(3),
            pause_copy_threads: (seed % 2) as u8 + 1,
            hot_page_epochs: (seed % 64) as u8,
            hot_page_window: (seed % 17) as u8,
            pause_rt_priority: (seed % 100) as u8,
            epoch_precopy_us: (seed % 5000) as u32,
            sync_piece_mib: (seed % 1024) as u32 + 1,
            verify_every: seed >> 3,
            degrade_after_ms: seed ^ 0xff,
            heartbeat_ms: 20,
            detect_ms: 1000,
            backup_node: (!seed.is_multiple_of(3)).then_some(seed),
        }
    }

    /// Every request, as the CLI writes it, parses back to itself (compared as JSON: the
    /// request types carry no `PartialEq`), and writing it again gives the same line.
    #[test]
    fn requests_round_trip() {
        let mut requests = vec![
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::MemoryDigest,
            Request::Shutdown,
            Request::Unprotect,
            Request::VerifyJournal,
            Request::Promote { force: false },
            Request::Promote { force: true },
            Request::OutputJournal,
            Request::MigrateCancel,
            Request::Migrate(primary::migrate::MigrateRequest {
                to: "127.0.0.1:7100".parse().unwrap(),
                dest_name: "dest".into(),
                certs: "/etc/understudy".into(),
                name: "src".into(),
                mode: primary::migrate::Mode::Stopcopy,
                downtime_ms: 5,
                max_bandwidth: Some(1 << 30),
                stop_share: 0.75,
                max_rounds: 30,
                timeout_s: 60,
                verify: true,
                no_reverse: true,
            }),
        ];
        for then in [AfterSnapshot::Resume, AfterSnapshot::Pause, AfterSnapshot::Exit] {
            requests.push(Request::Snapshot { dir: PathBuf::from("/var/lib/understudy/snap \u{1f4be}"), then });
        }
        let mut seed = 0x243f_6a88_85a3_08d3u64;
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            requests.push(Request::Protect(protect(seed)));
        }
        for req in requests {
            let line = serde_json::to_string(&req).unwrap();
            let back = parse_request(&format!("  {line}\n")).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), line);
        }
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let e = parse_request(r#"{"op":"reboot"}"#).unwrap_err().to_string();
        assert!(e.starts_with("bad api request: unknown variant `reboot`"), "{e}");
        let e = parse_request(r#"{"op":"protect","backup":"nowhere"}"#).unwrap_err().to_string();
        assert!(e.contains("invalid socket address"), "{e}");
        // Defaults fill what an older CLI did not send.
        let req = parse_request(r#"{"op":"snapshot","dir":"/s"}"#).unwrap();
        assert!(matches!(req, Request::Snapshot { then: AfterSnapshot::Resume, .. }));
        assert!(parse_request("").is_err());
    }
}
