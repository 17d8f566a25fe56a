//! CPU kernels of the native engines (the generator's LLM, the embedders' MiniLM): an int8 GEMM
//! over Q8_0 weights repacked for AVX-512 VNNI ([`gemm`](mod@gemm)), activation quantization ([`quant`]),
//! the f16 key/value dot products of attention ([`attention`], [`vector`]) and the activations
//! ([`activation`]).
//!
//! Every kernel takes the [`Isa`] to run at: callers detect it once ([`Isa::detect`]) and pass
//! it in; tests pass [`Isa::Portable`] to compare the portable kernels with the vector ones.
//! The AVX-512 F/BW kernels need only those; the GEMM alone needs VNNI too.
//!
//! Most of the project's `unsafe` code lives here: SIMD intrinsics (only at a level the CPU has,
//! with a portable fallback) and the disjoint column writes of the parallel GEMM.
//!
//! Determinism: every output element is computed by the same sequence of operations whatever
//! the number of rows in the batch or the tile it falls in (integer block dot, one conversion,
//! one multiply of the two scales, one fused multiply-add per 32-wide block, blocks in order).
//! So a row's result does not depend on what else is in the batch: batched, chunked and
//! prefix-cached runs give bit-identical logits.
#![allow(unsafe_code)]

pub mod activation;
pub mod attention;
pub mod gemm;
pub mod isa;
pub mod quant;
pub mod vector;

pub use activation::{gelu_erf, silu_mul, softmax};
pub use attention::{accumulate_values, scores16};
pub use gemm::{NR, QActs, QMatrix, gemm};
pub use isa::Isa;
pub use quant::{QK, quantize_block};
pub use vector::{axpy_f16, dot_f16, dot_f32};

/// The GEMM kernel of this machine's best instruction set.
pub fn kernel_name() -> &'static str {
    Isa::detect().gemm_kernel()
}
