//! Integration tests of the job queue against a private PostgreSQL (one cluster for this
//! binary, one database per test).

mod cli;
mod common;
mod crash;
mod edges;
mod enqueue;
mod exactly_once;
mod fence;
mod wakeups;

/// The CLI's `weir jobs` source, compiled and tested here (it lives in weir-cli).
#[path = "../../../weir-cli/src/jobs.rs"]
mod cli_jobs;
