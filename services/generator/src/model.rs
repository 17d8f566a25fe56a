//! The language model: a GGUF file's tokenizer and prompt rendering (the [`Prompter`], used on
//! the callers' threads) and its batched forward implementation (a [`Backend`], owned by the
//! engine thread): the native CPU engine, or candle on a CUDA device.

use std::path::Path;

use anyhow::Context;
use tokenizers::Tokenizer;

use crate::backend::Backend;
use crate::gguf;
use crate::prompt::{Piece, Prompt};

/// Turns prompts into token ids and token ids into text.
pub struct Prompter {
    special: Tokenizer,
    plain: Tokenizer,
    /// Token ids that end a turn (`<|im_end|>`, `<|endoftext|>`, the EOS id).
    pub stop_ids: Vec<u32>,
}

impl Prompter {
    /// Token ids of a prompt: template pieces with special tokens recognized, user pieces
    /// without.
    pub fn encode(&self, prompt: &Prompt) -> anyhow::Result<Vec<u32>> {
        Ok(self.encode_split(prompt)?.0)
    }

    /// Token ids of a prompt, and how many of them its leading template pieces make up: the
    /// part before the first caller-supplied text, which is the same for every caller.
    pub fn encode_split(&self, prompt: &Prompt) -> anyhow::Result<(Vec<u32>, usize)> {
        let mut ids = Vec::new();
        let mut template_prefix = None;
        for piece in &prompt.pieces {
            let (tok, text) = match piece {
                Piece::Template(t) => (&self.special, t),
                Piece::User(t) => (&self.plain, t),
            };
            if matches!(piece, Piece::User(_)) && template_prefix.is_none() {
                template_prefix = Some(ids.len());
            }
            if text.is_empty() {
                continue;
            }
            let enc = tok
                .encode(text.as_str(), false)
                .map_err(anyhow::Error::msg)?;
            ids.extend_from_slice(enc.get_ids());
        }
        let template_prefix = template_prefix.unwrap_or(ids.len());
        Ok((ids, template_prefix))
    }

    /// Tokens in the vocabulary (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.special.get_vocab_size(true)
    }

    /// The tokenizer and end-of-turn ids of a GGUF file (no weights are read).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let (content, _) = gguf::read_content(path)?;
        Self::from_metadata(&content.metadata)
    }

    fn from_metadata(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    ) -> anyhow::Result<Self> {
        let special = gguf::tokenizer(md)?;
        let plain = gguf::tokenizer_plain(md)?;
        let mut stop_ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| special.token_to_id(t))
            .collect();
        if let Some(eos) = gguf::meta_u32(md, "tokenizer.ggml.eos_token_id") {
            stop_ids.push(eos);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            special,
            plain,
            stop_ids,
        })
    }

    /// Token ids of caller text (special tokens are plain text).
    pub fn encode_plain(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .plain
            .encode(text, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .to_vec())
    }

    /// First token ids of the author-distinction answers `true` and `false`.
    pub fn answer_ids(&self) -> anyhow::Result<[u32; 2]> {
        let first = |w: &str| -> anyhow::Result<u32> {
            self.encode_plain(w)?
                .first()
                .copied()
                .ok_or_else(|| anyhow::anyhow!("{w:?} has no token"))
        };
        Ok([first("true")?, first("false")?])
    }

    /// The id of a special token such as `<|im_end|>`.
    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.special.token_to_id(token)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.special.decode(ids, true).map_err(anyhow::Error::msg)
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Largest context window used.
    pub max_context: usize,
    /// CPU compute threads of the native engine (0 = every core).
    pub threads: usize,
    /// Positions per cache block.
    pub block_size: usize,
    /// Memory for the key/value cache, in MiB.
    pub kv_cache_mb: usize,
    /// LoRA adapter to apply (see [`crate::adapter`]).
    pub adapter: Option<std::path::PathBuf>,
    /// sha256 of the model file, when the caller has computed it already: the adapter's check
    /// of its base model reuses it instead of reading the file again.
    pub model_sha256: Option<String>,
}

impl LoadOptions {
    /// On the CPU with every core, 16-position blocks, no adapter: a model for scoring or a
    /// test, with a window of `max_context` and `kv_cache_mb` of cache.
    pub fn cpu(max_context: usize, kv_cache_mb: usize) -> Self {
        Self {
            device: "cpu".into(),
            max_context,
            threads: 0,
            block_size: 16,
            kv_cache_mb,
            adapter: None,
            model_sha256: None,
        }
    }
}

/// A loaded model.
pub struct LanguageModel {
    /// Tokenizer and prompt rendering.
    pub prompter: Prompter,
    /// The batched forward implementation.
    pub backend: Box<dyn Backend>,
    /// Architecture name.
    pub architecture: String,
    /// The adapter applied: its file stem and the start of its sha256; empty for none.
    pub adapter: String,
    /// Human-readable model id without the adapter.
    pub base_name: String,
    /// The GGUF file.
    pub path: std::path::PathBuf,
    /// Its sha256, when the loader was given it.
    pub sha256: Option<String>,
}

impl LanguageModel {
    /// Loads a GGUF model.
    pub fn load(path: &Path, opts: &LoadOptions) -> anyhow::Result<Self> {
        let (content, _) = gguf::read_content(path)?;
        let md = &content.metadata;
        let architecture = gguf::meta_string(md, "general.architecture").unwrap_or_default();
        let base_name = gguf::meta_string(md, "general.name").unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let prompter = Prompter::from_metadata(md)?;
        let device = ghostwriter_embed::device::parse(&opts.device)?;
        let adapter = opts
            .adapter
            .as_deref()
            .map(crate::adapter::Adapter::describe)
            .unwrap_or_default();
        let backend: Box<dyn Backend> = if device.is_cpu() {
            Box::new(
                crate::native::NativeModel::load(path, opts)
                    .context("loading the native CPU model")?,
            )
        } else {
            Box::new(crate::gpu::CandleModel::load(path, &device, opts)?)
        };
        Ok(Self {
            prompter,
            backend,
            architecture,
            adapter,
            base_name,
            path: path.to_path_buf(),
            sha256: opts.model_sha256.clone(),
        })
    }
}

/// Blocks that fit `mb` MiB of cache, and at least one full context.
pub fn cache_blocks(mb: usize, bytes_per_token: usize, block_size: usize, context: usize) -> usize {
    let fit = (mb << 20) / (bytes_per_token * block_size).max(1);
    fit.max(context.div_ceil(block_size) + 1)
}
