//! Model-level tests in this process: the generator engine, the embedder, fine-tuning and the
//! evaluation harness, with the real models on real data.
//!
//! One module: `cargo test --test models generator_engine::`.
//!
//! The tests of one module run beside each other, never beside another module's
//! (`common::slot`).

#![allow(clippy::unwrap_used)]

#[path = "../common/mod.rs"]
mod common;

mod embeddings;
mod eval;
mod generator_engine;
mod multi_adapter;
mod training;
