//! A minimal QMP client (QEMU Machine Protocol: one JSON object per line over a unix socket):
//! the greeting, `qmp_capabilities`, commands with arguments, replies matched by id with the
//! asynchronous events in between kept aside. Every wait is bounded.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long one command may take to answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// One line from QEMU, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// `{"QMP": {"version": {"qemu": {"major", "minor", "micro"}}, ...}}`.
    Greeting { version: (u64, u64, u64) },
    /// `{"return": ..., "id": ...}`.
    Return { id: Option<u64>, value: Value },
    /// `{"error": {"class", "desc"}, "id": ...}`.
    Error { id: Option<u64>, class: String, desc: String },
    /// `{"event": NAME, "data": ..., "timestamp": {"seconds", "microseconds"}}`.
    Event(Event),
}

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// QEMU's wall-clock timestamp of the event, microseconds since the Unix epoch.
    pub timestamp_us: u64,
}

/// Parses one QMP line.
pub fn parse_message(line: &str) -> Result<Message> {
    let v: Value = serde_json::from_str(line.trim()).with_context(|| format!("qmp line is not json: {line:?}"))?;
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(g) = v.get("QMP") {
        let q = &g["version"]["qemu"];
        let n = |k: &str| q[k].as_u64().with_context(|| format!("qmp greeting without version.qemu.{k}: {line}"));
        return Ok(Message::Greeting { version: (n("major")?, n("minor")?, n("micro")?) });
    }
    if let Some(r) = v.get("return") {
        return Ok(Message::Return { id, value: r.clone() });
    }
    if let Some(e) = v.get("error") {
        let s = |k: &str| e[k].as_str().unwrap_or("?").to_string();
        return Ok(Message::Error { id, class: s("class"), desc: s("desc") });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ts = &v["timestamp"];
        let timestamp_us = ts["seconds"].as_u64().unwrap_or(0) * 1_000_000 + ts["microseconds"].as_u64().unwrap_or(0);
        return Ok(Message::Event(Event {
            name: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us,
        }));
    }
    bail!("unknown qmp message: {line}")
}

/// A connected QMP session (capabilities negotiated).
pub struct Qmp {
    stream: UnixStream,
    path: PathBuf,
    pending: Vec<u8>,
    next_id: u64,
    /// Events received so far, in order.
    pub events: Vec<Event>,
    /// QEMU's version from the greeting.
    pub version: (u64, u64, u64),
}

impl Qmp {
    /// Connects to `path` (retrying while QEMU creates the socket, up to `timeout`), reads the
    /// greeting and leaves negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e).with_context(|| format!("connect to qmp socket {}", path.display())),
            }
        };
        let mut q = Qmp {
            stream,
            path: path.to_path_buf(),
            pending: Vec::new(),
            next_id: 1,
            events: Vec::new(),
            version: (0, 0, 0),
        };
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        match q.read_message(left)? {
            Message::Greeting { version } => q.version = version,
            other => bail!("qmp {}: expected a greeting, got {other:?}", path.display()),
        }
        q.execute("qmp_capabilities", Value::Null)?;
        Ok(q)
    }

    /// Reads one line within `timeout`.
    fn read_line(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line).trim().to_string());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("qmp {}: no answer within {timeout:?}", self.path.display());
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => bail!("qmp {}: QEMU closed the connection", self.path.display()),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e).with_context(|| format!("read qmp {}", self.path.display())),
            }
        }
    }

    fn read_message(&mut self, timeout: Duration) -> Result<Message> {
        let line = self.read_line(timeout)?;
        parse_message(&line)
    }

    /// Runs `command` with `arguments` (`Value::Null` for none); returns its `return` value or
    /// fails with QEMU's error. Events that arrive meanwhile go to [`Qmp::events`].
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            req["arguments"] = arguments;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        self.stream.write_all(line.as_bytes()).with_context(|| format!("send {command} to qmp"))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_message(left).with_context(|| format!("waiting for the answer to {command}"))? {
                Message::Event(e) => self.events.push(e),
                Message::Return { id: Some(i), value } if i == id => return Ok(value),
                Message::Error { id: Some(i), class, desc } if i == id => bail!("qmp {command}: {class}: {desc}"),
                other => bail!("qmp {command}: unexpected answer {other:?}"),
            }
        }
    }

    /// Reads the events that arrived since the last call (waits at most `timeout` for the
    /// first one when none is buffered).
    pub fn poll_events(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && !self.pending.contains(&b'\n') {
                return Ok(());
            }
            match self.read_line(left.max(Duration::from_millis(1))) {
                Ok(line) => match parse_message(&line)? {
                    Message::Event(e) => self.events.push(e),
                    other => bail!("qmp: unexpected message outside a command: {other:?}"),
                },
                Err(_) if Instant::now() >= deadline => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// The first event named `name`, if it came.
    pub fn event(&self, name: &str) -> Option<&Event> {
        self.events.iter().find(|e| e.name == name)
    }
}

/// What `query-migrate` says (the fields the benchmark uses).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrateInfo {
    /// `none`, `setup`, `active`, `postcopy-active`, `device`, `completed`, `failed`,
    /// `cancelling`, `cancelled`, ...
    pub status: String,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    /// `ram.transferred`: bytes of RAM sent (pages, headers, zero-page records).
    pub ram_transferred: Option<u64>,
    /// `ram.total`: the guest's RAM size.
    pub ram_total: Option<u64>,
    pub ram_remaining: Option<u64>,
    pub dirty_sync_count: Option<u64>,
    pub precopy_bytes: Option<u64>,
    pub postcopy_bytes: Option<u64>,
    pub downtime_bytes: Option<u64>,
    /// Zero pages sent as a flag.
    pub duplicate_pages: Option<u64>,
    /// Pages sent whole.
    pub normal_pages: Option<u64>,
    pub postcopy_requests: Option<u64>,
    pub error_desc: Option<String>,
}

impl MigrateInfo {
    /// From the `return` value of `query-migrate`.
    pub fn parse(v: &Value) -> Self {
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        let r = |k: &str| v.get("ram").and_then(|r| r.get(k)).and_then(Value::as_u64);
        MigrateInfo {
            status: v.get("status").and_then(Value::as_str).unwrap_or("none").to_string(),
            total_time_ms: u("total-time"),
            downtime_ms: u("downtime"),
            expected_downtime_ms: u("expected-downtime"),
            setup_time_ms: u("setup-time"),
            ram_transferred: r("transferred"),
            ram_total: r("total"),
            ram_remaining: r("remaining"),
            dirty_sync_count: r("dirty-sync-count"),
            precopy_bytes: r("precopy-bytes"),
            postcopy_bytes: r("postcopy-bytes"),
            downtime_bytes: r("downtime-bytes"),
            duplicate_pages: r("duplicate"),
            normal_pages: r("normal"),
            postcopy_requests: r("postcopy-requests"),
            error_desc: v.get("error-desc").and_then(Value::as_str).map(str::to_string),
        }
    }

    /// The migration ended (well or not).
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_return_error_and_event_lines_parse() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_message(g).unwrap(), Message::Greeting { version: (7, 2, 22) });
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 3}"#).unwrap(),
            Message::Return { id: Some(3), value: json!({}) }
        );
        assert_eq!(
            parse_message(r#"{"return": {"status": "running", "running": true}}"#).unwrap(),
            Message::Return { id: None, value: json!({"status": "running", "running": true}) }
        );
        assert_eq!(
            parse_message(r#"{"id": 7, "error": {"class": "GenericError", "desc": "Parameter 'uri' is missing"}}"#)
                .unwrap(),
            Message::Error { id: Some(7), class: "GenericError".into(), desc: "Parameter 'uri' is missing".into() }
        );
        let e = parse_message(r#"{"timestamp": {"seconds": 1796555256, "microseconds": 534155}, "event": "STOP"}"#)
            .unwrap();
        assert_eq!(
            e,
            Message::Event(Event { name: "STOP".into(), data: Value::Null, timestamp_us: 1_796_555_256_534_155 })
        );
        let e = parse_message(
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "setup"}}"#,
        )
        .unwrap();
        let Message::Event(e) = e else { panic!("an event") };
        assert_eq!(
            (e.name.as_str(), e.data["status"].as_str(), e.timestamp_us),
            ("MIGRATION", Some("setup"), 1_000_002)
        );
        assert!(parse_message("not json").unwrap_err().to_string().contains("not json"));
        assert!(parse_message(r#"{"what": 1}"#).unwrap_err().to_string().contains("unknown qmp message"));
        assert!(parse_message(r#"{"QMP": {"version": {}}}"#).is_err());
    }

    #[test]
    fn query_migrate_parses() {
        // A real answer of QEMU 7.2 after a W1 migration (default settings).
        let v: Value = serde_json::from_str(
            r#"{"status": "completed", "setup-time": 1, "downtime": 14, "total-time": 733,
            "ram": {"total": 268500992, "postcopy-requests": 0, "dirty-sync-count": 5,
            "multifd-bytes": 0, "pages-per-second": 32710, "downtime-bytes": 34625448,
            "page-size": 4096, "remaining": 0, "postcopy-bytes": 0, "mbps": 1378.98,
            "transferred": 126159977, "dirty-sync-missed-zero-copy": 0,
            "precopy-bytes": 91534529, "duplicate": 49113, "dirty-pages-rate": 0,
            "skipped": 0, "normal-bytes": 125472768, "normal": 30633}}"#,
        )
        .unwrap();
        let m = MigrateInfo::parse(&v);
        assert_eq!(m.status, "completed");
        assert!(m.finished());
        assert_eq!(m.total_time_ms, Some(733));
        assert_eq!(m.downtime_ms, Some(14));
        assert_eq!(m.ram_transferred, Some(126_159_977));
        assert_eq!(m.ram_total, Some(268_500_992));
        assert_eq!(m.dirty_sync_count, Some(5));
        assert_eq!(m.duplicate_pages, Some(49_113));
        assert_eq!(m.normal_pages, Some(30_633));
        assert_eq!(m.downtime_bytes, Some(34_625_448));
        assert_eq!(m.error_desc, None);

        let active =
            MigrateInfo::parse(&json!({"status": "active", "expected-downtime": 300, "ram": {"dirty-sync-count": 1}}));
        assert!(!active.finished());
        assert_eq!(
            (active.expected_downtime_ms, active.dirty_sync_count, active.downtime_ms),
            (Some(300), Some(1), None)
        );
        let failed = MigrateInfo::parse(&json!({"status": "failed", "error-desc": "Unable to write to socket"}));
        assert!(failed.finished());
        assert_eq!(failed.error_desc.as_deref(), Some("Unable to write to socket"));
        assert_eq!(MigrateInfo::parse(&json!({})).status, "none");
    }
}
