//! The workloads, chosen by `workload=` on the command line.
pub mod counter;
pub mod dirty;
pub mod kv;
