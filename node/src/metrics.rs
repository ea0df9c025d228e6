//! Prometheus metrics on an optional `--metrics <addr>`: every number of `understudy status`
//! as a gauge (`understudy_<path>`), the states as labelled gauges, and the node's role with a
//! counter of its transitions ([`render_role`]). Read-only, but it tells
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

/// Renders a status JSON document in the Prometheus text format.
pub fn render(status: &serde_json::Value) -> String {
    let mut out = String::new();
    flatten("understudy", status, &mut out);
    out
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(&format!("{prefix}_{}", sanitize(k)), v, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.push_str(&format!("# TYPE {prefix} gauge\n{prefix} {f}\n"));
            }
        }
        serde_json::Value::Bool(b) => out.push_str(&format!("# TYPE {prefix} gauge\n{prefix} {}\n", u8::from(*b))),
        serde_json::Value::String(s)
            if prefix.ends_with("_state") || prefix.ends_with("_kind") || prefix.ends_with("_role") =>
        {
            out.push_str(&format!("# TYPE {prefix} gauge\n{prefix}{{value=\"{}\"}} 1\n", s.replace('"', "'")));
        }
        _ => {}
    }
}

/// The node's role as a labelled gauge (`understudy_node_role{value="protected"} 1`) and how
/// often each transition happened (`understudy_node_role_transitions_total{from=..,to=..}`).
pub fn render_role(role: &str, transitions: &[(&str, &str, u64)]) -> String {
    let mut out = format!("# TYPE understudy_node_role gauge\nunderstudy_node_role{{value=\"{role}\"}} 1\n");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn server(limits: Limits) -> SocketAddr {
        let body = Arc::new(|| render(&serde_json::json!({"state": "running", "epochs": 7})));
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
        assert!(r.starts_with("HTTP/1.1 200 OK") && r.contains("understudy_epochs 7"), "{r}");
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

    #[test]
    fn renders_numbers_and_states() {
        let v = serde_json::json!({"state": "running", "protection": {"state": "protected", "pause_us_p99": 812.5, "epochs": 7}, "cmdline": "x"});
        let text = super::render(&v);
        assert!(text.contains("understudy_protection_pause_us_p99 812.5"), "{text}");
        assert!(text.contains("understudy_protection_epochs 7"), "{text}");
        assert!(text.contains("understudy_protection_state{value=\"protected\"} 1"), "{text}");
        assert!(!text.contains("cmdline"), "{text}");
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
