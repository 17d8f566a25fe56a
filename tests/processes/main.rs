//! Real processes: `ghostwriter serve`/`up` children, a real etcd, a real nameserver, a real
//! throwaway Postgres; generators killed, drained and hung under load.
//!
//! One module: `cargo test --test processes durability:: -- --nocapture`.
//!
//! The tests of one module run beside each other, never beside another module's
//! (`common::slot`).

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod adapters;
mod discovery;
mod dns;
mod durability;
mod failover;
mod hostile;
mod mtls;
mod observability;
mod probes;
mod retriever_follow;
mod store_api;
mod store_log;
mod up_processes;
