//! The int8 embedder (native kernels) against candle's f32 BERT on real reviews: the same
//! embeddings up to quantization, the same ranking, and packing that does not change a text's
//! embedding.

#![allow(clippy::unwrap_used)]

use crate::common;

use candle_core::Device;
use ghostwriter_embed::{EMBEDDER_DIR, Embedder, Precision, cosine};

/// The first `n` reviews of the Amazon data (title and text).
fn reviews(n: usize) -> Option<Vec<String>> {
    let path = common::amazon_docs()?;
    let text = std::fs::read_to_string(path).unwrap();
    Some(
        text.lines()
            .take(n)
            .map(|l| {
                let d: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {}",
                    d["title"].as_str().unwrap(),
                    d["text"].as_str().unwrap()
                )
            })
            .collect(),
    )
}

#[test]
fn int8_embeddings_match_f32_and_rank_the_same() {
    let _slot = crate::common::slot(module_path!());
    let Some(texts) = reviews(200) else { return };
    let dir = common::model_dir().join(EMBEDDER_DIR);
    let int8 = Embedder::load_with(&dir, &Device::Cpu, Precision::Int8, 0).unwrap();
    let f32 = Embedder::load_with(&dir, &Device::Cpu, Precision::F32, 0).unwrap();
    assert!(int8.describe().starts_with("int8"), "{}", int8.describe());
    assert!(f32.describe().starts_with("f32"), "{}", f32.describe());
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let a = int8.embed(&refs).unwrap();
    let b = f32.embed(&refs).unwrap();
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| cosine(x, y))
        .fold(f32::INFINITY, f32::min);
    assert!(worst > 0.995, "lowest cosine int8 vs f32: {worst}");
    let mean = a.iter().zip(&b).map(|(x, y)| cosine(x, y)).sum::<f32>() / a.len() as f32;
    assert!(mean > 0.999, "mean cosine int8 vs f32: {mean}");
    // Ranking: each of 20 queries (a review's first 150 characters) against the other 199.
    // Where the two pick different best matches, f32 must see them as a near tie.
    let (mut same_top, mut widest_gap) = (0, 0f32);
    for q in 0..20 {
        let start: String = texts[q * 10].chars().take(150).collect();
        let scores = |e: &Embedder, all: &[Vec<f32>]| {
            let qe = e.embed(&[start.as_str()]).unwrap().remove(0);
            all.iter().map(|d| cosine(&qe, d)).collect::<Vec<f32>>()
        };
        let best = |s: &[f32]| {
            (0..s.len())
                .filter(|&i| i != q * 10)
                .max_by(|&i, &j| s[i].total_cmp(&s[j]))
                .unwrap()
        };
        let (si, sf) = (scores(&int8, &a), scores(&f32, &b));
        let (bi, bf) = (best(&si), best(&sf));
        if bi == bf {
            same_top += 1;
        } else {
            widest_gap = widest_gap.max(sf[bf] - sf[bi]);
        }
    }
    eprintln!(
        "int8 vs f32 on 200 reviews: cosine min {worst}, mean {mean}; same best match for \
         {same_top} of 20 queries, f32 score gap where not {widest_gap}"
    );
    assert!(
        same_top >= 18,
        "int8 and f32 agree on the best match for {same_top} of 20 queries"
    );
    assert!(
        widest_gap < 0.01,
        "int8 picked a match f32 scores {widest_gap} lower"
    );
}

#[test]
fn a_text_embeds_the_same_alone_and_packed_with_others() {
    let _slot = crate::common::slot(module_path!());
    let Some(texts) = reviews(12) else { return };
    let dir = common::model_dir().join(EMBEDDER_DIR);
    let int8 = Embedder::load_with(&dir, &Device::Cpu, Precision::Int8, 0).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let packed = int8.embed(&refs).unwrap();
    for (t, p) in refs.iter().zip(&packed) {
        assert_eq!(&int8.embed(&[t]).unwrap()[0], p, "{t}");
    }
}
