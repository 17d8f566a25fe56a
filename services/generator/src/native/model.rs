//! The native CPU transformer: llama and qwen2 decoder layers over a paged key/value cache,
//! run for a whole batch of ragged sequences in one forward pass.
//!
//! Written after candle-transformers' `quantized_llama.rs` and `quantized_qwen2.rs` (same GGUF
//! tensor names and metadata keys, the same RoPE conventions: interleaved pairs for llama,
//! NEOX halves for qwen2), but with raw buffers instead of tensors so that one pass serves many
//! sequences: the tokens of every sequence in the step are packed into one matrix for the
//! projections, each token carries its own position, and attention reads each sequence's own
//! blocks of the cache.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::Device;
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::kernels::{self, Isa, QActs, QK, QMatrix};
use super::pool::{self, Pool};
use crate::adapter::{Adapter, PROJECTIONS, Prepared, apply_row};
use crate::backend::{AdapterId, AdapterShape, BASE, Backend, STARTUP, SeqStep};
use crate::gguf;
use crate::model::{LoadOptions, cache_blocks};

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    /// `llama` or `qwen2`.
    pub architecture: String,
    /// Model width.
    pub hidden: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Feed-forward width.
    pub ff: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base.
    pub rope_base: f32,
    /// RoPE on halves (qwen2) instead of interleaved pairs (llama).
    pub neox: bool,
    /// Context window used.
    pub context: usize,
}

impl Config {
    /// Reads the hyper-parameters of a GGUF file.
    pub fn from_gguf(content: &Content, max_context: usize) -> anyhow::Result<Self> {
        let md = &content.metadata;
        let arch = gguf::meta_string(md, "general.architecture").unwrap_or_default();
        if arch != "llama" && arch != "qwen2" {
            bail!("unsupported model architecture {arch:?} (supported: llama, qwen2)");
        }
        let get = |key: &str| {
            gguf::meta_u32(md, &format!("{arch}.{key}"))
                .map(|v| v as usize)
                .with_context(|| format!("GGUF metadata lacks {arch}.{key}"))
        };
        let hidden = get("embedding_length")?;
        let heads = get("attention.head_count")?;
        let kv_heads = get("attention.head_count_kv").unwrap_or(heads);
        let float = |key: &str| {
            md.get(&format!("{arch}.{key}"))
                .and_then(|v| v.to_f32().ok())
        };
        let vocab = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .context("GGUF lacks token_embd.weight")?;
        let context = get("context_length").map_or(max_context, |c| c.min(max_context));
        Ok(Self {
            hidden,
            layers: get("block_count")?,
            heads,
            kv_heads,
            head_dim: hidden / heads,
            ff: get("feed_forward_length")?,
            vocab,
            eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_base: float("rope.freq_base").unwrap_or(10_000.0),
            neox: arch == "qwen2",
            context,
            architecture: arch,
        })
    }

    /// RoPE cosines and sines, `[position][head_dim / 2]`, for every position of the context.
    pub fn rope_tables(&self) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let mut cos = vec![0f32; self.context * half];
        let mut sin = vec![0f32; self.context * half];
        for pos in 0..self.context {
            for i in 0..half {
                let theta = 1f32 / self.rope_base.powf((2 * i) as f32 / self.head_dim as f32);
                let a = pos as f32 * theta;
                cos[pos * half + i] = a.cos();
                sin[pos * half + i] = a.sin();
            }
        }
        (cos, sin)
    }

    /// (inputs, outputs) of a projection by its GGUF name (`attn_q`, …, `ffn_down`).
    pub fn projection_widths(&self, projection: &str) -> Option<(usize, usize)> {
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        Some(match projection {
            "attn_q" => (self.hidden, q),
            "attn_k" | "attn_v" => (self.hidden, kv),
            "attn_output" => (q, self.hidden),
            "ffn_gate" | "ffn_up" => (self.hidden, self.ff),
            "ffn_down" => (self.ff, self.hidden),
            _ => return None,
        })
    }

    /// What an adapter of this model must fit: its layers and each projection's widths.
    pub fn adapter_shape(&self) -> AdapterShape {
        AdapterShape {
            layers: self.layers,
            widths: PROJECTIONS
                .iter()
                .filter_map(|p| Some((p.to_string(), self.projection_widths(p)?)))
                .collect(),
        }
    }

    /// Bytes of key and value cache per token (f16).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.layers * self.kv_heads * self.head_dim * 2
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Query, key and value projections stacked (rows q, then k, then v).
    wqkv: QMatrix,
    bqkv: Option<Vec<f32>>,
    wo: QMatrix,
    ffn_norm: Vec<f32>,
    /// Gate and up projections stacked (rows gate, then up).
    wgu: QMatrix,
    wdown: QMatrix,
}

/// The paged key/value cache: `blocks` blocks of `block_size` positions, per layer, in f16.
/// Per block and kv head, keys are stored transposed (`[head_dim][block_size]`, so attention
/// scores 16 keys per vector) and values by position (`[block_size][head_dim]`).
pub struct KvCache {
    /// Positions per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub blocks: usize,
    kv_heads: usize,
    k: Vec<f16>,
    v: Vec<f16>,
}

impl KvCache {
    fn new(cfg: &Config, block_size: usize, blocks: usize) -> Self {
        let len = cfg.layers * blocks * block_size * cfg.kv_heads * cfg.head_dim;
        // Written, not just allocated (`vec![0; n]` would get lazily mapped zero pages): the
        // pages are mapped now rather than faulted in on the first requests.
        let prefaulted = || {
            let mut x = Vec::with_capacity(len);
            x.resize(len, f16::ZERO);
            x
        };
        let (k, v) = (prefaulted(), prefaulted());
        Self {
            block_size,
            blocks,
            kv_heads: cfg.kv_heads,
            k,
            v,
        }
    }

    /// Keys of one block and kv head, transposed: `[head_dim][block_size]`.
    #[inline]
    fn k_at(&self, layer: usize, block: u32, g: usize, hd: usize) -> usize {
        (((layer * self.blocks + block as usize) * self.kv_heads) + g) * hd * self.block_size
    }

    /// Values of one position and kv head: `[head_dim]`.
    #[inline]
    fn v_at(&self, layer: usize, block: u32, g: usize, hd: usize, off: usize) -> usize {
        ((((layer * self.blocks + block as usize) * self.kv_heads) + g) * self.block_size + off)
            * hd
    }
}

#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    gu: Vec<f32>,
    out: Vec<f32>,
    qa: QActs,
    /// f32 inputs of the projections an adapter updates.
    h: Vec<f32>,
    act: Vec<f32>,
    /// Adapter updates, rows grouped by adapter.
    delta: Vec<f32>,
}

/// The model, its cache and its threads.
pub struct NativeModel {
    /// Hyper-parameters.
    pub cfg: Config,
    pool: Pool,
    embd_q: Vec<i8>,
    embd_d: Vec<f32>,
    layers: Vec<Layer>,
    out_norm: Vec<f32>,
    lm_head: QMatrix,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The key/value cache.
    pub kv: KvCache,
    scratch: Scratch,
    /// LoRA adapters applied unmerged, in f32, by the id sequences name them with.
    adapters: std::collections::HashMap<AdapterId, Lora>,
    /// The kernels' instruction set, detected at load.
    isa: Isa,
}

/// Quantizes `m` rows from `row` for the next GEMM; with `keep`, the f32 rows are also kept
/// there (an adapter's low-rank update reads them).
fn produce(
    pool: &Pool,
    isa: Isa,
    qa: &mut kernels::QActs,
    keep: Option<&mut Vec<f32>>,
    m: usize,
    k: usize,
    row: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    match keep {
        None => qa.fill(pool, isa, m, k, row),
        Some(buf) => {
            buf.resize(m * k, 0.0);
            pool::for_each_chunk_mut(pool, &mut buf[..m * k], k, row);
            let kept = &*buf;
            qa.fill(pool, isa, m, k, &|r, out| {
                out.copy_from_slice(&kept[r * k..(r + 1) * k])
            });
        }
    }
}

/// An adapter laid out for serving: per layer, per projection (in [`PROJECTIONS`] order).
struct Lora {
    layers: Vec<[Option<Prepared>; 7]>,
}

impl Lora {
    fn new(adapter: &Adapter, layers: usize) -> Self {
        let scale = adapter.scale();
        Self {
            layers: (0..layers)
                .map(|l| PROJECTIONS.map(|name| adapter.pair(l, name).map(|p| p.prepare(scale))))
                .collect(),
        }
    }
}

/// A step's rows that run with an adapter, grouped by adapter (the SGMV idea of Punica and
/// S-LoRA): computed once per forward pass, used by every [`lora`] call of it.
struct AdapterRows<'a> {
    /// Each packed row's adapter (none for the base model).
    adapters: Vec<Option<&'a Lora>>,
    /// The rows that have one, those of one adapter together.
    order: Vec<usize>,
    /// The tasks: runs of `order` of one adapter, at most an even share of the rows each.
    runs: Vec<std::ops::Range<usize>>,
}

impl<'a> AdapterRows<'a> {
    fn new(adapters: Vec<Option<&'a Lora>>, threads: usize) -> Self {
        let key = |r: usize| adapters[r].map_or(0, |a| a as *const Lora as usize);
        let mut order: Vec<usize> = (0..adapters.len()).filter(|&r| key(r) != 0).collect();
        order.sort_by_key(|&r| (key(r), r));
        let share = order.len().div_ceil(threads.max(1));
        let mut runs = Vec::new();
        let mut start = 0;
        for j in 1..=order.len() {
            if j == order.len() || key(order[j]) != key(order[start]) || j - start == share {
                runs.push(start..j);
                start = j;
            }
        }
        Self {
            adapters,
            order,
            runs,
        }
    }

    /// Whether any row has an adapter (the projections' f32 inputs are then kept).
    fn any(&self) -> bool {
        !self.order.is_empty()
    }
}

/// Adds each row's adapter's updates (none for the base model's rows) of `layer`'s
/// `projections` (index in [`PROJECTIONS`], first output column) for inputs `x` (rows of
/// `width`) to `out` (rows of `stride`). Rows of different adapters share the pass; each task
/// applies one pair to all its rows of one adapter while the pair is in cache. Each row's
/// update is computed alone into `delta` and then added, so a row's output does not depend on
/// the other rows.
#[allow(clippy::too_many_arguments)]
fn lora(
    pool: &Pool,
    rows: &AdapterRows<'_>,
    layer: usize,
    projections: &[(usize, usize)],
    x: &[f32],
    width: usize,
    out: &mut [f32],
    stride: usize,
    delta: &mut Vec<f32>,
) {
    if !rows.any() {
        return;
    }
    let order = &rows.order;
    let ranges: Vec<std::ops::Range<usize>> = rows
        .runs
        .iter()
        .map(|r| r.start * stride..r.end * stride)
        .collect();
    delta.clear();
    delta.resize(order.len() * stride, 0.0);
    pool::for_each_range_mut(pool, delta, &ranges, &|task, piece| {
        let first = rows.runs[task].start;
        let Some(a) = rows.adapters[order[first]] else { return };
        for &(i, offset) in projections {
            let Some(p) = &a.layers[layer][i] else {
                continue;
            };
            for (k, row) in piece.chunks_exact_mut(stride).enumerate() {
                let r = order[first + k];
                apply_row(p, &x[r * width..(r + 1) * width], row, offset);
            }
        }
    });
    for (d, &r) in delta.chunks_exact(stride).zip(order) {
        for (o, v) in out[r * stride..(r + 1) * stride].iter_mut().zip(d) {
            *o += v;
        }
    }
}

/// A weight as Q8_0 rows: (rows, cols, scales `[rows][cols/32]`, quants `[rows][cols]`).
struct Q8Rows {
    n: usize,
    k: usize,
    d: Vec<f32>,
    q: Vec<i8>,
}

fn q8_rows(isa: Isa, t: &QTensor) -> anyhow::Result<Q8Rows> {
    let (n, k) = t.shape().dims2()?;
    if k % QK != 0 {
        bail!("a weight of width {k} is not a multiple of {QK}");
    }
    if t.dtype() == GgmlDType::Q8_0 {
        let data = t.data()?;
        let blocks = n * k / QK;
        if data.len() != blocks * 34 {
            bail!("unexpected Q8_0 data size");
        }
        let mut d = Vec::with_capacity(blocks);
        let mut q = Vec::with_capacity(n * k);
        for b in data.chunks_exact(34) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            q.extend(b[2..].iter().map(|&v| v as i8));
        }
        return Ok(Q8Rows { n, k, d, q });
    }
    // Other formats (Q4_K, Q6_K, F16, ...) are dequantized and re-quantized to Q8_0.
    let f = t
        .dequantize(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let kbs = k / QK;
    let mut d = vec![0f32; n * kbs];
    let mut q = vec![0i8; n * k];
    for (blk, x) in f.chunks_exact(QK).enumerate() {
        let (s, qs) = kernels::quantize_block(isa, x);
        d[blk] = s;
        q[blk * QK..(blk + 1) * QK].copy_from_slice(&qs);
    }
    Ok(Q8Rows { n, k, d, q })
}

fn stack(parts: &[Q8Rows]) -> QMatrix {
    let k = parts[0].k;
    let n = parts.iter().map(|p| p.n).sum();
    let d: Vec<f32> = parts.iter().flat_map(|p| p.d.iter().copied()).collect();
    let q: Vec<i8> = parts.iter().flat_map(|p| p.q.iter().copied()).collect();
    QMatrix::from_q8(n, k, &d, &q)
}

impl NativeModel {
    /// Loads a GGUF file with `opts.threads` compute threads (0 = every core) and a cache of
    /// `opts.kv_cache_mb` in blocks of `opts.block_size` positions.
    pub fn load(path: &Path, opts: &LoadOptions) -> anyhow::Result<Self> {
        let block_size = opts.block_size;
        let isa = Isa::detect();
        if block_size == 0 || !block_size.is_multiple_of(16) {
            bail!(
                "the native engine needs a key/value block size that is a multiple of 16, not {block_size}"
            );
        }
        let (content, mut reader) = gguf::read_content(path)?;
        let cfg = Config::from_gguf(&content, opts.max_context)?;
        if cfg.head_dim % 16 != 0 {
            bail!("head width {} is not a multiple of 16", cfg.head_dim);
        }
        let mut tensor = |name: &str| {
            content
                .tensor(&mut reader, name, &Device::Cpu)
                .with_context(|| format!("reading {name}"))
        };
        let vector = |t: QTensor| -> anyhow::Result<Vec<f32>> {
            Ok(t.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let embd = q8_rows(isa, &tensor("token_embd.weight")?)?;
        let out_norm = vector(tensor("output_norm.weight")?)?;
        let lm_head = match tensor("output.weight") {
            Ok(t) => stack(&[q8_rows(isa, &t)?]),
            Err(_) => QMatrix::from_q8(embd.n, embd.k, &embd.d, &embd.q),
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("blk.{l}");
            let wq = q8_rows(isa, &tensor(&format!("{p}.attn_q.weight"))?)?;
            let wk = q8_rows(isa, &tensor(&format!("{p}.attn_k.weight"))?)?;
            let wv = q8_rows(isa, &tensor(&format!("{p}.attn_v.weight"))?)?;
            let bqkv = if cfg.architecture == "qwen2" {
                let mut b = vector(tensor(&format!("{p}.attn_q.bias"))?)?;
                b.extend(vector(tensor(&format!("{p}.attn_k.bias"))?)?);
                b.extend(vector(tensor(&format!("{p}.attn_v.bias"))?)?);
                Some(b)
            } else {
                None
            };
            let gate = q8_rows(isa, &tensor(&format!("{p}.ffn_gate.weight"))?)?;
            let up = q8_rows(isa, &tensor(&format!("{p}.ffn_up.weight"))?)?;
            layers.push(Layer {
                attn_norm: vector(tensor(&format!("{p}.attn_norm.weight"))?)?,
                wqkv: stack(&[wq, wk, wv]),
                bqkv,
                wo: stack(&[q8_rows(isa, &tensor(&format!("{p}.attn_output.weight"))?)?]),
                ffn_norm: vector(tensor(&format!("{p}.ffn_norm.weight"))?)?,
                wgu: stack(&[gate, up]),
                wdown: stack(&[q8_rows(isa, &tensor(&format!("{p}.ffn_down.weight"))?)?]),
            });
        }
        let adapter = match &opts.adapter {
            None => None,
            Some(file) => {
                let a =
                    Adapter::load_for(file, path, opts.model_sha256.as_deref(), cfg.layers, |p| {
                        cfg.projection_widths(p)
                    })?;
                Some(Lora::new(&a, cfg.layers))
            }
        };
        let adapters = adapter.into_iter().map(|a| (STARTUP, a)).collect();
        let (cos, sin) = cfg.rope_tables();
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let pool = Pool::new(threads, "generator");
        let blocks = cache_blocks(
            opts.kv_cache_mb,
            cfg.kv_bytes_per_token(),
            block_size,
            cfg.context,
        );
        let kv = KvCache::new(&cfg, block_size, blocks);
        Ok(Self {
            pool,
            embd_q: embd.q,
            embd_d: embd.d,
            layers,
            out_norm,
            lm_head,
            cos,
            sin,
            kv,
            cfg,
            scratch: Scratch::default(),
            adapters,
            isa,
        })
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| l.wqkv.bytes() + l.wo.bytes() + l.wgu.bytes() + l.wdown.bytes())
            .sum();
        l + self.lm_head.bytes() + self.embd_q.len() + 4 * self.embd_d.len()
    }

    /// The id rows name to run with the adapter given at load ([`BASE`] when none was).
    pub fn startup_adapter(&self) -> AdapterId {
        if self.adapters.contains_key(&STARTUP) {
            STARTUP
        } else {
            BASE
        }
    }

    /// The logits after `ids`, scored alone from position 0 with the start-up adapter, in the
    /// first blocks of the cache: for a scorer that owns the model, never beside an engine.
    pub fn logits_after(&mut self, ids: &[u32]) -> anyhow::Result<Vec<f32>> {
        let blocks: Vec<u32> = (0..ids.len().div_ceil(self.kv.block_size) as u32).collect();
        let step = SeqStep {
            tokens: ids,
            start: 0,
            blocks: &blocks,
            logits: true,
            adapter: self.startup_adapter(),
        };
        Ok(self.forward(&[step])?.remove(0))
    }

    /// Compute threads.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// One forward pass over every sequence's tokens; returns the last-token logits of the
    /// sequences that asked for them, in order.
    pub fn forward(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let isa = self.isa;
        let cfg = &self.cfg;
        let (hd, nh, nkv, hidden) = (cfg.head_dim, cfg.heads, cfg.kv_heads, cfg.hidden);
        let bs = self.kv.block_size;
        // Token bookkeeping: (sequence, position) per packed row.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (s, seq) in seqs.iter().enumerate() {
            let end = seq.start + seq.tokens.len();
            if end > cfg.context {
                bail!(
                    "position {end} is past the context window of {}",
                    cfg.context
                );
            }
            if seq.blocks.len() * bs < end {
                bail!("sequence {s} has too few cache blocks for {end} positions");
            }
            rows.extend((seq.start..end).map(|p| (s, p)));
        }
        let t = rows.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        // Tiles of up to TILE consecutive rows of one sequence: their attention scores are
        // computed together, each key vector converted once for all of them.
        let mut tiles: Vec<(usize, usize)> = Vec::new();
        for (r, &(s, _)) in rows.iter().enumerate() {
            match tiles.last_mut() {
                Some((r0, n)) if *n < TILE && rows[*r0].0 == s => *n += 1,
                _ => tiles.push((r, 1)),
            }
        }
        // Each row's adapter; the f32 inputs of the projections are kept when any row has one.
        let mut row_adapters: Vec<Option<&Lora>> = Vec::with_capacity(t);
        for seq in seqs {
            let a = match seq.adapter {
                BASE => None,
                id => Some(
                    self.adapters
                        .get(&id)
                        .with_context(|| format!("adapter #{id} is not installed"))?,
                ),
            };
            row_adapters.extend(std::iter::repeat_n(a, seq.tokens.len()));
        }
        let ra = AdapterRows::new(row_adapters, self.pool.threads());
        let ra = &ra;
        let sc = &mut self.scratch;
        sc.x.resize(t * hidden, 0.0);
        let kbs = hidden / QK;
        for (i, tok) in seqs.iter().flat_map(|s| s.tokens.iter()).enumerate() {
            let tok = *tok as usize;
            if tok >= cfg.vocab {
                bail!("token id {tok} is outside the vocabulary");
            }
            let x = &mut sc.x[i * hidden..(i + 1) * hidden];
            for kb in 0..kbs {
                let d = self.embd_d[tok * kbs + kb];
                for j in 0..QK {
                    x[kb * QK + j] = d * self.embd_q[tok * hidden + kb * QK + j] as f32;
                }
            }
        }
        let qkv_w = (nh + 2 * nkv) * hd;
        let nrep = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            // Attention block.
            {
                let norm = norm_rows(&sc.x, &layer.attn_norm, cfg.eps, hidden);
                let keep = ra.any().then_some(&mut sc.h);
                produce(&self.pool, isa, &mut sc.qa, keep, t, hidden, &norm);
            }
            sc.qkv.resize(t * qkv_w, 0.0);
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.wqkv, &mut sc.qkv);
            let (qw, kw) = (nh * hd, nkv * hd);
            let qkv_parts = [(0, 0), (1, qw), (2, qw + kw)];
            lora(
                &self.pool,
                ra,
                l,
                &qkv_parts,
                &sc.h,
                hidden,
                &mut sc.qkv,
                qkv_w,
                &mut sc.delta,
            );
            if let Some(b) = &layer.bqkv {
                for row in sc.qkv.chunks_exact_mut(qkv_w) {
                    for (v, bv) in row.iter_mut().zip(b) {
                        *v += bv;
                    }
                }
            }
            for (row, &(s, pos)) in sc.qkv.chunks_exact_mut(qkv_w).zip(&rows) {
                let (q, kvp) = row.split_at_mut(nh * hd);
                let (k, v) = kvp.split_at_mut(nkv * hd);
                let half = hd / 2;
                let (c, sn) = (
                    &self.cos[pos * half..(pos + 1) * half],
                    &self.sin[pos * half..(pos + 1) * half],
                );
                for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                    rope(head, c, sn, cfg.neox);
                }
                for x in q.iter_mut() {
                    *x *= scale;
                }
                let block = seqs[s].blocks[pos / bs];
                let off = pos % bs;
                for g in 0..nkv {
                    let kt = self.kv.k_at(l, block, g, hd);
                    for d in 0..hd {
                        self.kv.k[kt + d * bs + off] = f16::from_f32(k[g * hd + d]);
                    }
                    let vt = self.kv.v_at(l, block, g, hd, off);
                    for (dst, src) in self.kv.v[vt..vt + hd].iter_mut().zip(&v[g * hd..]) {
                        *dst = f16::from_f32(*src);
                    }
                }
            }
            // Attention, one task per (kv group, tile of up to TILE consecutive tokens of a
            // sequence); outputs group-major, `[group][token][nrep·hd]`, so each task's piece
            // is contiguous.
            let gw = nrep * hd;
            sc.att.resize(t * nh * hd, 0.0);
            let ranges: Vec<std::ops::Range<usize>> = (0..nkv)
                .flat_map(|g| {
                    tiles
                        .iter()
                        .map(move |&(r0, n)| (g * t + r0) * gw..(g * t + r0 + n) * gw)
                })
                .collect();
            let kv = &self.kv;
            let qkv = &sc.qkv;
            let (rows_ref, tiles_ref) = (&rows, &tiles);
            let attend = |task: usize, out: &mut [f32]| {
                let (g, (r0, n)) = (task / tiles_ref.len(), tiles_ref[task % tiles_ref.len()]);
                let (s, first) = rows_ref[r0];
                QUERIES.with_borrow_mut(|q| {
                    q.clear();
                    for r in r0..r0 + n {
                        q.extend_from_slice(&qkv[r * qkv_w + g * gw..r * qkv_w + (g + 1) * gw]);
                    }
                    attend_tile(isa, kv, l, seqs[s].blocks, first, n, g, hd, nrep, q, out);
                })
            };
            let work: usize = rows.iter().map(|&(_, p)| p + 1).sum::<usize>() * nh;
            if work < 1 << 11 {
                let mut rest = &mut sc.att[..];
                let mut at = 0;
                for (i, r) in ranges.iter().enumerate() {
                    let (piece, tail) =
                        std::mem::take(&mut rest)[r.start - at..].split_at_mut(r.len());
                    attend(i, piece);
                    rest = tail;
                    at = r.end;
                }
            } else {
                pool::for_each_range_mut(&self.pool, &mut sc.att, &ranges, &attend);
            }
            let att = &sc.att;
            let w = nh * hd;
            produce(
                &self.pool,
                isa,
                &mut sc.qa,
                ra.any().then_some(&mut sc.h),
                t,
                w,
                &|r, out| {
                    for g in 0..nkv {
                        out[g * gw..(g + 1) * gw]
                            .copy_from_slice(&att[(g * t + r) * gw..(g * t + r + 1) * gw]);
                    }
                },
            );
            sc.out.resize(t * hidden, 0.0);
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.wo, &mut sc.out);
            lora(
                &self.pool,
                ra,
                l,
                &[(3, 0)],
                &sc.h,
                w,
                &mut sc.out,
                hidden,
                &mut sc.delta,
            );
            for (x, o) in sc.x.iter_mut().zip(&sc.out) {
                *x += o;
            }
            // Feed-forward block.
            {
                let norm = norm_rows(&sc.x, &layer.ffn_norm, cfg.eps, hidden);
                let keep = ra.any().then_some(&mut sc.h);
                produce(&self.pool, isa, &mut sc.qa, keep, t, hidden, &norm);
            }
            let ff = cfg.ff;
            sc.gu.resize(t * 2 * ff, 0.0);
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.wgu, &mut sc.gu);
            let gu_parts = [(4, 0), (5, ff)];
            lora(
                &self.pool,
                ra,
                l,
                &gu_parts,
                &sc.h,
                hidden,
                &mut sc.gu,
                2 * ff,
                &mut sc.delta,
            );
            let gu = &sc.gu;
            produce(
                &self.pool,
                isa,
                &mut sc.qa,
                ra.any().then_some(&mut sc.act),
                t,
                ff,
                &|r, out| {
                    let (g, u) = gu[r * 2 * ff..(r + 1) * 2 * ff].split_at(ff);
                    kernels::silu_mul(isa, g, u, out);
                },
            );
            kernels::gemm(&self.pool, isa, &sc.qa, &layer.wdown, &mut sc.out);
            lora(
                &self.pool,
                ra,
                l,
                &[(6, 0)],
                &sc.act,
                ff,
                &mut sc.out,
                hidden,
                &mut sc.delta,
            );
            for (x, o) in sc.x.iter_mut().zip(&sc.out) {
                *x += o;
            }
        }
        // Logits of the last token of each sequence that wants them.
        let mut last = Vec::new();
        let mut offset = 0;
        for seq in seqs {
            offset += seq.tokens.len();
            if seq.logits && !seq.tokens.is_empty() {
                last.push(offset - 1);
            }
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let (x, norm) = (&sc.x, &self.out_norm);
        sc.qa.fill(&self.pool, isa, last.len(), hidden, &|i, out| {
            let r = last[i];
            rms_norm(&x[r * hidden..(r + 1) * hidden], norm, cfg.eps, out)
        });
        let mut logits = vec![0f32; last.len() * cfg.vocab];
        kernels::gemm(&self.pool, isa, &sc.qa, &self.lm_head, &mut logits);
        Ok(logits
            .chunks_exact(cfg.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Row `r` of `x` (rows of `width`), RMS-normed with `w`.
fn norm_rows<'a>(
    x: &'a [f32],
    w: &'a [f32],
    eps: f32,
    width: usize,
) -> impl Fn(usize, &mut [f32]) + Sync + use<'a> {
    move |r, out| rms_norm(&x[r * width..(r + 1) * width], w, eps, out)
}

/// RMS norm of one row.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ss + eps).sqrt();
    for ((o, v), wv) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * wv;
    }
}

fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], neox: bool) {
    let half = x.len() / 2;
    if neox {
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = a * sin[i] + b * cos[i];
        }
    } else {
        for i in 0..half {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * cos[i] - b * sin[i];
            x[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    }
}

/// Tokens per attention tile: with 3 heads per kv group, 12 query vectors share each
/// converted key vector (the most [`kernels::scores16`] takes in one pass).
const TILE: usize = 4;

/// Attention of the `nrep` query heads of kv group `g` for `n` consecutive tokens of one
/// sequence, the first at position `first`; token `i` sees positions `0..=first + i`. `q` holds
/// the tokens' pre-scaled heads side by side (`[n][nrep][hd]`), and so does `out`.
#[allow(clippy::too_many_arguments)]
fn attend_tile(
    isa: Isa,
    kv: &KvCache,
    layer: usize,
    blocks: &[u32],
    first: usize,
    n: usize,
    g: usize,
    hd: usize,
    nrep: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let padded = (first + n).div_ceil(16) * 16;
    SCORES.with_borrow_mut(|scores| {
        scores.clear();
        scores.resize(n * nrep * padded, 0.0);
        let bs = kv.block_size;
        for p0 in (0..padded).step_by(16) {
            let kt = kv.k_at(layer, blocks[p0 / bs], g, hd) + p0 % bs;
            kernels::scores16(
                isa,
                q,
                n * nrep,
                hd,
                &kv.k[kt..],
                bs,
                &mut scores[p0..],
                padded,
            );
        }
        // Each token's probabilities over the positions it sees, zero up to the tile's last
        // position (adding 0·v leaves its sums as they are), so one pass over the values
        // serves the whole tile.
        let end = first + n;
        for i in 0..n {
            let len = first + i + 1;
            for r in 0..nrep {
                let row = &mut scores[(i * nrep + r) * padded..(i * nrep + r + 1) * padded];
                kernels::softmax(isa, &mut row[..len]);
                row[len..end].fill(0.0);
            }
        }
        out.fill(0.0);
        for p0 in (0..end).step_by(bs) {
            let count = bs.min(end - p0);
            let v = kv.v_at(layer, blocks[p0 / bs], g, hd, 0);
            kernels::accumulate_values(
                isa,
                out,
                &scores[p0..],
                padded,
                count,
                &kv.v[v..v + count * hd],
                hd,
                n * nrep,
            );
        }
    })
}

thread_local! {
    /// Attention scores of one tile, reused across calls.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Query heads of one tile, gathered side by side.
    static QUERIES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Backend for NativeModel {
    fn forward(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        NativeModel::forward(self, seqs)
    }

    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> anyhow::Result<()> {
        let hd = self.cfg.head_dim;
        // A block of one layer, every kv head: keys and values are each contiguous.
        let n = self.kv.kv_heads * hd * self.kv.block_size;
        for &(src, dst) in pairs {
            anyhow::ensure!(
                (src as usize) < self.kv.blocks && (dst as usize) < self.kv.blocks,
                "cache block {src} or {dst} is out of range"
            );
            for layer in 0..self.cfg.layers {
                let (s, d) = (
                    self.kv.k_at(layer, src, 0, hd),
                    self.kv.k_at(layer, dst, 0, hd),
                );
                self.kv.k.copy_within(s..s + n, d);
                let (s, d) = (
                    self.kv.v_at(layer, src, 0, hd, 0),
                    self.kv.v_at(layer, dst, 0, hd, 0),
                );
                self.kv.v.copy_within(s..s + n, d);
            }
        }
        Ok(())
    }

    fn block_size(&self) -> usize {
        self.kv.block_size
    }

    fn cache_blocks(&self) -> usize {
        self.kv.blocks
    }

    fn adapter_shape(&self) -> Option<AdapterShape> {
        Some(self.cfg.adapter_shape())
    }

    fn install_adapter(&mut self, id: AdapterId, adapter: &Adapter) -> anyhow::Result<()> {
        anyhow::ensure!(id != BASE, "adapter id {BASE} is the base model's");
        self.adapters
            .insert(id, Lora::new(adapter, self.cfg.layers));
        Ok(())
    }

    fn remove_adapter(&mut self, id: AdapterId) {
        self.adapters.remove(&id);
    }

    fn context(&self) -> usize {
        self.cfg.context
    }

    fn describe(&self) -> String {
        format!(
            "native cpu, {} kernel, {} threads, Q8_0 weights ({} MB), f16 kv cache ({} blocks of {})",
            self.isa.gemm_kernel(),
            self.threads(),
            self.weight_bytes() >> 20,
            self.kv.blocks,
            self.kv.block_size
        )
    }
}
