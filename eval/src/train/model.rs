//! The training forward pass: the generator's llama/qwen2 decoder in candle, written from
//! differentiable primitives (candle-nn's fused `rms_norm`, `softmax_last_dim` and `rope` have
//! no backward pass), with frozen base weights (the GGUF's blocks dequantized to f32) and LoRA
//! pairs as the only variables. Same conventions as the serving engine
//! (`ghostwriter_generator::native`): RoPE tables, head grouping, tied output embedding; a test
//! checks that both give the same logits.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, D, DType, Device, Layout, Shape, Tensor, Var,
};
use ghostwriter_generator::adapter::{Adapter, LoraPair, PROJECTIONS};
use ghostwriter_generator::gguf;
use ghostwriter_generator::native::Config;

struct Linear {
    /// `out × in`, frozen.
    w: Tensor,
    b: Option<Tensor>,
}

/// `x · wᵀ` for a frozen `w` (`out × in`), whose backward pass computes only the gradient of
/// `x`. candle's matmul backward also computes a gradient for the other operand, tracked or not:
/// for frozen base weights that is a third of a training step's arithmetic, and a weight-sized
/// tensor per projection held until the step's gradients are dropped (for a 1.5B model, the
/// size of the model again).
fn frozen_matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    // A fresh, contiguous result: the op's forward pass clones its whole storage.
    let y = x.detach().matmul(&w.t()?)?;
    y.apply_op2(x, GradOfInput { w: w.clone() })
}

/// Attaches `y = x · wᵀ` (computed without a graph) to `x`: the forward pass returns `y`, the
/// backward pass `grad · w` for `x` and nothing for `y`.
struct GradOfInput {
    w: Tensor,
}

impl CustomOp2 for GradOfInput {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        layout: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((y.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((None, Some(grad.matmul(&self.w)?)))
    }
}

struct Layer {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    proj: BTreeMap<&'static str, Linear>,
}

/// A LoRA pair under training.
pub struct Lora {
    /// `rank × in`.
    pub a: Var,
    /// `out × rank`.
    pub b: Var,
}

/// The decoder with its trainable adapter.
pub struct TrainModel {
    /// Hyper-parameters.
    pub cfg: Config,
    embedding: Tensor,
    layers: Vec<Layer>,
    out_norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// `(layer, projection)` → pair.
    pub lora: BTreeMap<(usize, &'static str), Lora>,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA scale numerator.
    pub alpha: f32,
    device: Device,
}

impl TrainModel {
    /// Loads a GGUF model (weights dequantized to f32) with fresh LoRA pairs of `rank` on
    /// `targets` (GGUF projection names): A random (±1/√in uniform), B zero, so training starts
    /// from the base model.
    pub fn load(
        path: &Path,
        device: &Device,
        rank: usize,
        alpha: f32,
        targets: &[&str],
        seed: u64,
    ) -> anyhow::Result<Self> {
        let (content, mut reader) = gguf::read_content(path)?;
        let cfg = Config::from_gguf(&content, 4096)?;
        let mut tensor = |name: &str| -> anyhow::Result<Tensor> {
            Ok(content
                .tensor(&mut reader, name, device)
                .with_context(|| format!("reading {name}"))?
                .dequantize(device)?)
        };
        let embedding = tensor("token_embd.weight")?;
        let lm_head = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => embedding.clone(),
        };
        let out_norm = tensor("output_norm.weight")?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let p = format!("blk.{l}");
            let mut proj = BTreeMap::new();
            for name in PROJECTIONS {
                let b = if cfg.architecture == "qwen2"
                    && name.starts_with("attn_")
                    && name != "attn_output"
                {
                    Some(tensor(&format!("{p}.{name}.bias"))?)
                } else {
                    None
                };
                proj.insert(
                    name,
                    Linear {
                        w: tensor(&format!("{p}.{name}.weight"))?,
                        b,
                    },
                );
            }
            layers.push(Layer {
                attn_norm: tensor(&format!("{p}.attn_norm.weight"))?,
                ffn_norm: tensor(&format!("{p}.ffn_norm.weight"))?,
                proj,
            });
        }
        let (cos, sin) = cfg.rope_tables();
        let half = cfg.head_dim / 2;
        let cos = Tensor::from_vec(cos, (cfg.context, half), device)?;
        let sin = Tensor::from_vec(sin, (cfg.context, half), device)?;
        let mut rng = crate::Rng::new(seed);
        let mut lora = BTreeMap::new();
        for l in 0..cfg.layers {
            for &name in targets {
                let name = PROJECTIONS
                    .iter()
                    .copied()
                    .find(|p| *p == name)
                    .with_context(|| {
                        format!("unknown projection {name} (one of {PROJECTIONS:?})")
                    })?;
                let (inputs, outputs) = cfg.projection_widths(name).context("projection")?;
                let bound = 1.0 / (inputs as f32).sqrt();
                let a: Vec<f32> = (0..rank * inputs)
                    .map(|_| (rng.unit() as f32 * 2.0 - 1.0) * bound)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (rank, inputs), device)?)?;
                let b = Var::zeros((outputs, rank), DType::F32, device)?;
                lora.insert((l, name), Lora { a, b });
            }
        }
        Ok(Self {
            cfg,
            embedding,
            layers,
            out_norm,
            lm_head,
            cos,
            sin,
            lora,
            rank,
            alpha,
            device: device.clone(),
        })
    }

    /// The trainable variables, in a stable order (by layer and projection, A then B).
    pub fn vars(&self) -> Vec<&Var> {
        self.lora
            .values()
            .flat_map(|pair| [&pair.a, &pair.b])
            .collect()
    }

    /// Sets the pairs from a saved adapter (for `--resume`, and tests).
    pub fn set_adapter(&mut self, adapter: &Adapter) -> anyhow::Result<()> {
        for ((l, p), pair) in &self.lora {
            let saved = adapter
                .pair(*l, p)
                .with_context(|| format!("the adapter has no {p} in layer {l}"))?;
            pair.a.set(&Tensor::from_vec(
                saved.a.clone(),
                pair.a.shape(),
                &self.device,
            )?)?;
            pair.b.set(&Tensor::from_vec(
                saved.b.clone(),
                pair.b.shape(),
                &self.device,
            )?)?;
        }
        Ok(())
    }

    /// The pairs as a servable adapter.
    pub fn adapter(&self, metadata: BTreeMap<String, String>) -> anyhow::Result<Adapter> {
        let mut pairs = BTreeMap::new();
        for ((l, p), pair) in &self.lora {
            let (inputs, outputs) = self.cfg.projection_widths(p).context("projection")?;
            pairs.insert(
                (*l, p.to_string()),
                LoraPair {
                    inputs,
                    outputs,
                    a: pair.a.as_tensor().flatten_all()?.to_vec1()?,
                    b: pair.b.as_tensor().flatten_all()?.to_vec1()?,
                },
            );
        }
        Ok(Adapter {
            rank: self.rank,
            alpha: self.alpha,
            pairs,
            metadata,
        })
    }

    fn linear(&self, layer: usize, name: &'static str, x: &Tensor) -> candle_core::Result<Tensor> {
        let lin = &self.layers[layer].proj[name];
        let mut y = frozen_matmul(x, &lin.w)?;
        if let Some(b) = &lin.b {
            y = y.broadcast_add(b)?;
        }
        if let Some(pair) = self.lora.get(&(layer, name)) {
            let scale = (self.alpha / self.rank as f32) as f64;
            let u = x.matmul(&pair.a.as_tensor().t()?)?;
            y = (y + (u.matmul(&pair.b.as_tensor().t()?)? * scale)?)?;
        }
        Ok(y)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let r = (ms + self.cfg.eps as f64)?.sqrt()?.recip()?;
        x.broadcast_mul(&r)?.broadcast_mul(w)
    }

    /// RoPE on `x` (`batch × heads × t × head_dim`) for positions `0..t` of every sequence.
    fn rope(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, h, t, hd) = x.dims4()?;
        let half = hd / 2;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        if self.cfg.neox {
            let x0 = x.narrow(3, 0, half)?;
            let x1 = x.narrow(3, half, half)?;
            let a = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let c = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Tensor::cat(&[a, c], 3)
        } else {
            let x = x.reshape((b, h, t, half, 2))?;
            let x0 = x.narrow(4, 0, 1)?.squeeze(4)?;
            let x1 = x.narrow(4, 1, 1)?.squeeze(4)?;
            let a = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let c = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Tensor::stack(&[a, c], 4)?.reshape((b, h, t, hd))
        }
    }

    /// Hidden states after the final norm for `ids` (one sequence from position 0): `t × hidden`.
    pub fn hidden(&self, ids: &[u32]) -> candle_core::Result<Tensor> {
        self.hidden_batch(&[ids])
    }

    /// Hidden states after the final norm for several sequences in one pass, each from position
    /// 0: `(batch · t) × hidden`, where `t` is the longest sequence's length and row `i · t + p`
    /// is position `p` of sequence `i`. Shorter sequences are padded at the end; under the causal
    /// mask no real position attends to a padded one, so each sequence's rows are those it gets
    /// alone (the padded rows are never read).
    pub fn hidden_batch(&self, seqs: &[&[u32]]) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let padded: Vec<u32> = seqs
            .iter()
            .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())))
            .collect();
        let ids_t = Tensor::new(padded.as_slice(), &self.device)?;
        let mut x = self.embedding.index_select(&ids_t, 0)?; // (b·t) × hidden
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &self.device)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &layer.attn_norm)?;
            let q = self.linear(l, "attn_q", &h)?;
            let k = self.linear(l, "attn_k", &h)?;
            let v = self.linear(l, "attn_v", &h)?;
            let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
                y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = (self.rope(&heads(q, nh)?)? * scale)?;
            let k = self.rope(&heads(k, nkv)?)?;
            let v = heads(v, nkv)?;
            // Each key/value head serves nh/nkv consecutive query heads.
            let rep = |y: Tensor| -> candle_core::Result<Tensor> {
                y.unsqueeze(2)?
                    .broadcast_as((b, nkv, nh / nkv, t, hd))?
                    .reshape((b, nh, t, hd))
            };
            let (k, v) = (rep(k)?, rep(v)?);
            let scores = q.matmul(&k.t()?)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let att = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b * t, nh * hd))?;
            x = (x + self.linear(l, "attn_output", &att)?)?;
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let g = self.linear(l, "ffn_gate", &h)?;
            let u = self.linear(l, "ffn_up", &h)?;
            let silu = (&g / (g.neg()?.exp()? + 1.0)?)?;
            x = (x + self.linear(l, "ffn_down", &(silu * u)?)?)?;
        }
        self.rms_norm(&x, &self.out_norm)
    }

    /// Logits of the rows `rows` of the hidden states.
    pub fn logits(&self, hidden: &Tensor, rows: &[u32]) -> candle_core::Result<Tensor> {
        let idx = Tensor::new(rows, &self.device)?;
        frozen_matmul(&hidden.index_select(&idx, 0)?, &self.lm_head)
    }

    /// Mean cross-entropy of predicting `ids[prompt..]`, each from the tokens before it.
    pub fn loss(&self, ids: &[u32], prompt: usize) -> candle_core::Result<Tensor> {
        self.weighted_loss(&[Scored {
            ids,
            prompt,
            weight: 1.0,
        }])
    }

    /// `Σ weight · (mean cross-entropy of predicting ids[prompt..])` over sequences run as one
    /// padded batch ([`TrainModel::hidden_batch`]): the same value, and the same gradients, as
    /// the sum of each sequence's own weighted [`TrainModel::loss`].
    pub fn weighted_loss(&self, seqs: &[Scored]) -> candle_core::Result<Tensor> {
        let ids: Vec<&[u32]> = seqs.iter().map(|s| s.ids).collect();
        let hidden = self.hidden_batch(&ids)?;
        let t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        let (mut rows, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in seqs.iter().enumerate() {
            let first = s.prompt.max(1);
            let n = s.ids.len().saturating_sub(first);
            for r in first..s.ids.len() {
                rows.push((i * t + r - 1) as u32);
                targets.push(s.ids[r]);
                weights.push((s.weight / n as f64) as f32);
            }
        }
        let logits = self.logits(&hidden, &rows)?;
        let targets = Tensor::new(targets.as_slice(), &self.device)?.unsqueeze(1)?;
        let weights = Tensor::new(weights.as_slice(), &self.device)?;
        let nll = candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .gather(&targets, 1)?
            .squeeze(1)?
            .neg()?;
        (nll * weights)?.sum_all()
    }
}

/// A sequence scored by [`TrainModel::weighted_loss`]: tokens from `prompt` on are predicted.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    /// Token ids, prompt then answer.
    pub ids: &'a [u32],
    /// Prompt length: the first predicted token is `ids[prompt]`.
    pub prompt: usize,
    /// Weight of this sequence's mean token loss.
    pub weight: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_matmul_gives_matmuls_values_and_input_gradient_but_no_weight_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        )
        .unwrap();
        let w = (Tensor::arange(0f32, 20., &dev)
            .unwrap()
            .reshape((5, 4))
            .unwrap()
            * 0.1)
            .unwrap();
        // A loss that weighs each output differently, so the input gradient is not uniform.
        let weights = Tensor::arange(1f32, 16., &dev)
            .unwrap()
            .reshape((3, 5))
            .unwrap();
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();

        let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let frozen = frozen_matmul(x.as_tensor(), &w).unwrap();
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&plain), values(&frozen));

        let plain_grads = loss(&plain).backward().unwrap();
        let frozen_grads = loss(&frozen).backward().unwrap();
        let gx = |g: &candle_core::backprop::GradStore| values(g.get(x.as_tensor()).unwrap());
        assert_eq!(gx(&plain_grads), gx(&frozen_grads));
        // candle's matmul also computes and stores a gradient for its weight operand (under the
        // id of the transposed view), 5 × 4 more elements; the frozen op stores none.
        let elements = |g: &candle_core::backprop::GradStore| -> usize {
            g.get_ids()
                .map(|id| g.get_id(*id).unwrap().elem_count())
                .sum()
        };
        assert_eq!(elements(&plain_grads), elements(&frozen_grads) + 5 * 4);
    }
}
