//! The language model: a GGUF file run by candle's quantized llama or qwen2 implementation,
//! chosen by the file's `general.architecture`.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2};
use tokenizers::Tokenizer;

use crate::gguf;

enum Weights {
    Llama(quantized_llama::ModelWeights),
    Qwen2(quantized_qwen2::ModelWeights),
}

/// A loaded model with its tokenizer.
pub struct LanguageModel {
    weights: Weights,
    /// The tokenizer rebuilt from the GGUF metadata.
    pub tokenizer: Tokenizer,
    /// Token ids that end a turn (`<|im_end|>`, `<|endoftext|>`, the EOS id).
    pub stop_ids: Vec<u32>,
    /// Context window in tokens.
    pub context_length: usize,
    /// Architecture name.
    pub architecture: String,
    /// Human-readable model id.
    pub name: String,
    device: Device,
}

impl LanguageModel {
    /// Loads a GGUF model onto `device`. `max_context` caps the context window.
    pub fn load(path: &Path, device: &Device, max_context: usize) -> anyhow::Result<Self> {
        let (content, mut reader) = gguf::read_content(path)?;
        let md = &content.metadata;
        let architecture = gguf::meta_string(md, "general.architecture").unwrap_or_default();
        let name = gguf::meta_string(md, "general.name").unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let context_length = gguf::meta_u32(md, &format!("{architecture}.context_length"))
            .map_or(max_context, |c| (c as usize).min(max_context));
        let tokenizer = gguf::tokenizer(md)?;
        let mut stop_ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_to_id(t))
            .collect();
        if let Some(eos) = gguf::meta_u32(md, "tokenizer.ggml.eos_token_id") {
            stop_ids.push(eos);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let weights = match architecture.as_str() {
            "llama" => Weights::Llama(quantized_llama::ModelWeights::from_gguf(
                content,
                &mut reader,
                device,
            )?),
            "qwen2" => Weights::Qwen2(quantized_qwen2::ModelWeights::from_gguf(
                content,
                &mut reader,
                device,
            )?),
            other => bail!("unsupported model architecture {other:?} (supported: llama, qwen2)"),
        };
        Ok(Self {
            weights,
            tokenizer,
            stop_ids,
            context_length,
            architecture,
            name,
            device: device.clone(),
        })
    }

    /// Token ids of `text` (special tokens such as `<|im_start|>` recognized).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.tokenizer.decode(ids, true).map_err(anyhow::Error::msg)
    }

    /// Logits of the last position after feeding `ids` at position `pos` (position 0 starts a
    /// new sequence and discards the KV cache).
    pub fn forward(&mut self, ids: &[u32], pos: usize) -> anyhow::Result<Tensor> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let logits = match &mut self.weights {
            Weights::Llama(m) => m.forward(&input, pos),
            Weights::Qwen2(m) => m.forward(&input, pos),
        }
        .context("model forward")?;
        Ok(logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?)
    }
}
