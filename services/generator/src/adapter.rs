//! LoRA adapters: low-rank updates `W + (alpha / rank) · B·A` of a layer's projections, trained
//! by `ghostwriter train` and served unmerged (the base weights stay as they are in the GGUF;
//! merging into Q8_0 blocks would round a short fine-tune away).
//!
//! File format: safetensors, f32 tensors `blk.{layer}.{projection}.lora_a` (rank × in) and
//! `.lora_b` (out × rank), with metadata `rank`, `alpha`, `base_sha256` and whatever the
//! trainer records (data hash, steps, presets).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use ghostwriter_kernels::kernels::dot_f32 as dot;

/// The projections an adapter may update, by their GGUF tensor names.
pub const PROJECTIONS: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// One projection's low-rank pair.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// `rank × inputs`, row-major.
    pub a: Vec<f32>,
    /// `outputs × rank`, row-major.
    pub b: Vec<f32>,
}

/// A trained adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// Rank of every pair.
    pub rank: usize,
    /// Scale numerator: updates are multiplied by `alpha / rank`.
    pub alpha: f32,
    /// `(layer, projection)` → pair.
    pub pairs: BTreeMap<(usize, String), LoraPair>,
    /// Provenance: `base_sha256`, data hash, steps, …
    pub metadata: BTreeMap<String, String>,
}

impl Adapter {
    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank.max(1) as f32
    }

    /// The pair of `projection` in `layer`, if trained.
    pub fn pair(&self, layer: usize, projection: &str) -> Option<&LoraPair> {
        self.pairs.get(&(layer, projection.to_string()))
    }

    /// Reads an adapter file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("reading adapter {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses an adapter from a safetensors file's bytes (`what` names it in errors).
    pub fn from_bytes(bytes: &[u8], what: &str) -> anyhow::Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .with_context(|| format!("{what} is not a safetensors file"))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
        let metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let rank: usize = metadata
            .get("rank")
            .context("adapter metadata has no rank")?
            .parse()?;
        let alpha: f32 = metadata
            .get("alpha")
            .context("adapter metadata has no alpha")?
            .parse()?;
        let mut pairs = BTreeMap::new();
        for name in st.names() {
            let Some(prefix) = name.strip_suffix(".lora_a") else {
                continue;
            };
            let (layer, projection) =
                parse_name(prefix).with_context(|| format!("unexpected adapter tensor {name}"))?;
            let a = st.tensor(name)?;
            let b = st.tensor(&format!("{prefix}.lora_b"))?;
            if a.dtype() != safetensors::Dtype::F32 || b.dtype() != safetensors::Dtype::F32 {
                bail!("adapter tensor {prefix} is not f32");
            }
            let (ash, bsh) = (a.shape(), b.shape());
            if ash.len() != 2 || bsh.len() != 2 || ash[0] != rank || bsh[1] != rank {
                bail!("adapter tensor {prefix} has shapes {ash:?} and {bsh:?} for rank {rank}");
            }
            pairs.insert(
                (layer, projection.to_string()),
                LoraPair {
                    inputs: ash[1],
                    outputs: bsh[0],
                    a: f32s(a.data()),
                    b: f32s(b.data()),
                },
            );
        }
        if pairs.is_empty() {
            bail!("adapter {what} holds no LoRA pair");
        }
        Ok(Self {
            rank,
            alpha,
            pairs,
            metadata,
        })
    }

    /// Writes the adapter (and its metadata, with `rank` and `alpha`).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let data = self.to_bytes()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Reads an adapter file to serve on the model at `model`: checked against its layer
    /// count, projection widths (`widths(projection)` = (in, out)) and sha256 (`model_sha256`
    /// when the caller knows it, else read from the file).
    pub fn load_for(
        file: &Path,
        model: &Path,
        model_sha256: Option<&str>,
        layers: usize,
        widths: impl Fn(&str) -> Option<(usize, usize)>,
    ) -> anyhow::Result<Self> {
        let a = Self::load(file)?;
        let base = match model_sha256 {
            Some(sha) => sha.to_string(),
            None => ghostwriter_common::models::sha256_file(model)?,
        };
        a.check(layers, widths, Some(&base))?;
        Ok(a)
    }

    /// Checks that every pair fits the model's widths (`widths(projection)` = (in, out)) and
    /// layer count, and that it was trained on this base (when `base_sha256` is known).
    pub fn check(
        &self,
        layers: usize,
        widths: impl Fn(&str) -> Option<(usize, usize)>,
        base_sha256: Option<&str>,
    ) -> anyhow::Result<()> {
        for ((layer, projection), p) in &self.pairs {
            if !p.a.iter().chain(&p.b).all(|v| v.is_finite()) {
                bail!("adapter {projection} of layer {layer} holds NaN or infinite values");
            }
            if *layer >= layers {
                bail!("adapter layer {layer} is past the model's {layers} layers");
            }
            let Some((i, o)) = widths(projection) else {
                bail!("adapter projection {projection} is not one of {PROJECTIONS:?}");
            };
            if (p.inputs, p.outputs) != (i, o) {
                bail!(
                    "adapter {projection} of layer {layer} is {}→{}, the model's is {i}→{o}",
                    p.inputs,
                    p.outputs
                );
            }
        }
        if let (Some(want), Some(have)) = (self.metadata.get("base_sha256"), base_sha256)
            && want != have
        {
            bail!("the adapter was trained on base model sha256 {want}, this model is {have}");
        }
        Ok(())
    }

    /// An adapter of `rank` on every projection of every layer of `shape`, with values drawn
    /// from `seed` (A uniform in ±1/√in, B in ±`b_scale`), for the base model `base_sha256`:
    /// the shape `ghostwriter train` writes, with weights that change the output, for
    /// benchmarks and tests of serving many adapters at once.
    pub fn seeded(
        shape: &crate::backend::AdapterShape,
        rank: usize,
        b_scale: f32,
        seed: u64,
        base_sha256: &str,
    ) -> Self {
        let mut rng = ghostwriter_common::rng::Rng::new(seed);
        let mut draw = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.unit() as f32 * 2.0 - 1.0) * scale)
                .collect()
        };
        let mut pairs = BTreeMap::new();
        for layer in 0..shape.layers {
            for (projection, &(inputs, outputs)) in &shape.widths {
                let a = draw(rank * inputs, 1.0 / (inputs as f32).sqrt());
                let b = draw(outputs * rank, b_scale);
                pairs.insert(
                    (layer, projection.clone()),
                    LoraPair {
                        inputs,
                        outputs,
                        a,
                        b,
                    },
                );
            }
        }
        Self {
            rank,
            alpha: 2.0 * rank as f32,
            pairs,
            metadata: [
                ("base_sha256".to_string(), base_sha256.to_string()),
                ("seed".to_string(), seed.to_string()),
            ]
            .into(),
        }
    }

    /// The safetensors bytes [`Adapter::save`] writes.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
        for ((layer, projection), p) in &self.pairs {
            let prefix = format!("blk.{layer}.{projection}");
            tensors.push((
                format!("{prefix}.lora_a"),
                bytes(&p.a),
                vec![self.rank, p.inputs],
            ));
            tensors.push((
                format!("{prefix}.lora_b"),
                bytes(&p.b),
                vec![p.outputs, self.rank],
            ));
        }
        let mut metadata = self.metadata.clone();
        metadata.insert("rank".into(), self.rank.to_string());
        metadata.insert("alpha".into(), self.alpha.to_string());
        safetensors_f32(&tensors, &metadata)
    }

    /// Bytes its weights take in memory (f32).
    pub fn weight_bytes(&self) -> usize {
        4 * self
            .pairs
            .values()
            .map(|p| p.a.len() + p.b.len())
            .sum::<usize>()
    }

    /// A short name for provenance: the file stem and the first 12 hex digits of its sha256.
    pub fn describe(path: &Path) -> String {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        match ghostwriter_common::models::sha256_file(path) {
            Ok(h) => format!("{stem}@{}", &h[..12.min(h.len())]),
            Err(_) => stem,
        }
    }
}

/// A pair laid out for serving: `A` (rank × in) and `Bᵀ` (rank × out), the scale folded in.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    a: Vec<f32>,
    /// `scale · Bᵀ`, rank × outputs.
    bt: Vec<f32>,
}

impl LoraPair {
    /// The serving layout of this pair with `scale` applied.
    pub fn prepare(&self, scale: f32) -> Prepared {
        let rank = self.a.len() / self.inputs.max(1);
        let mut bt = vec![0f32; rank * self.outputs];
        for (o, row) in self.b.chunks_exact(rank).enumerate() {
            for (r, v) in row.iter().enumerate() {
                bt[r * self.outputs + o] = scale * v;
            }
        }
        Prepared {
            inputs: self.inputs,
            outputs: self.outputs,
            a: self.a.clone(),
            bt,
        }
    }
}

/// `out_row[offset..offset + outputs] += scale · B·(A·x)` for one input row `x`.
pub fn apply_row(p: &Prepared, x: &[f32], out_row: &mut [f32], offset: usize) {
    let dst = &mut out_row[offset..offset + p.outputs];
    for (ar, btr) in p.a.chunks_exact(p.inputs).zip(p.bt.chunks_exact(p.outputs)) {
        let u = dot(ar, x);
        for (o, b) in dst.iter_mut().zip(btr) {
            *o += u * b;
        }
    }
}

fn parse_name(prefix: &str) -> Option<(usize, &str)> {
    let rest = prefix.strip_prefix("blk.")?;
    let (layer, projection) = rest.split_once('.')?;
    Some((layer.parse().ok()?, projection))
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A safetensors file of f32 `tensors` (name, little-endian data, shape) with `metadata`, the
/// same bytes for the same input: header keys sorted, data in the order given, the header
/// padded with spaces to 8 bytes as the safetensors crate pads it. (The crate's own writer
/// takes the metadata as a hash map, so its files differ from run to run in header order.)
fn safetensors_f32(
    tensors: &[(String, Vec<u8>, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let mut header: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    header.insert("__metadata__", serde_json::json!(metadata));
    let mut offset = 0usize;
    for (name, data, shape) in tensors {
        anyhow::ensure!(
            data.len() == shape.iter().product::<usize>() * 4,
            "tensor {name}: {} bytes for shape {shape:?}",
            data.len()
        );
        header.insert(
            name,
            serde_json::json!({
                "dtype": "F32",
                "shape": shape,
                "data_offsets": [offset, offset + data.len()],
            }),
        );
        offset += data.len();
    }
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend((head.len() as u64).to_le_bytes());
    out.extend(head);
    for (_, data, _) in tensors {
        out.extend_from_slice(data);
    }
    Ok(out)
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_applies() {
        let mut pairs = BTreeMap::new();
        pairs.insert(
            (1, "attn_q".to_string()),
            LoraPair {
                inputs: 3,
                outputs: 2,
                a: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0], // rank 2
                b: vec![1.0, 1.0, 0.0, 2.0],
            },
        );
        let adapter = Adapter {
            rank: 2,
            alpha: 4.0,
            pairs,
            metadata: [("steps".to_string(), "7".to_string())].into(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.safetensors");
        adapter.save(&path).unwrap();
        let back = Adapter::load(&path).unwrap();
        assert_eq!(back.pairs, adapter.pairs);
        assert_eq!(back.metadata["steps"], "7");
        assert_eq!(back.scale(), 2.0);
        let pair = back.pair(1, "attn_q").unwrap().prepare(back.scale());
        // x = (1, 2, 3): A·x = (1, 2); B·(A·x) = (3, 4); × 2 = (6, 8) added at column 1.
        let mut out = vec![0.5f32; 4];
        apply_row(&pair, &[1.0, 2.0, 3.0], &mut out, 1);
        assert_eq!(out, vec![0.5, 6.5, 8.5, 0.5]);
        let long: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(
            dot(&long, &long),
            (0..37).map(|i| (i * i) as f32).sum::<f32>()
        );
        assert!(back.check(2, |_| Some((3, 2)), None).is_ok());
        assert!(back.check(1, |_| Some((3, 2)), None).is_err());
        assert!(back.check(2, |_| Some((4, 2)), None).is_err());

        // The same adapter saves to the same bytes (many metadata keys, where a hash map's
        // order would show), and the safetensors crate reads the file back.
        let mut many = adapter.clone();
        for i in 0..24 {
            many.metadata.insert(format!("key{i}"), i.to_string());
        }
        let (p1, p2) = (
            dir.path().join("1.safetensors"),
            dir.path().join("2.safetensors"),
        );
        many.save(&p1).unwrap();
        many.save(&p2).unwrap();
        let (b1, b2) = (std::fs::read(&p1).unwrap(), std::fs::read(&p2).unwrap());
        assert_eq!(b1, b2);
        let st = safetensors::SafeTensors::deserialize(&b1).unwrap();
        assert_eq!(st.names().len(), 2);
        let again = Adapter::load(&p1).unwrap();
        assert_eq!(again.pairs, many.pairs);
        assert_eq!(again.metadata["key17"], "17");
        assert_eq!(again.metadata["rank"], "2");
    }
}
