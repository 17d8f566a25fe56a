//! The candle backend, for CUDA devices: the same batched forward pass over a paged key/value
//! cache as the native CPU engine, written with candle tensors.
//!
//! Adapted from candle-transformers' `quantized_llama.rs` and `quantized_qwen2.rs` (tensor
//! names, RoPE conventions), changed for batching: the step's tokens are packed into one
//! matrix for every projection, RoPE gathers each token's own position, keys and values are
//! scattered into cache blocks (`scatter_set`), and attention gathers each sequence's blocks
//! back (`index_select`): decoding sequences together, padded to the longest with a mask;
//! each prompt chunk on its own with a causal mask.
//!
//! Weights: dense bf16 by default (candle's quantized CUDA matmul has a fast kernel only up to
//! 8 rows and dequantizes on every call above that), or the GGUF's own quantized blocks with
//! `--gpu-weights quantized`. LoRA adapters are served unmerged, many in one batch: each
//! updated projection adds, for the rows of each adapter (gathered with `index_select`), their
//! low-rank term computed in f32, scattered back with `index_add`. On a CPU device (used by tests to
//! check this code against the native engine) weights and activations are f32.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::adapter::{Adapter, PROJECTIONS};
use crate::backend::{AdapterId, AdapterShape, BASE, Backend, STARTUP, SeqStep};
use crate::gguf;
use crate::model::{LoadOptions, cache_blocks};
use crate::native::Config;

enum Linear {
    Dense(Tensor),
    Quant(QMatMul),
}

impl Linear {
    fn new(q: QTensor, dense: Option<DType>, device: &Device) -> anyhow::Result<Self> {
        Ok(match dense {
            Some(dt) => Linear::Dense(q.dequantize(device)?.to_dtype(dt)?),
            None => Linear::Quant(QMatMul::from_qtensor(q)?),
        })
    }

    /// `x[t][k] · Wᵀ`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Dense(w) => x.matmul(&w.t()?),
            Linear::Quant(q) => {
                let dt = x.dtype();
                q.forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                    .to_dtype(dt)
            }
        }
    }
}

/// One projection's low-rank pair on the device: `Aᵀ` (in × rank) and `scale·Bᵀ` (rank ×
/// out), f32.
type Pair = (Tensor, Tensor);

/// An adapter on the device: per layer, per projection (in [`PROJECTIONS`] order).
type DeviceAdapter = Vec<[Option<Pair>; 7]>;

/// The rows of one adapter in a step: its id and the packed row indices.
struct AdapterRows {
    id: AdapterId,
    rows: Tensor,
}

/// A projection of a layer: its index in [`PROJECTIONS`] and its weight.
struct Projection {
    index: usize,
    w: Linear,
}

struct Layer {
    attn_norm: Tensor,
    wq: Projection,
    wk: Projection,
    wv: Projection,
    bias: Option<(Tensor, Tensor, Tensor)>,
    wo: Projection,
    ffn_norm: Tensor,
    w_gate: Projection,
    w_up: Projection,
    w_down: Projection,
}

/// The device layout of an adapter.
fn device_adapter(a: &Adapter, layers: usize, device: &Device) -> anyhow::Result<DeviceAdapter> {
    let scale = a.scale() as f64;
    (0..layers)
        .map(|l| {
            let mut pairs: [Option<Pair>; 7] = Default::default();
            for (i, name) in PROJECTIONS.iter().enumerate() {
                if let Some(p) = a.pair(l, name) {
                    let rank = p.a.len() / p.inputs.max(1);
                    let at = Tensor::from_slice(&p.a, (rank, p.inputs), device)?
                        .t()?
                        .contiguous()?;
                    let bt = (Tensor::from_slice(&p.b, (p.outputs, rank), device)? * scale)?
                        .t()?
                        .contiguous()?;
                    pairs[i] = Some((at, bt));
                }
            }
            Ok(pairs)
        })
        .collect()
}

/// The model on a candle device, with its paged cache.
pub struct CandleModel {
    cfg: Config,
    device: Device,
    dtype: DType,
    embd: Tensor,
    layers: Vec<Layer>,
    out_norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// Per layer: keys and values, `[blocks·block_size, kv_heads·head_dim]`.
    k_cache: Vec<Tensor>,
    v_cache: Vec<Tensor>,
    block_size: usize,
    blocks: usize,
    weights: &'static str,
    /// Adapters by the id sequences name them with.
    adapters: std::collections::HashMap<AdapterId, DeviceAdapter>,
}

impl CandleModel {
    /// Loads a GGUF file onto `device`.
    pub fn load(path: &Path, device: &Device, opts: &LoadOptions) -> anyhow::Result<Self> {
        let (content, mut reader) = gguf::read_content(path)?;
        let cfg = Config::from_gguf(&content, opts.max_context)?;
        let quantized = std::env::var("GHOSTWRITER_GPU_WEIGHTS").is_ok_and(|v| v == "quantized");
        let dtype = if device.is_cpu() || quantized {
            DType::F32
        } else {
            DType::BF16
        };
        let dense = (!quantized).then_some(dtype);
        let mut t = |name: &str| -> anyhow::Result<QTensor> {
            content
                .tensor(&mut reader, name, device)
                .with_context(|| format!("reading {name}"))
        };
        let vec =
            |q: QTensor| -> anyhow::Result<Tensor> { Ok(q.dequantize(device)?.to_dtype(dtype)?) };
        let embd_q = t("token_embd.weight")?;
        let embd = embd_q.dequantize(device)?.to_dtype(dtype)?;
        let lm_head = match (t("output.weight"), dense) {
            (Ok(q), _) => Linear::new(q, dense, device)?,
            // Tied embeddings: the dense table serves both (candle tensors share storage).
            (Err(_), Some(_)) => Linear::Dense(embd.clone()),
            (Err(_), None) => Linear::Quant(QMatMul::from_qtensor(embd_q)?),
        };
        let out_norm = vec(t("output_norm.weight")?)?;
        let adapter = match &opts.adapter {
            None => None,
            Some(file) => Some(Adapter::load_for(
                file,
                path,
                opts.model_sha256.as_deref(),
                cfg.layers,
                |p| cfg.projection_widths(p),
            )?),
        };
        let mut adapters = std::collections::HashMap::new();
        if let Some(a) = &adapter {
            adapters.insert(STARTUP, device_adapter(a, cfg.layers, device)?);
        }
        let projection = |name: &str, q: QTensor| -> anyhow::Result<Projection> {
            Ok(Projection {
                index: PROJECTIONS
                    .iter()
                    .position(|p| *p == name)
                    .context("a projection outside PROJECTIONS")?,
                w: Linear::new(q, dense, device)?,
            })
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("blk.{l}");
            let bias = if cfg.architecture == "qwen2" {
                Some((
                    vec(t(&format!("{p}.attn_q.bias"))?)?,
                    vec(t(&format!("{p}.attn_k.bias"))?)?,
                    vec(t(&format!("{p}.attn_v.bias"))?)?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vec(t(&format!("{p}.attn_norm.weight"))?)?,
                wq: projection("attn_q", t(&format!("{p}.attn_q.weight"))?)?,
                wk: projection("attn_k", t(&format!("{p}.attn_k.weight"))?)?,
                wv: projection("attn_v", t(&format!("{p}.attn_v.weight"))?)?,
                bias,
                wo: projection("attn_output", t(&format!("{p}.attn_output.weight"))?)?,
                ffn_norm: vec(t(&format!("{p}.ffn_norm.weight"))?)?,
                w_gate: projection("ffn_gate", t(&format!("{p}.ffn_gate.weight"))?)?,
                w_up: projection("ffn_up", t(&format!("{p}.ffn_up.weight"))?)?,
                w_down: projection("ffn_down", t(&format!("{p}.ffn_down.weight"))?)?,
            });
        }
        let half = cfg.head_dim / 2;
        let (cos, sin) = cfg.rope_tables();
        let cos = Tensor::from_vec(cos, (cfg.context, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (cfg.context, half), device)?.to_dtype(dtype)?;
        let bytes_per_token = cfg.kv_bytes_per_token() * dtype.size_in_bytes() / 2;
        let blocks = cache_blocks(
            opts.kv_cache_mb,
            bytes_per_token,
            opts.block_size,
            cfg.context,
        );
        let row = cfg.kv_heads * cfg.head_dim;
        let slots = blocks * opts.block_size;
        let mut k_cache = Vec::with_capacity(cfg.layers);
        let mut v_cache = Vec::with_capacity(cfg.layers);
        for _ in 0..cfg.layers {
            k_cache.push(Tensor::zeros((slots, row), dtype, device)?);
            v_cache.push(Tensor::zeros((slots, row), dtype, device)?);
        }
        Ok(Self {
            cfg,
            device: device.clone(),
            dtype,
            embd,
            layers,
            out_norm,
            lm_head,
            cos,
            sin,
            k_cache,
            v_cache,
            block_size: opts.block_size,
            blocks,
            weights: if quantized { "quantized" } else { "dense" },
            adapters,
        })
    }

    fn forward_impl(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.heads, cfg.kv_heads);
        let bs = self.block_size;
        let dev = &self.device;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        for seq in seqs {
            let end = seq.start + seq.tokens.len();
            if end > cfg.context || seq.blocks.len() * bs < end {
                bail!("a sequence does not fit its context or cache blocks");
            }
            tokens.extend_from_slice(seq.tokens);
            for p in seq.start..end {
                positions.push(p as u32);
                slots.push(slot(seq, p, bs));
            }
        }
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let row = nkv * hd;
        let ids = Tensor::new(tokens.as_slice(), dev)?;
        let pos = Tensor::new(positions.as_slice(), dev)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let scatter_idx: Vec<u32> = slots
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, row))
            .collect();
        let scatter_idx = Tensor::from_vec(scatter_idx, (t, row), dev)?;
        // Attention groups: runs of decoding sequences batched, each prompt chunk alone.
        let groups = attention_groups(seqs, bs);
        let group_tensors: Vec<GroupTensors> = groups
            .iter()
            .map(|g| g.tensors(dev))
            .collect::<anyhow::Result<_>>()?;
        // The rows of each adapter, in id order.
        let mut by_adapter: std::collections::BTreeMap<AdapterId, Vec<u32>> = Default::default();
        let mut row = 0u32;
        for seq in seqs {
            let n = seq.tokens.len() as u32;
            if seq.adapter != BASE {
                if !self.adapters.contains_key(&seq.adapter) {
                    bail!("adapter #{} is not installed", seq.adapter);
                }
                by_adapter
                    .entry(seq.adapter)
                    .or_default()
                    .extend(row..row + n);
            }
            row += n;
        }
        let adapter_rows: Vec<AdapterRows> = by_adapter
            .into_iter()
            .map(|(id, rows)| {
                Ok(AdapterRows {
                    id,
                    rows: Tensor::new(rows.as_slice(), dev)?,
                })
            })
            .collect::<candle_core::Result<_>>()?;
        let project = |l: usize, p: &Projection, x: &Tensor| -> candle_core::Result<Tensor> {
            self.project(l, p, x, &adapter_rows)
        };
        let mut x = self.embd.index_select(&ids, 0)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.eps)?;
            let mut q = project(l, &layer.wq, &h)?;
            let mut k = project(l, &layer.wk, &h)?;
            let mut v = project(l, &layer.wv, &h)?;
            if let Some((bq, bk, bv)) = &layer.bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let rope = |x: &Tensor, heads: usize| -> candle_core::Result<Tensor> {
                let x = x
                    .reshape((1, t, heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()?;
                let x = if cfg.neox {
                    candle_nn::rotary_emb::rope(&x, &cos, &sin)?
                } else {
                    candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
                };
                x.transpose(1, 2)?.reshape((t, heads * hd))
            };
            let q = (rope(&q, nh)? * scale)?;
            let k = rope(&k, nkv)?.contiguous()?;
            self.k_cache[l].scatter_set(&scatter_idx, &k, 0)?;
            self.v_cache[l].scatter_set(&scatter_idx, &v.contiguous()?, 0)?;
            let mut outs = Vec::with_capacity(groups.len());
            for (g, gt) in groups.iter().zip(&group_tensors) {
                outs.push(self.attend(&q, l, g, gt)?);
            }
            let att = Tensor::cat(&outs, 0)?;
            x = (x + project(l, &layer.wo, &att)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.eps)?;
            let gate = candle_nn::ops::silu(&project(l, &layer.w_gate, &h)?)?;
            let up = project(l, &layer.w_up, &h)?;
            x = (x + project(l, &layer.w_down, &(gate * up)?)?)?;
        }
        let mut last = Vec::new();
        let mut offset = 0u32;
        for seq in seqs {
            offset += seq.tokens.len() as u32;
            if seq.logits && !seq.tokens.is_empty() {
                last.push(offset - 1);
            }
        }
        if last.is_empty() {
            return Ok(Vec::new());
        }
        let idx = Tensor::new(last.as_slice(), dev)?;
        let xl = x.index_select(&idx, 0)?;
        let xl = candle_nn::ops::rms_norm(&xl, &self.out_norm, cfg.eps)?;
        let logits = self.lm_head.forward(&xl)?.to_dtype(DType::F32)?;
        Ok(logits.to_vec2::<f32>()?)
    }

    /// `x·Wᵀ` of projection `p` of layer `l`, plus, for the rows of each adapter, their
    /// low-rank update `(x·Aᵀ)·(scale·B)ᵀ` in f32 (gathered, computed, scattered back).
    fn project(
        &self,
        l: usize,
        p: &Projection,
        x: &Tensor,
        adapters: &[AdapterRows],
    ) -> candle_core::Result<Tensor> {
        let y = p.w.forward(x)?;
        let pairs: Vec<(&AdapterRows, &Pair)> = adapters
            .iter()
            .filter_map(|a| {
                let pair = self.adapters.get(&a.id)?[l][p.index].as_ref()?;
                Some((a, pair))
            })
            .collect();
        if pairs.is_empty() {
            return Ok(y);
        }
        let mut y32 = y.to_dtype(DType::F32)?;
        let x32 = x.to_dtype(DType::F32)?;
        for (a, (at, bt)) in pairs {
            let update = x32.index_select(&a.rows, 0)?.matmul(at)?.matmul(bt)?;
            y32 = y32.index_add(&a.rows, &update, 0)?;
        }
        y32.to_dtype(y.dtype())
    }

    /// Attention of one group's query rows over their sequences' cached keys and values.
    fn attend(
        &self,
        q: &Tensor,
        layer: usize,
        g: &Group,
        gt: &GroupTensors,
    ) -> anyhow::Result<Tensor> {
        let (hd, nh, nkv) = (self.cfg.head_dim, self.cfg.heads, self.cfg.kv_heads);
        let nrep = nh / nkv;
        let (b, tq, len) = (g.batch, g.queries, g.keys);
        let q = q
            .narrow(0, g.row, b * tq)?
            .reshape((b, tq, nkv, nrep, hd))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((b, nkv, nrep * tq, hd))?
            .contiguous()?;
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(&gt.slots, 0)?
                .reshape((b, len, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = gather(&self.k_cache[layer])?;
        let v = gather(&self.v_cache[layer])?;
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = scores
            .reshape((b, nkv, nrep, tq, len))?
            .broadcast_add(&gt.mask)?
            .reshape((b, nkv, nrep * tq, len))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(self.dtype)?;
        let out = probs.matmul(&v)?; // (b, nkv, nrep·tq, hd)
        Ok(out
            .reshape((b, nkv, nrep, tq, hd))?
            .permute((0, 3, 1, 2, 4))?
            .reshape((b * tq, nh * hd))?)
    }
}

/// Query rows attended together: `batch` sequences of `queries` rows each, over `keys`
/// positions (padded), starting at packed row `row`.
struct Group {
    row: usize,
    batch: usize,
    queries: usize,
    keys: usize,
    /// Cache slot of every (sequence, key position), padding pointing at slot 0.
    slots: Vec<u32>,
    /// 0 or -inf per (sequence, query, key).
    mask: Vec<f32>,
}

struct GroupTensors {
    slots: Tensor,
    mask: Tensor,
}

impl Group {
    fn tensors(&self, dev: &Device) -> anyhow::Result<GroupTensors> {
        Ok(GroupTensors {
            slots: Tensor::new(self.slots.as_slice(), dev)?,
            mask: Tensor::from_vec(
                self.mask.clone(),
                (self.batch, 1, 1, self.queries, self.keys),
                dev,
            )?,
        })
    }
}

/// Cache slot (row of the per-layer key/value tensors) of position `p` of a sequence.
fn slot(seq: &SeqStep<'_>, p: usize, bs: usize) -> u32 {
    (seq.blocks[p / bs] as usize * bs + p % bs) as u32
}

fn attention_groups(seqs: &[SeqStep<'_>], bs: usize) -> Vec<Group> {
    let mut groups = Vec::new();
    let mut row = 0;
    let mut i = 0;
    while i < seqs.len() {
        let single = seqs[i].tokens.len() == 1;
        let j = if single {
            let mut j = i;
            while j < seqs.len() && seqs[j].tokens.len() == 1 {
                j += 1;
            }
            j
        } else {
            i + 1
        };
        let members = &seqs[i..j];
        let queries = members[0].tokens.len();
        let keys = members
            .iter()
            .map(|s| s.start + s.tokens.len())
            .max()
            .unwrap_or(0);
        let mut slots = Vec::with_capacity(members.len() * keys);
        let mut mask = Vec::with_capacity(members.len() * queries * keys);
        for s in members {
            let end = s.start + s.tokens.len();
            slots.extend((0..keys).map(|p| if p < end { slot(s, p, bs) } else { 0 }));
            for qi in 0..queries {
                let qpos = s.start + qi;
                mask.extend((0..keys).map(|p| if p <= qpos { 0.0 } else { f32::NEG_INFINITY }));
            }
        }
        groups.push(Group {
            row,
            batch: members.len(),
            queries,
            keys,
            slots,
            mask,
        });
        row += members.len() * queries;
        i = j;
    }
    groups
}

impl Backend for CandleModel {
    fn forward(&mut self, seqs: &[SeqStep<'_>]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.forward_impl(seqs)
    }

    fn adapter_shape(&self) -> Option<AdapterShape> {
        Some(self.cfg.adapter_shape())
    }

    fn install_adapter(&mut self, id: AdapterId, adapter: &Adapter) -> anyhow::Result<()> {
        anyhow::ensure!(id != BASE, "adapter id {BASE} is the base model's");
        let on_device = device_adapter(adapter, self.cfg.layers, &self.device)?;
        self.adapters.insert(id, on_device);
        Ok(())
    }

    fn remove_adapter(&mut self, id: AdapterId) {
        self.adapters.remove(&id);
    }

    fn copy_blocks(&mut self, pairs: &[(u32, u32)]) -> anyhow::Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        let (bs, blocks) = (self.block_size as u32, self.blocks as u32);
        anyhow::ensure!(
            pairs.iter().all(|&(s, d)| s < blocks && d < blocks),
            "a cache block is out of range"
        );
        let slots = |pick: fn(&(u32, u32)) -> u32| -> Vec<u32> {
            pairs
                .iter()
                .flat_map(|p| pick(p) * bs..(pick(p) + 1) * bs)
                .collect()
        };
        let dev = self.k_cache[0].device().clone();
        let src = Tensor::new(slots(|p| p.0).as_slice(), &dev)?;
        let row = self.k_cache[0].dim(1)?;
        let dst: Vec<u32> = slots(|p| p.1)
            .into_iter()
            .flat_map(|s| std::iter::repeat_n(s, row))
            .collect();
        let n = dst.len() / row;
        let dst = Tensor::from_vec(dst, (n, row), &dev)?;
        for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            let rows = cache.index_select(&src, 0)?;
            cache.scatter_set(&dst, &rows, 0)?;
        }
        Ok(())
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn cache_blocks(&self) -> usize {
        self.blocks
    }

    fn context(&self) -> usize {
        self.cfg.context
    }

    fn describe(&self) -> String {
        format!(
            "candle on {:?}, {} {:?} weights, {:?} kv cache ({} blocks of {})",
            self.device, self.weights, self.dtype, self.dtype, self.blocks, self.block_size
        )
    }
}
