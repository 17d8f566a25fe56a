//! The native CPU backend: Q8_0 weights in an int8 GEMM (AVX-512 VNNI where the CPU has it),
//! f16 paged key/value cache, one pass per step for every sequence of the batch.

pub mod kernels;
pub mod model;
pub mod pool;

pub use model::{Config, NativeModel};
