//! Running Ghostwriter without Kubernetes: the model files (`models pull`), document loaders,
//! the embedded one-process topology (every stage its own gRPC server on a local port) and the
//! process mesh of `up --processes`. Shared by the `ghostwriter` command and the offline
//! harness (`ghostwriter-eval`); no serving crate depends on it.

pub mod embedded;
pub mod loaders;
pub mod models;
pub mod processes;
pub mod stage_process;
