//! The native CPU backend: Q8_0 weights in an int8 GEMM (AVX-512 VNNI where the CPU has it),
//! f16 paged key/value cache, one pass per step for every sequence of the batch. The kernels
//! and the compute pool are the `ghostwriter-kernels` crate's (the embedders use them too).

pub use ghostwriter_kernels::{kernels, pool};
pub mod model;

pub use model::{Config, NativeModel};
