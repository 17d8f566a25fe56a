//! CPU kernels shared by the native engines: the generator's LLM forward pass and the
//! embedders' MiniLM. No tonic, no candle: plain slices in, plain slices out.

pub mod kernels;
pub mod pool;
