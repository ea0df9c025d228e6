//! The Understudy backup: receives checkpoints, commits each atomically into the replica,
//! acknowledges it, and promotes the replica to a running VM when told to.

pub mod inbound;
pub mod lan_copy;
pub mod output_log;
mod postcopy;
pub mod promote;
pub mod receive;
pub mod replica;
pub mod server;
pub mod side_copy;
