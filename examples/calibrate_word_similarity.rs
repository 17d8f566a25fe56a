//! Calibrates SynCtx's word-similarity threshold: MiniLM cosine of single words for pairs a
//! reviewer would use interchangeably (synonyms, inflections) and for unrelated pairs of the same
//! domain. Run: `cargo run --release --example calibrate_word_similarity`.

use ghostwriter_embed::{Embedder, cosine};

const RELATED: &[(&str, &str)] = &[
    ("great", "excellent"),
    ("good", "nice"),
    ("cheap", "inexpensive"),
    ("sound", "tone"),
    ("buy", "purchase"),
    ("broke", "broken"),
    ("loud", "noisy"),
    ("price", "cost"),
    ("strings", "string"),
    ("tuner", "tuning"),
    ("guitar", "guitars"),
    ("amp", "amplifier"),
    ("durable", "sturdy"),
    ("quiet", "silent"),
    ("love", "like"),
    ("recommend", "recommended"),
];
const UNRELATED: &[(&str, &str)] = &[
    ("guitar", "shipping"),
    ("sound", "price"),
    ("cable", "happy"),
    ("strap", "tone"),
    ("great", "box"),
    ("pedal", "wife"),
    ("string", "fast"),
    ("cheap", "tuner"),
    ("amp", "leather"),
    ("buy", "noise"),
    ("quiet", "strap"),
    ("capo", "battery"),
    ("love", "cable"),
    ("stand", "sound"),
    ("bag", "tuning"),
    ("drum", "price"),
];

fn main() -> anyhow::Result<()> {
    let dir = ghostwriter_common::models::default_dir().join(ghostwriter_embed::EMBEDDER_DIR);
    let embedder = Embedder::load(&dir, &candle_core::Device::Cpu)?;
    let score = |pairs: &[(&str, &str)]| -> anyhow::Result<Vec<f32>> {
        pairs
            .iter()
            .map(|(a, b)| {
                let e = embedder.embed(&[a, b])?;
                Ok(cosine(&e[0], &e[1]))
            })
            .collect()
    };
    let related = score(RELATED)?;
    let unrelated = score(UNRELATED)?;
    for ((a, b), s) in RELATED.iter().zip(&related) {
        println!("related    {a:>12} {b:<12} {s:.3}");
    }
    for ((a, b), s) in UNRELATED.iter().zip(&unrelated) {
        println!("unrelated  {a:>12} {b:<12} {s:.3}");
    }
    for t in [0.5f32, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8] {
        let tp = related.iter().filter(|s| **s >= t).count();
        let fp = unrelated.iter().filter(|s| **s >= t).count();
        println!(
            "threshold {t:.2}: {tp}/{} related pairs match, {fp}/{} unrelated pairs match",
            related.len(),
            unrelated.len()
        );
    }
    Ok(())
}
