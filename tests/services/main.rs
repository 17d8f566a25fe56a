//! The stages as gRPC servers in this process: the pipeline end to end, stage lifecycles,
//! operations, one trace per request, the metrics against their reference implementations,
//! and the demo.
//!
//! One module: `cargo test --test services pipeline::`.
//!
//! The tests of one module run beside each other, never beside another module's
//! (`common::slot`).

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod demo;
mod metrics_reference;
mod ops;
mod pipeline;
mod stages;
mod traces;
