//! What ships besides the code: the Helm chart (rendered, validated and inspected) and the
//! Dockerfiles (linted).
//!
//! One module: `cargo test --test packaging helm_chart::`.
//!
//! The tests of one module run beside each other, never beside another module's
//! (`common::slot`).

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod helm_chart;
mod images;
