//! all-MiniLM-L6-v2 sentence embeddings: BERT, mean pooling over the tokens, L2 normalization
//! (as sentence-transformers does for this model), and the compute devices models run on
//! ([`device`]).
//!
//! Two forward passes: on CPU by default the native int8 one ([`native`], the generator's
//! kernels), about 3 times faster than candle's f32 BERT here, with embeddings of cosine > 0.999 to
//! it; candle's f32 BERT on CUDA, or on CPU when asked (`--embedder-precision f32`).
//!
//! The crate that carries candle and tokenizers for the stages that embed (ranker, summarizer,
//! synthesizer) and the generator's device setting; stages without a model (the retriever)
//! stay clear of it. Its `cuda` feature turns on candle's CUDA backend.

pub mod device;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod native;

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

/// Longest input in tokens (the model was trained with 256).
const MAX_TOKENS: usize = 256;
/// Texts embedded in one forward pass of the f32 model (padded to the longest).
const BATCH: usize = 16;
/// Tokens packed into one forward pass of the int8 model (its buffers grow with them).
const BATCH_TOKENS: usize = 4_096;

/// The embedding model's directory, relative to the model directory
/// (`config.json`, `tokenizer.json`, `model.safetensors`).
pub const EMBEDDER_DIR: &str = "all-minilm-l6-v2";

/// Which forward pass embeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// int8 on CPU, f32 on CUDA.
    Auto,
    /// Native int8 kernels (CPU only): weights in Q8_0, activations per 32-wide block.
    Int8,
    /// candle's f32 BERT (CPU or CUDA).
    F32,
}

enum Model {
    Int8(native::NativeBert),
    F32 { model: BertModel, device: Device },
}

/// A loaded sentence embedder.
pub struct Embedder {
    model: Model,
    tokenizer: Tokenizer,
}

impl Embedder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir` for `device`,
    /// int8 on CPU and f32 on CUDA.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        Self::load_with(dir, device, Precision::Auto, 0)
    }

    /// Loads the model from `dir` with the forward pass `precision` names; the int8 one on
    /// `threads` compute threads (0 = every core).
    pub fn load_with(
        dir: &Path,
        device: &Device,
        precision: Precision,
        threads: usize,
    ) -> anyhow::Result<Self> {
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(anyhow::Error::msg)?;
        tokenizer.with_padding(None);
        let int8 = match (precision, device) {
            (Precision::Int8, Device::Cpu) | (Precision::Auto, Device::Cpu) => true,
            (Precision::Int8, _) => {
                anyhow::bail!("int8 embeddings run on the CPU only; use f32 on {device:?}")
            }
            _ => false,
        };
        let model = if int8 {
            Model::Int8(native::NativeBert::load(dir, threads)?)
        } else {
            let config: Config =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
            let weights = std::fs::read(dir.join("model.safetensors"))?;
            let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)?;
            Model::F32 {
                model: BertModel::load(vb, &config)?,
                device: device.clone(),
            }
        };
        Ok(Self { model, tokenizer })
    }

    /// Embedding dimension.
    pub const DIM: usize = 384;

    /// The forward pass in use: `int8 (cpu)` or `f32 (DEVICE)`.
    pub fn describe(&self) -> String {
        match &self.model {
            Model::Int8(_) => format!(
                "int8 (cpu, {})",
                ghostwriter_kernels::kernels::kernel_name()
            ),
            Model::F32 { device, .. } => format!("f32 ({device:?})"),
        }
    }

    /// Unit-length embeddings of `texts`, in order.
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(anyhow::Error::msg)?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        // Texts of similar length together, so the f32 model's padding stays small.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        let mut at = 0;
        while at < order.len() {
            // The next batch: up to BATCH texts (f32) or BATCH_TOKENS tokens (int8).
            let mut end = at + 1;
            let mut tokens = ids[order[at]].len();
            while end < order.len() {
                let next = ids[order[end]].len();
                let full = match self.model {
                    Model::Int8(_) => tokens + next > BATCH_TOKENS,
                    Model::F32 { .. } => end - at == BATCH,
                };
                if full {
                    break;
                }
                tokens += next;
                end += 1;
            }
            let batch: Vec<&[u32]> = order[at..end].iter().map(|&i| ids[i]).collect();
            let embedded = match &self.model {
                Model::Int8(bert) => bert.embed(&batch)?,
                Model::F32 { model, device } => embed_f32(model, device, &batch)?,
            };
            for (&i, e) in order[at..end].iter().zip(embedded) {
                out[i] = e;
            }
            at = end;
        }
        Ok(out)
    }
}

/// candle's f32 BERT over `batch`, padded to its longest text and masked.
fn embed_f32(
    model: &BertModel,
    device: &Device,
    batch: &[&[u32]],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let longest = batch.iter().map(|t| t.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(batch.len() * longest);
    let mut mask = Vec::with_capacity(batch.len() * longest);
    for t in batch {
        ids.extend_from_slice(t);
        ids.resize(ids.len() + longest - t.len(), 0);
        mask.extend(std::iter::repeat_n(1u32, t.len()));
        mask.resize(mask.len() + longest - t.len(), 0);
    }
    let ids = Tensor::from_vec(ids, (batch.len(), longest), device)?;
    let mask = Tensor::from_vec(mask, (batch.len(), longest), device)?;
    let token_types = ids.zeros_like()?;
    let hidden = model.forward(&ids, &token_types, Some(&mask))?; // (b, t, h)
    let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, t, 1)
    let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?; // (b, h)
    let counts = mask_f.sum(1)?.clamp(1e-9, f64::MAX)?; // (b, 1)
    let mean = summed.broadcast_div(&counts)?;
    let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
}

/// Embeddings by text hash, evicted first in, first out.
///
/// A deleted user's entries are not evicted when the user is deleted: the cache holds no text,
/// only a 64-bit hash of it and the vector, no API returns an entry, and an entry is found only
/// by presenting the very text again (whoever can do that already has it). They leave as the
/// cache turns over (first in, first out, `--embedding-cache` entries).
struct EmbeddingCache {
    capacity: usize,
    map: HashMap<u64, Arc<[f32]>>,
    order: VecDeque<u64>,
}

impl EmbeddingCache {
    fn key(text: &str) -> u64 {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        h.finish()
    }

    fn insert(&mut self, key: u64, value: Arc<[f32]>) {
        if self.capacity == 0 || self.map.contains_key(&key) {
            return;
        }
        while self.map.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(key, value);
        self.order.push_back(key);
    }
}

/// An embedder with a cache of text embeddings, so a user's history is embedded once.
pub struct CachedEmbedder {
    embedder: Embedder,
    cache: Mutex<EmbeddingCache>,
}

impl CachedEmbedder {
    /// Wraps a loaded embedder.
    pub fn new(embedder: Embedder, cache_entries: usize) -> Self {
        let cache = EmbeddingCache {
            capacity: cache_entries,
            map: HashMap::new(),
            order: VecDeque::new(),
        };
        Self {
            embedder,
            cache: Mutex::new(cache),
        }
    }

    /// The wrapped embedder.
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Cosine similarity of each text to the query; texts seen before are not re-embedded
    /// (the query is not cached).
    pub fn scores(&self, query: &str, texts: &[&str]) -> anyhow::Result<Vec<f32>> {
        let q = self
            .embedder
            .embed(&[query])?
            .into_iter()
            .next()
            .unwrap_or_default();
        Ok(self.embed(texts)?.iter().map(|e| cosine(&q, e)).collect())
    }

    /// Unit embeddings of `texts`, from the cache where possible.
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Arc<[f32]>>> {
        let keys: Vec<u64> = texts.iter().map(|t| EmbeddingCache::key(t)).collect();
        let mut known: Vec<Option<Arc<[f32]>>> = {
            let cache = self
                .cache
                .lock()
                .map_err(|_| anyhow::anyhow!("embedding cache poisoned"))?;
            keys.iter().map(|k| cache.map.get(k).cloned()).collect()
        };
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| known[i].is_none()).collect();
        let inputs: Vec<&str> = missing.iter().map(|&i| texts[i]).collect();
        let embedded = if inputs.is_empty() {
            Vec::new()
        } else {
            self.embedder.embed(&inputs)?
        };
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| anyhow::anyhow!("embedding cache poisoned"))?;
        for (&i, e) in missing.iter().zip(embedded) {
            let e: Arc<[f32]> = e.into();
            cache.insert(keys[i], e.clone());
            known[i] = Some(e);
        }
        Ok(known
            .into_iter()
            .map(|e| e.unwrap_or_else(|| Arc::from(Vec::new())))
            .collect())
    }
}

/// Dot product of two unit vectors: their cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Where the embedding model is and how it runs: shared by every stage that embeds.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Embeddings")]
pub struct EmbedderArgs {
    /// Directory of the embedding model (config.json, tokenizer.json, model.safetensors).
    /// Default: all-minilm-l6-v2 under the model directory.
    #[arg(long, env = "GHOSTWRITER_EMBEDDER_DIR")]
    pub embedder_dir: Option<std::path::PathBuf>,
    /// Device of the embedding model: cpu, cuda or cuda:N.
    #[arg(long, env = "GHOSTWRITER_EMBEDDER_DEVICE", default_value = "cpu")]
    pub embedder_device: String,
    /// Forward pass of the embedding model: auto (int8 on CPU, f32 on CUDA), int8 (native
    /// kernels, CPU only; cosine > 0.999 to f32, about 3× faster) or f32 (candle).
    #[arg(
        long,
        env = "GHOSTWRITER_EMBEDDER_PRECISION",
        value_enum,
        default_value_t = Precision::Auto
    )]
    pub embedder_precision: Precision,
    /// Compute threads of the int8 forward pass (0 = every core).
    #[arg(long, env = "GHOSTWRITER_EMBEDDER_THREADS", default_value_t = 0)]
    pub embedder_threads: usize,
    /// Embeddings kept in memory (1.5 KB each), so repeated texts are embedded once.
    #[arg(long = "embedding-cache", env = "GHOSTWRITER_EMBEDDING_CACHE", default_value_t = 20_000)]
    pub cache_entries: usize,
}

impl EmbedderArgs {
    /// Loads the embedder these settings name (blocking: call from a blocking task).
    pub fn load(&self, model_dir: &Path) -> anyhow::Result<CachedEmbedder> {
        let dir = self
            .embedder_dir
            .clone()
            .unwrap_or_else(|| model_dir.join(EMBEDDER_DIR));
        let device = crate::device::parse(&self.embedder_device)?;
        let embedder = Embedder::load_with(
            &dir,
            &device,
            self.embedder_precision,
            self.embedder_threads,
        )
        .map_err(|e| anyhow::anyhow!("loading the embedding model from {}: {e}", dir.display()))?;
        Ok(CachedEmbedder::new(embedder, self.cache_entries))
    }
}

/// Why an embedding a stage asked for is not there.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model is still loading (a stage answers UNAVAILABLE: retry elsewhere or later).
    #[error("the embedding model is still loading")]
    Loading,
    /// The forward pass failed (INTERNAL).
    #[error("embedding failed: {0}")]
    Failed(String),
}

/// Runs `work` on a blocking thread; a failure (or a panic) is [`EmbedError::Failed`].
async fn blocking<T, F>(work: F) -> Result<T, EmbedError>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| EmbedError::Failed(e.to_string()))?
        .map_err(|e| EmbedError::Failed(format!("{e:#}")))
}

/// An embedder that a stage loads in the background after it starts serving health checks.
#[derive(Clone, Default)]
pub struct LazyEmbedder(Arc<tokio::sync::OnceCell<Arc<CachedEmbedder>>>);

impl LazyEmbedder {
    /// The embedder, or [`EmbedError::Loading`] while it is still loading.
    pub fn ready(&self) -> Result<Arc<CachedEmbedder>, EmbedError> {
        self.0.get().cloned().ok_or(EmbedError::Loading)
    }

    /// Runs `work` with the embedder on a blocking thread (model inference never runs on the
    /// async runtime).
    pub async fn run<T, F>(&self, work: F) -> Result<T, EmbedError>
    where
        T: Send + 'static,
        F: FnOnce(&CachedEmbedder) -> anyhow::Result<T> + Send + 'static,
    {
        let embedder = self.ready()?;
        blocking(move || work(&embedder)).await
    }

    /// Like [`Self::run`], for work that needs the embedder only when `needed` (it gets None
    /// otherwise, loaded or not).
    pub async fn run_if<T, F>(&self, needed: bool, work: F) -> Result<T, EmbedError>
    where
        T: Send + 'static,
        F: FnOnce(Option<&CachedEmbedder>) -> anyhow::Result<T> + Send + 'static,
    {
        let embedder = needed.then(|| self.ready()).transpose()?;
        blocking(move || work(embedder.as_deref())).await
    }

    /// Loads the embedder `args` name (on a blocking thread) and makes it ready.
    pub async fn load(
        self,
        args: EmbedderArgs,
        model_dir: std::path::PathBuf,
    ) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || args.load(&model_dir)).await??;
        let forward = loaded.embedder().describe();
        let _ = self.0.set(Arc::new(loaded));
        tracing::info!(
            millis = started.elapsed().as_millis() as u64,
            forward,
            "embedding model loaded"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_first_in_first_out() {
        let mut cache = EmbeddingCache {
            capacity: 2,
            map: HashMap::new(),
            order: VecDeque::new(),
        };
        let e = |x: f32| -> Arc<[f32]> { Arc::from(vec![x]) };
        for (text, x) in [("a", 1.0), ("b", 2.0), ("a", 9.0), ("c", 3.0)] {
            cache.insert(EmbeddingCache::key(text), e(x));
        }
        assert!(!cache.map.contains_key(&EmbeddingCache::key("a")));
        assert_eq!(cache.map[&EmbeddingCache::key("b")][0], 2.0);
        assert_eq!(cache.map[&EmbeddingCache::key("c")][0], 3.0);
        let mut off = EmbeddingCache {
            capacity: 0,
            ..cache
        };
        off.insert(EmbeddingCache::key("d"), e(4.0));
        assert!(!off.map.contains_key(&EmbeddingCache::key("d")));
    }

    #[test]
    fn cosine_of_unit_vectors() {
        assert_eq!(cosine(&[1.0, 0.0], &[1.0, 0.0]), 1.0);
        assert_eq!(cosine(&[1.0, 0.0], &[0.0, 1.0]), 0.0);
    }
}
