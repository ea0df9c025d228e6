//! Prometheus metrics on an optional `--metrics <addr>`: every number of `understudy status`
//! as a gauge (`understudy_<path>`), and the states as labelled gauges. Read-only; bind it to
//! a management address (it tells about the VM, and changes nothing).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::{Context, Result};

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

/// Serves `GET /metrics` on `addr` from `status()` in a background thread.
pub fn serve(addr: SocketAddr, status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind metrics endpoint {addr}"))?;
    tracing::info!(%addr, "prometheus metrics at /metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut reader = BufReader::new(match conn.try_clone() {
                    Ok(c) => c,
                    Err(_) => continue,
                });
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // Drain the headers.
                let mut h = String::new();
                while reader.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
                    h.clear();
                }
                let mut conn = conn;
                let (code, body) = if line.starts_with("GET /metrics") {
                    ("200 OK", render(&status()))
                } else {
                    ("404 Not Found", "try /metrics\n".to_string())
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .context("spawn metrics thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn renders_numbers_and_states() {
        let v = serde_json::json!({"state": "running", "protection": {"state": "protected", "pause_us_p99": 812.5, "epochs": 7}, "cmdline": "x"});
        let text = super::render(&v);
        assert!(text.contains("understudy_protection_pause_us_p99 812.5"), "{text}");
        assert!(text.contains("understudy_protection_epochs 7"), "{text}");
        assert!(text.contains("understudy_protection_state{value=\"protected\"} 1"), "{text}");
        assert!(!text.contains("cmdline"), "{text}");
    }
}
