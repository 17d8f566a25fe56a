//! all-MiniLM-L6-v2 (BERT) on the CPU with the native engines' int8 kernels: the weights
//! quantized to Q8_0 at load time, activations per 32-wide block, as the generator runs its
//! LLM. The texts of one call are packed row after row (no padding, so no mask), attention
//! stays within each text, and embeddings are the mean over each text's tokens, L2-normalized,
//! as sentence-transformers computes them for this model.
//!
//! Measured against candle's f32 BERT on real reviews (the crate's tests): cosine > 0.999.

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, bail};
use ghostwriter_kernels::kernels::{self, Isa, QActs, QMatrix};
use ghostwriter_kernels::pool::Pool;
use safetensors::{Dtype, SafeTensors};

/// The BERT hyper-parameters this forward pass reads from `config.json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct Config {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    layer_norm_eps: f64,
    #[serde(default = "gelu")]
    hidden_act: String,
}

fn gelu() -> String {
    "gelu".into()
}

struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
}

struct Layer {
    /// Query, key and value projections stacked: `[3·hidden][hidden]`.
    qkv: QMatrix,
    bqkv: Vec<f32>,
    out: QMatrix,
    bout: Vec<f32>,
    attn_norm: Norm,
    up: QMatrix,
    bup: Vec<f32>,
    down: QMatrix,
    bdown: Vec<f32>,
    ffn_norm: Norm,
}

/// Buffers of one forward pass, reused across calls.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    h: Vec<f32>,
    o: Vec<f32>,
    qa: QActs,
}

/// The model, its compute threads and its buffers.
pub struct NativeBert {
    cfg: Config,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
    pool: Pool,
    /// One forward at a time: each uses every compute thread, so concurrent callers queue.
    scratch: Mutex<Scratch>,
}

/// The f32 values of tensor `name` (f32, f16 or bf16 in the file), checked against `shape`.
fn tensor(st: &SafeTensors<'_>, name: &str, shape: &[usize]) -> anyhow::Result<Vec<f32>> {
    let t = st
        .tensor(name)
        .or_else(|_| st.tensor(&format!("bert.{name}")))
        .with_context(|| format!("tensor {name} is missing"))?;
    if t.shape() != shape {
        bail!(
            "tensor {name} has shape {:?}, expected {shape:?}",
            t.shape()
        );
    }
    let data = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("tensor {name} has unsupported type {other:?}"),
    })
}

impl NativeBert {
    /// Loads `config.json` and `model.safetensors` from `dir`, with `threads` compute threads
    /// (0 = every core).
    pub fn load(dir: &Path, threads: usize) -> anyhow::Result<Self> {
        let cfg: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        if cfg.hidden_act != "gelu" {
            bail!(
                "activation {:?} is not supported (gelu only)",
                cfg.hidden_act
            );
        }
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        if cfg.num_attention_heads == 0
            || !h.is_multiple_of(cfg.num_attention_heads)
            || !h.is_multiple_of(kernels::QK)
            || !ff.is_multiple_of(kernels::QK)
        {
            bail!("unsupported shape: hidden {h}, intermediate {ff}");
        }
        let bytes = std::fs::read(dir.join("model.safetensors"))?;
        let st = SafeTensors::deserialize(&bytes)?;
        let t = |name: &str, shape: &[usize]| tensor(&st, name, shape);
        let isa = Isa::detect();
        let norm = |prefix: &str| -> anyhow::Result<Norm> {
            Ok(Norm {
                w: t(&format!("{prefix}.weight"), &[h])?,
                b: t(&format!("{prefix}.bias"), &[h])?,
            })
        };
        let word = t("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let position = t(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type = t("embeddings.token_type_embeddings.weight", &[2, h])?[..h].to_vec();
        let embed_norm = norm("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            let mut qkv = Vec::with_capacity(3 * h * h);
            let mut bqkv = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv.extend(t(&format!("{p}.attention.self.{part}.weight"), &[h, h])?);
                bqkv.extend(t(&format!("{p}.attention.self.{part}.bias"), &[h])?);
            }
            layers.push(Layer {
                qkv: QMatrix::from_f32(isa, 3 * h, h, &qkv),
                bqkv,
                out: QMatrix::from_f32(
                    isa,
                    h,
                    h,
                    &t(&format!("{p}.attention.output.dense.weight"), &[h, h])?,
                ),
                bout: t(&format!("{p}.attention.output.dense.bias"), &[h])?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: QMatrix::from_f32(
                    isa,
                    ff,
                    h,
                    &t(&format!("{p}.intermediate.dense.weight"), &[ff, h])?,
                ),
                bup: t(&format!("{p}.intermediate.dense.bias"), &[ff])?,
                down: QMatrix::from_f32(
                    isa,
                    h,
                    ff,
                    &t(&format!("{p}.output.dense.weight"), &[h, ff])?,
                ),
                bdown: t(&format!("{p}.output.dense.bias"), &[h])?,
                ffn_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        Ok(Self {
            cfg,
            word,
            position,
            token_type,
            embed_norm,
            layers,
            pool: Pool::new(threads, "embedder"),
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Longest input in tokens (the position table's length).
    pub fn max_tokens(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// Unit-length mean-pooled embeddings of the token sequences `texts` (each already
    /// truncated to [`Self::max_tokens`]).
    pub fn embed(&self, texts: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let vocab = cfg.vocab_size;
        let mut spans = Vec::with_capacity(texts.len());
        let mut t = 0;
        for ids in texts {
            if ids.is_empty() || ids.len() > self.max_tokens() {
                bail!(
                    "a text of {} tokens (1 to {} are embedded)",
                    ids.len(),
                    self.max_tokens()
                );
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                bail!("token id {bad} is outside the vocabulary");
            }
            spans.push((t, ids.len()));
            t += ids.len();
        }
        if t == 0 {
            return Ok(Vec::new());
        }
        let mut guard = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        let sc = &mut *guard;
        let eps = cfg.layer_norm_eps as f32;
        // Embeddings: word + position + token type 0, layer-normed.
        sc.x.resize(t * h, 0.0);
        let mut row = 0;
        for ids in texts {
            for (p, &id) in ids.iter().enumerate() {
                let x = &mut sc.x[row * h..(row + 1) * h];
                let w = &self.word[id as usize * h..(id as usize + 1) * h];
                let pe = &self.position[p * h..(p + 1) * h];
                for j in 0..h {
                    x[j] = w[j] + pe[j] + self.token_type[j];
                }
                layer_norm(x, &self.embed_norm, eps);
                row += 1;
            }
        }
        let heads = cfg.num_attention_heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // Which text each packed row belongs to.
        // Detected once per process (cached), passed to every kernel.
        let isa = Isa::detect();
        let owner: Vec<(usize, usize)> = spans
            .iter()
            .flat_map(|&(start, len)| (0..len).map(move |_| (start, len)))
            .collect();
        for layer in &self.layers {
            let x = &sc.x;
            sc.qa.fill(&self.pool, isa, t, h, &|r, out| {
                out.copy_from_slice(&x[r * h..(r + 1) * h])
            });
            sc.qkv.resize(t * 3 * h, 0.0);
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.qkv, &mut sc.qkv);
            for r in sc.qkv.chunks_exact_mut(3 * h) {
                for (v, b) in r.iter_mut().zip(&layer.bqkv) {
                    *v += b;
                }
            }
            // Attention, one task per query row (all heads), within the row's own text.
            sc.att.resize(t * h, 0.0);
            let qkv = &sc.qkv;
            let owner = &owner;
            ghostwriter_kernels::pool::for_each_chunk_mut(&self.pool, &mut sc.att, h, &|r, out| {
                let (start, len) = owner[r];
                ATT_SCORES.with_borrow_mut(|scores| {
                    scores.resize(len, 0.0);
                    for head in 0..heads {
                        let q = &qkv[r * 3 * h + head * hd..r * 3 * h + (head + 1) * hd];
                        for (j, s) in scores.iter_mut().enumerate() {
                            let kr = (start + j) * 3 * h + h + head * hd;
                            *s = kernels::dot_f32(q, &qkv[kr..kr + hd]) * scale;
                        }
                        kernels::softmax(isa, scores);
                        let o = &mut out[head * hd..(head + 1) * hd];
                        o.fill(0.0);
                        for (j, &p) in scores.iter().enumerate() {
                            let vr = (start + j) * 3 * h + 2 * h + head * hd;
                            for (a, v) in o.iter_mut().zip(&qkv[vr..vr + hd]) {
                                *a += p * v;
                            }
                        }
                    }
                })
            });
            let att = &sc.att;
            sc.qa.fill(&self.pool, isa, t, h, &|r, out| {
                out.copy_from_slice(&att[r * h..(r + 1) * h])
            });
            sc.o.resize(t * h, 0.0);
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.out, &mut sc.o);
            residual_norm(&mut sc.x, &sc.o, &layer.bout, &layer.attn_norm, eps, h);
            // Feed-forward.
            let x = &sc.x;
            sc.qa.fill(&self.pool, isa, t, h, &|r, out| {
                out.copy_from_slice(&x[r * h..(r + 1) * h])
            });
            sc.h.resize(t * ff, 0.0);
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.up, &mut sc.h);
            let (hb, bup) = (&sc.h, &layer.bup);
            sc.qa.fill(&self.pool, isa, t, ff, &|r, out| {
                for ((o, v), b) in out.iter_mut().zip(&hb[r * ff..(r + 1) * ff]).zip(bup) {
                    *o = v + b;
                }
                kernels::gelu_erf(isa, out);
            });
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.down, &mut sc.o);
            residual_norm(&mut sc.x, &sc.o, &layer.bdown, &layer.ffn_norm, eps, h);
        }
        // Mean over each text's tokens, then unit length.
        Ok(spans
            .iter()
            .map(|&(start, len)| {
                let mut e = vec![0f32; h];
                for r in start..start + len {
                    for (a, v) in e.iter_mut().zip(&sc.x[r * h..(r + 1) * h]) {
                        *a += v;
                    }
                }
                let norm = e.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                e.iter_mut().for_each(|v| *v /= norm);
                e
            })
            .collect())
    }
}

thread_local! {
    /// Attention scores of one query row, reused across calls.
    static ATT_SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x = LayerNorm(x + o + bias)`, row by row.
fn residual_norm(x: &mut [f32], o: &[f32], bias: &[f32], norm: &Norm, eps: f32, h: usize) {
    for (xr, or) in x.chunks_exact_mut(h).zip(o.chunks_exact(h)) {
        for ((a, v), b) in xr.iter_mut().zip(or).zip(bias) {
            *a += v + b;
        }
        layer_norm(xr, norm, eps);
    }
}

fn layer_norm(x: &mut [f32], norm: &Norm, eps: f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, w), b) in x.iter_mut().zip(&norm.w).zip(&norm.b) {
        *v = (*v - mean) * inv * w + b;
    }
}
