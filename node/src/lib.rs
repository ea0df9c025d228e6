//! One Understudy node: the process that runs a VM or holds a backup's replica of one. The
//! binary parses the command line, wires the parts and prints; what the node is and reports
//! lives here: [`Node`] keeps its role as one state ([`role::Role`]: booted, protected,
//! backup, promoted, migration source, migration destination) and answers the admin API.
//!
//! Modules:
//! - [`api`]: the admin API on a Unix socket (requests, responses, serving, calling);
//! - [`arbitration`]: the arbitration agent's settings, as the command line gives them;
//! - [`failover`]: what a backup does when the session reports on the primary;
//! - [`metrics`]: the Prometheus endpoint over the status report;
//! - [`migrate`]: migration of a running VM, source and destination;
//! - [`protect`]: protection of a running VM (the primary side);
//! - [`reprotect`]: automatic re-protection of a promoted VM to named standby backups;
//! - [`role`]: the role a node plays and its transitions;
//! - [`runtime`]: the node itself ([`Node`]): its role, the API's handlers, the arbitration
//!   agent's wiring, its life until exit;
//! - [`status`]: what the admin API's `status` answers, per role (its JSON field names are part
//!   of the API).

pub mod api;
pub mod arbitration;
pub mod failover;
pub mod metrics;
pub mod migrate;
pub mod protect;
pub mod reprotect;
pub mod role;
pub mod runtime;
pub mod status;
pub mod status_text;

pub use runtime::{Node, NodeError, SerialTarget};
