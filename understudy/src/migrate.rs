//! `understudy migrate`: asks the source's process to migrate, shows progress while it runs
//! (a bar on a terminal, a line per phase or round otherwise) and prints the report (their text
//! is `node::migrate`'s).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use node::api::{self, Request};
use node::migrate::{progress_line, report_table};

use crate::progress::Progress;

/// Runs the migration through the API at `sock`; returns when it ended.
pub fn run(sock: &Path, req: primary::migrate::MigrateRequest, json: bool) -> Result<()> {
    let timeout = Duration::from_secs(req.timeout_s.saturating_mul(2).saturating_add(120));
    let sock2 = sock.to_path_buf();
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(api::call(&sock2, &Request::Migrate(req), timeout));
    });
    let mut progress = Progress::stderr();
    // Progress every 200 ms; the answer ends the wait at once (not at the next tick).
    let result = loop {
        match done.recv_timeout(Duration::from_millis(200)) {
            Ok(r) => break r,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("the migrate call panicked"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let Ok(v) = api::call(sock, &Request::Status, Duration::from_secs(2)) else { continue };
        let Some(m) = v.get("migration").filter(|m| !m.is_null()) else { continue };
        progress.show(&format!("{} {}", m["phase"], m["round"]), &progress_line(m));
    };
    progress.end();
    let report = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report_table(&report));
    }
    Ok(())
}
