//! Ghostwriter: writes the rest of a document in its author's voice, following "Teach LLMs to
//! Personalize" (Li et al., 2023). This crate is the `ghostwriter` command: model management,
//! the embedded one-process topology, document loaders and the client side of the API.

pub mod bench;
pub mod bench_generator;
pub mod bench_job;
pub mod embedded;
pub mod eval;
pub mod loaders;
pub mod models;
pub mod output;
pub mod processes;
pub mod train;

pub use ghostwriter_proto::v1 as proto;
