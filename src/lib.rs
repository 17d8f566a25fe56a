//! Ghostwriter: writes the rest of a document in its author's voice, following "Teach LLMs to
//! Personalize" (Li et al., 2023). This crate is the `ghostwriter` command: thin verbs over the
//! runtime (models, loaders, the embedded topology, the process mesh: `ghostwriter-runtime`),
//! the offline harness (evaluation, benchmarks, fine-tuning: `ghostwriter-eval`) and the client
//! side of the API (`output`).

pub mod output;

pub use ghostwriter_eval as eval;
pub use ghostwriter_eval::{bench, bench_failover, bench_generator, bench_job, bench_store, train};
pub use ghostwriter_proto::v1 as proto;
pub use ghostwriter_runtime::{embedded, loaders, models, processes, remote};
