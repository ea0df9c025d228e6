//! The Understudy primary: protects a running VM by checkpointing it to a backup every epoch.
//!
//! - [`engine`]: pre-copy sync, then pause, harvest, resume, hand-off, epoch after epoch;
//! - [`output`]: output commit, frames held until their epoch is acknowledged;
//! - [`link`]: the async side, shipping harvests over QUIC with `replication-proto`'s sender;
//! - [`inbound`]: input forwarding, each delivered frame to the backup's inbound log;
//! - [`stats`]: protection state and the numbers `understudy status` shows.

pub mod engine;
pub mod inbound;
pub mod link;
pub mod migrate;
pub mod output;
pub mod stats;
