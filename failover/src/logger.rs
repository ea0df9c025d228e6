//! raft-rs logs through slog; this bridges its records to `tracing` under the target `raft`.
//!
//! raft is chatty at info level (every vote, every term change), so its levels are shifted down
//! one step: slog info becomes tracing debug, debug becomes trace. Warnings and errors stay.
//! Nothing is formatted unless a subscriber wants the event.

use std::fmt::{self, Write as _};

use slog::{Drain, KV, Key, OwnedKVList, Record, Serializer};

/// A slog drain that forwards to tracing.
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingDrain;

/// A slog logger for raft that forwards to tracing, tagged with the node id.
pub fn raft_logger(node: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => node))
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        macro_rules! forward {
            ($level:expr) => {
                if tracing::enabled!(target: "raft", $level) {
                    let mut kv = KvText(String::new());
                    let _ = record.kv().serialize(record, &mut kv);
                    let _ = values.serialize(record, &mut kv);
                    tracing::event!(target: "raft", $level, "{}{}", record.msg(), kv.0);
                }
            };
        }
        match record.level() {
            slog::Level::Critical | slog::Level::Error => forward!(tracing::Level::ERROR),
            slog::Level::Warning => forward!(tracing::Level::WARN),
            slog::Level::Info => forward!(tracing::Level::DEBUG),
            slog::Level::Debug | slog::Level::Trace => forward!(tracing::Level::TRACE),
        }
        Ok(())
    }
}

struct KvText(String);

impl Serializer for KvText {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_does_not_panic_without_a_subscriber() {
        let log = raft_logger(7);
        slog::info!(log, "became leader"; "term" => 3);
        slog::warn!(log, "something odd"; "index" => 9);
        slog::debug!(log, "quiet");
    }
}
