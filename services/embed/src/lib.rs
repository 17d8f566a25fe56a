//! all-MiniLM-L6-v2 sentence embeddings in candle: BERT, mean pooling over the attention mask,
//! L2 normalization (as sentence-transformers does for this model), and the compute devices
//! models run on ([`device`]).
//!
//! The crate that carries candle and tokenizers for the stages that embed (ranker, summarizer,
//! synthesizer) and the generator's device setting; stages without a model (the retriever)
//! stay clear of it. Its `cuda` feature turns on candle's CUDA backend.

pub mod device;

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Longest input in tokens (the model was trained with 256).
const MAX_TOKENS: usize = 256;
/// Texts embedded in one forward pass.
const BATCH: usize = 16;

/// The embedding model's directory, relative to the model directory
/// (`config.json`, `tokenizer.json`, `model.safetensors`).
pub const EMBEDDER_DIR: &str = "all-minilm-l6-v2";

/// A loaded sentence embedder.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl Embedder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let config: Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(anyhow::Error::msg)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let weights = std::fs::read(dir.join("model.safetensors"))?;
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, device)?;
        let model = BertModel::load(vb, &config)?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
        })
    }

    /// Embedding dimension.
    pub const DIM: usize = 384;

    /// Unit-length embeddings of `texts`, in order.
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        // Batch texts of similar length together so padding stays small.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            for (&i, e) in chunk.iter().zip(self.embed_batch(&batch)?) {
                out[i] = e;
            }
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(anyhow::Error::msg)?;
        let ids: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_ids(), &self.device))
            .collect::<Result<_, _>>()?;
        let masks: Vec<Tensor> = encodings
            .iter()
            .map(|e| Tensor::new(e.get_attention_mask(), &self.device))
            .collect::<Result<_, _>>()?;
        let ids = Tensor::stack(&ids, 0)?;
        let mask = Tensor::stack(&masks, 0)?;
        let token_types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?; // (b, t, h)
        let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, t, 1)
        let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?; // (b, h)
        let counts = mask_f.sum(1)?.clamp(1e-9, f64::MAX)?; // (b, 1)
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }
}

/// Embeddings by text hash, evicted first in, first out.
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
pub struct EmbedderArgs {
    /// Directory of the embedding model (config.json, tokenizer.json, model.safetensors).
    /// Default: all-minilm-l6-v2 under the model directory.
    #[arg(long = "embedder-dir", env = "GHOSTWRITER_EMBEDDER_DIR")]
    pub embedder_dir: Option<std::path::PathBuf>,
    /// Device of the embedding model: cpu, cuda or cuda:N.
    #[arg(
        long = "embedder-device",
        env = "GHOSTWRITER_EMBEDDER_DEVICE",
        default_value = "cpu"
    )]
    pub embedder_device: String,
    /// Embeddings kept in memory (1.5 KB each), so repeated texts are embedded once.
    #[arg(
        long = "embedding-cache",
        env = "GHOSTWRITER_EMBEDDING_CACHE",
        default_value_t = 20_000
    )]
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
        let embedder = Embedder::load(&dir, &device).map_err(|e| {
            anyhow::anyhow!("loading the embedding model from {}: {e}", dir.display())
        })?;
        Ok(CachedEmbedder::new(embedder, self.cache_entries))
    }
}

/// An embedder that a stage loads in the background after it starts serving health checks.
#[derive(Clone, Default)]
pub struct LazyEmbedder(Arc<tokio::sync::OnceCell<Arc<CachedEmbedder>>>);

impl LazyEmbedder {
    /// The embedder, or UNAVAILABLE naming `stage` while it is still loading.
    pub fn ready(&self, stage: &str) -> Result<Arc<CachedEmbedder>, tonic::Status> {
        self.0.get().cloned().ok_or_else(|| {
            tonic::Status::unavailable(format!("the {stage} is still loading its embedding model"))
        })
    }

    /// Loads the embedder `args` name (on a blocking thread) and makes it ready.
    pub async fn load(
        self,
        args: EmbedderArgs,
        model_dir: std::path::PathBuf,
    ) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || args.load(&model_dir)).await??;
        let _ = self.0.set(Arc::new(loaded));
        tracing::info!(
            millis = started.elapsed().as_millis() as u64,
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
