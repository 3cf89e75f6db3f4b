//! Integration tests of the job queue against a private PostgreSQL (one cluster for this
//! binary, one database per test).

mod common;
mod crash;
mod edges;
mod enqueue;
mod exactly_once;
mod fence;
mod stall;
mod wakeups;
