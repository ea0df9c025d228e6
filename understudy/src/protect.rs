//! `understudy protect --wait`: follows the sync until the VM is protected, showing its
//! progress (a line that updates on a terminal, a line per round otherwise; the text is
//! `node::status_text`'s).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use node::api::{self, Request};
use node::status_text::{last_sync_line, sync_line};

use crate::progress::Progress;

/// Polls the protection status at `sock` until it is `protected` (Ok) or `degraded`, `failed`
/// or gone (an error naming the state and its reason).
pub fn follow(sock: &Path) -> Result<()> {
    let mut progress = Progress::stderr();
    let t0 = Instant::now();
    let mut misses = 0;
    loop {
        let v = match api::call(sock, &Request::Status, Duration::from_secs(2)) {
            Ok(v) => {
                misses = 0;
                v
            }
            // The process may be busy for a moment; gone for good after a few tries.
            Err(e) if misses < 10 => {
                misses += 1;
                tracing::debug!("status: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context("the VM's API stopped answering while following the sync"));
            }
        };
        let p = &v["protection"];
        let state = p["state"].as_str().unwrap_or("unprotected");
        let reason = p["reason"].as_str().unwrap_or("");
        match state {
            "protected" => {
                progress.clear();
                let last = last_sync_line(p).map(|l| format!("; {l}")).unwrap_or_default();
                eprintln!("protected after {:.1} s ({reason}){last}", t0.elapsed().as_secs_f64());
                return Ok(());
            }
            "syncing" => {
                if let Some(line) = sync_line(p) {
                    // A line per round, and per quarter of the full copy.
                    let sync = &p["sync"];
                    let quarter =
                        sync["scanned"].as_u64().unwrap_or(0) * 4 / sync["total_pages"].as_u64().unwrap_or(1).max(1);
                    progress.show(&format!("{} {quarter}", sync["round"]), &line);
                }
            }
            // The engine thread has not started yet.
            "unprotected" if t0.elapsed() < Duration::from_secs(5) => {}
            other => {
                progress.end();
                bail!(
                    "protection is {other}, not protected ({reason}); see `understudy status --api {}`",
                    sock.display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
