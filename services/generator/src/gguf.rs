//! Reading a GGUF model file: its metadata, the tokenizer rebuilt from that metadata, and the
//! one-time re-quantization to Q8_0.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::Device;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Opens and parses the header (metadata and tensor infos) of a GGUF file.
pub fn read_content(path: &Path) -> anyhow::Result<(gguf_file::Content, BufReader<File>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .with_context(|| format!("{} is not a GGUF file", path.display()))?;
    Ok((content, reader))
}

fn strings(metadata: &HashMap<String, Value>, key: &str) -> anyhow::Result<Vec<String>> {
    let values = metadata
        .get(key)
        .with_context(|| format!("GGUF metadata lacks {key}"))?
        .to_vec()?;
    values.iter().map(|v| Ok(v.to_string()?.clone())).collect()
}

/// A string metadata value.
pub fn meta_string(metadata: &HashMap<String, Value>, key: &str) -> Option<String> {
    metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
}

/// An integer metadata value.
pub fn meta_u32(metadata: &HashMap<String, Value>, key: &str) -> Option<u32> {
    let v = metadata.get(key)?;
    v.to_u32()
        .ok()
        .or_else(|| v.to_u64().ok().map(|x| x as u32))
        .or_else(|| v.to_i32().ok().map(|x| x as u32))
}

/// The Qwen2 pre-tokenizer pattern (llama.cpp's `qwen2`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Rebuilds the model's tokenizer from the GGUF metadata: a byte-level BPE from
/// `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the pre-tokenizer llama.cpp uses for the
/// file's `tokenizer.ggml.pre`, a byte-level decoder, and the control tokens (type 3) as special
/// tokens. (candle's own GGUF helper treats SmolLM2's `smollm` pre-tokenizer as GPT-2's, which
/// gives different ids than llama.cpp and degrades the output.)
pub fn tokenizer(metadata: &HashMap<String, Value>) -> anyhow::Result<Tokenizer> {
    build_tokenizer(metadata, true)
}

/// The same tokenizer with no special tokens: `<|im_start|>` in a text is plain text. Used for
/// every caller-supplied piece of a prompt, so no input can open or close a chat turn.
pub fn tokenizer_plain(metadata: &HashMap<String, Value>) -> anyhow::Result<Tokenizer> {
    build_tokenizer(metadata, false)
}

fn build_tokenizer(metadata: &HashMap<String, Value>, specials: bool) -> anyhow::Result<Tokenizer> {
    let model = meta_string(metadata, "tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        bail!(
            "unsupported GGUF tokenizer model {model:?} (only byte-level BPE, \"gpt2\", is supported)"
        );
    }
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let merges = strings(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .with_context(|| format!("bad merge {m:?}"))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let vocab: ahash::AHashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("building the BPE: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre = meta_string(metadata, "tokenizer.ggml.pre").unwrap_or_default();
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        "qwen2" => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(QWEN2_PATTERN.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow::anyhow!("qwen2 pattern: {e}"))?
            .into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        // SmolLM2 (`smollm`) and other GPT-2-style vocabularies that split digits one by one.
        _ => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    let types = metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok());
    if let Some(types) = types.filter(|_| specials) {
        let specials: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| t.to_i32().ok() == Some(3))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(specials)
            .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
    }
    Ok(tokenizer)
}

/// Re-quantizes every quantized tensor of `src` to Q8_0 and writes `dst` (metadata kept).
/// Tensors that are not quantized (norms, f32) are copied as they are.
pub fn requantize_q8_0(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let (content, mut reader) = read_content(src)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let q = content.tensor(&mut reader, name, &Device::Cpu)?;
        let keep = matches!(
            q.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 | GgmlDType::Q8_0
        ) || q.shape().dims().last().is_none_or(|d| d % 32 != 0);
        let q = if keep {
            q
        } else {
            QTensor::quantize(&q.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
        };
        tensors.push((name.clone(), q));
    }
    // A temporary name no concurrent requantization uses (init containers pulling into one
    // shared volume are each PID 1), renamed into place whole.
    let parent = dst
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".requantize-")
        .tempfile_in(parent)
        .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
    {
        write_gguf(&mut BufWriter::new(tmp.as_file()), &content, &tensors)?;
    }
    // Readable as a created file is (a temporary file starts private to its writer).
    {
        use std::os::unix::fs::PermissionsExt as _;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(dst)
        .with_context(|| format!("moving the requantized model to {}", dst.display()))?;
    Ok(())
}

/// Writes the header of the GGUF file `src` (metadata, tokenizer included, and tensor infos;
/// no tensor data) to `dst`: a few MB that [`synthesize`] turns into a model of the same shape.
pub fn header_only(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let (content, _) = read_content(src)?;
    let len = content.tensor_data_offset;
    let mut from = File::open(src)?;
    let mut to = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    std::io::copy(&mut std::io::Read::take(&mut from, len), &mut to)?;
    Ok(())
}

/// Writes to `dst` a model of the shape of the GGUF file (or header, see [`header_only`])
/// `like`: its metadata and tokenizer, and tensors of its names, shapes and types filled with
/// values drawn from `seed` (norm weights 1, the others uniform in ±0.05). For benchmarks of
/// throughput where the real weights cannot travel: the text is noise, the cost is the model's.
pub fn synthesize(like: &Path, dst: &Path, seed: u64) -> anyhow::Result<()> {
    let (content, _) = read_content(like)?;
    let mut rng = ghostwriter_common::rng::Rng::new(seed);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let info = &content.tensor_infos[name];
        let dims = info.shape.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if dims.len() == 1 && name.contains("norm") {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| (rng.unit() as f32 * 2.0 - 1.0) * 0.05)
                .collect()
        };
        let t = candle_core::Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?;
        let dtype = match info.ggml_dtype {
            d @ (GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => d,
            d if dims.last().is_some_and(|w| w % 32 == 0) => d,
            _ => GgmlDType::F32,
        };
        tensors.push((name.clone(), QTensor::quantize(&t, dtype)?));
    }
    let file = File::create(dst).with_context(|| format!("creating {}", dst.display()))?;
    write_gguf(&mut BufWriter::new(file), &content, &tensors)
}

/// Writes `content`'s metadata (sorted by key: the same input gives the same bytes) and
/// `tensors` as a GGUF file.
fn write_gguf<W: std::io::Seek + std::io::Write>(
    out: &mut W,
    content: &gguf_file::Content,
    tensors: &[(String, QTensor)],
) -> anyhow::Result<()> {
    let mut metadata: Vec<(&str, &Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    gguf_file::write(out, &metadata, &refs)?;
    out.flush()?;
    Ok(())
}
