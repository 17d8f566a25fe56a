//! The evaluation report: per-preset BLEU and ROUGE (percent), latency, a paired bootstrap
//! against `immediate-context`, as JSON, a Markdown table and an SVG chart of ROUGE-1.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::Serialize;

use super::metrics::{self, BleuStats, Rouge};
use super::{EvalArgs, Record, Rng};

/// The baseline every preset is compared with.
pub const BASELINE: &str = "immediate-context";

/// Scores of one preset.
#[derive(Debug, Clone, Serialize)]
pub struct PresetScore {
    /// Preset.
    pub preset: String,
    /// The generator that wrote the row (its model, with its adapter and hash, if any; the
    /// distinct names joined with " / " if they differ).
    #[serde(default)]
    pub generator: String,
    /// Examples scored.
    pub examples: usize,
    /// Corpus BLEU.
    pub bleu: f64,
    /// Mean ROUGE-1 F.
    pub rouge1: f64,
    /// Mean ROUGE-2 F.
    pub rouge2: f64,
    /// Mean ROUGE-L F.
    pub rouge_l: f64,
    /// Mean write latency.
    pub mean_latency_ms: f64,
    /// Mean generated tokens.
    pub mean_generated_tokens: f64,
    /// Share of examples whose prompt got no important word (presets with synthesis only).
    pub empty_words_share: Option<f64>,
    /// Mean share of the generated text's word 8-grams found verbatim in the ranked past
    /// documents behind its prompt (examples with at least 8 generated words).
    pub copy_rate: f64,
    /// Mean share of the generated text's word 4-grams that repeat an earlier 4-gram of it.
    pub repetition_rate: f64,
    /// Mean share of the generated text's ROUGE tokens (stemmed, as ROUGE-1 counts them) found
    /// in the part of the target that the immediate context does not already hold: how right
    /// the new words are, whatever their number (examples that generated something).
    pub generated_precision: f64,
    /// Mean words generated.
    pub mean_output_words: f64,
    /// Mean words of the targets' rest (what the generator should have written).
    pub mean_target_words: f64,
    /// Paired ROUGE-1 difference to the baseline on the shared examples, with its bootstrap
    /// 95% interval and the share of resamples where the difference is not positive.
    pub rouge1_vs_baseline: Option<Paired>,
    /// Voice score: ROC AUC of the style verifier telling the true author's profile from a
    /// matched other user's, on the generated continuation alone (see [`crate::voice`]).
    pub voice_auc: Option<f64>,
    /// 2.5th percentile of its bootstrap by author.
    pub voice_auc_ci_low: Option<f64>,
    /// 97.5th percentile.
    pub voice_auc_ci_high: Option<f64>,
    /// Voice score minus the baseline's on the shared examples, with its bootstrap interval.
    pub voice_auc_vs_baseline: Option<crate::voice::VoiceDiff>,
}

/// A paired comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Paired {
    /// Examples both have.
    pub examples: usize,
    /// Mean difference (preset − baseline), ROUGE-1 points.
    pub mean_diff: f64,
    /// 2.5th percentile of the bootstrap.
    pub ci_low: f64,
    /// 97.5th percentile of the bootstrap.
    pub ci_high: f64,
    /// One-sided bootstrap p-value for "no gain".
    pub p_not_better: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// One row per preset, in the order asked.
    pub presets: Vec<PresetScore>,
    /// The split evaluated.
    pub split: String,
    /// Example limit, if any.
    pub limit: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// Tokens generated per example.
    pub max_new_tokens: u32,
    /// Wall-clock seconds of this run (writes only; resumed results cost nothing).
    pub wall_seconds: f64,
    /// Seconds spent computing the metrics.
    pub metric_seconds: f64,
    /// The voice score of the true continuations (the target after its immediate context):
    /// the ceiling of every preset's.
    pub voice_ceiling: Option<crate::voice::Voice>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

fn paired(diffs: &[f64], resamples: usize, seed: u64) -> Paired {
    let n = diffs.len();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| diffs[rng.below(n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((means.len() - 1) as f64 * q).round() as usize];
    Paired {
        examples: n,
        mean_diff: mean(diffs.iter().copied()),
        ci_low: at(0.025),
        ci_high: at(0.975),
        p_not_better: means.iter().filter(|m| **m <= 0.0).count() as f64 / means.len() as f64,
    }
}

/// The part of a record's prediction that is the immediate context (the prediction is the
/// context followed by the generated text).
fn context(r: &Record) -> &str {
    r.prediction
        .strip_suffix(r.generated.as_str())
        .unwrap_or("")
}

fn words(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

/// Share of `generated`'s word 8-grams that occur in one of `sources`; `None` below 8 words.
pub fn copy_rate(generated: &str, sources: &[&str]) -> Option<f64> {
    let g = words(generated);
    if g.len() < 8 {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    for s in sources {
        let w = words(s);
        for gram in w.windows(8) {
            seen.insert(gram.to_vec());
        }
    }
    let grams: Vec<&[String]> = g.windows(8).collect();
    Some(grams.iter().filter(|x| seen.contains(**x)).count() as f64 / grams.len() as f64)
}

/// Share of `generated`'s ROUGE tokens found in `target` beyond what `context` already covers,
/// counts clipped as ROUGE-1 clips them; `None` when nothing was generated.
pub fn generated_precision(generated: &str, context: &str, target: &str) -> Option<f64> {
    let generated = metrics::rouge_tokens(generated);
    if generated.is_empty() {
        return None;
    }
    let mut rest: HashMap<String, usize> = HashMap::new();
    for t in metrics::rouge_tokens(target) {
        *rest.entry(t).or_default() += 1;
    }
    for t in metrics::rouge_tokens(context) {
        if let Some(n) = rest.get_mut(&t) {
            *n = n.saturating_sub(1);
        }
    }
    let mut hits = 0;
    for t in &generated {
        if let Some(n) = rest.get_mut(t)
            && *n > 0
        {
            *n -= 1;
            hits += 1;
        }
    }
    Some(hits as f64 / generated.len() as f64)
}

/// Share of `generated`'s word 4-grams that repeat an earlier one; 0 below 5 words.
pub fn repetition_rate(generated: &str) -> f64 {
    let g = words(generated);
    if g.len() < 5 {
        return 0.0;
    }
    let mut seen = std::collections::HashSet::new();
    let grams: Vec<&[String]> = g.windows(4).collect();
    let repeats = grams.iter().filter(|x| !seen.insert(x.to_vec())).count();
    repeats as f64 / grams.len() as f64
}

/// Scores every preset's records; `texts` (doc id → title and body) gives the ranked past
/// documents for the copy rate.
pub fn summarize(
    presets: &[String],
    records: &BTreeMap<String, Vec<Record>>,
    texts: &HashMap<&str, String>,
    resamples: usize,
    seed: u64,
    wall: f64,
    args: &EvalArgs,
) -> Summary {
    let started = std::time::Instant::now();
    // By doc id, in order: the bootstrap resamples the paired differences by position, so the
    // same records and seed give the same interval in every run.
    let rouge_of = |rs: &[Record]| -> BTreeMap<String, Rouge> {
        metrics::par_map(rs, |r| {
            (r.doc_id.clone(), metrics::rouge(&r.target, &r.prediction))
        })
        .into_iter()
        .collect()
    };
    let scored: BTreeMap<&String, BTreeMap<String, Rouge>> =
        records.iter().map(|(p, rs)| (p, rouge_of(rs))).collect();
    let baseline = scored.get(&BASELINE.to_string());
    let rows = presets
        .iter()
        .filter_map(|p| {
            let rs = records.get(p)?;
            let rouge = &scored[p];
            let mut bleu = BleuStats::default();
            for r in rs {
                bleu.add(&BleuStats::new(&r.prediction, &r.target));
            }
            let vs = baseline.filter(|_| p != BASELINE).and_then(|b| {
                let diffs: Vec<f64> = rouge
                    .iter()
                    .filter_map(|(id, s)| b.get(id).map(|bs| 100.0 * (s.r1 - bs.r1)))
                    .collect();
                (!diffs.is_empty() && resamples > 0).then(|| paired(&diffs, resamples, seed))
            });
            let generators: std::collections::BTreeSet<&str> =
                rs.iter().map(|r| r.generator.as_str()).collect();
            Some(PresetScore {
                preset: p.clone(),
                generator: generators.into_iter().collect::<Vec<_>>().join(" / "),
                examples: rs.len(),
                bleu: bleu.bleu(),
                rouge1: 100.0 * mean(rouge.values().map(|s| s.r1)),
                rouge2: 100.0 * mean(rouge.values().map(|s| s.r2)),
                rouge_l: 100.0 * mean(rouge.values().map(|s| s.rl)),
                mean_latency_ms: mean(rs.iter().map(|r| r.latency_ms)),
                mean_generated_tokens: mean(rs.iter().map(|r| r.generated_tokens as f64)),
                empty_words_share: ghostwriter_orchestrator::preset::find(p)
                    .and_then(|preset| preset.synthesis)
                    .map(|_| mean(rs.iter().map(|r| f64::from(r.important_words == 0)))),
                copy_rate: mean(rs.iter().filter_map(|r| {
                    let sources: Vec<&str> = r
                        .passage_ids
                        .iter()
                        .filter_map(|id| texts.get(id.as_str()).map(String::as_str))
                        .collect();
                    copy_rate(&r.generated, &sources)
                })),
                repetition_rate: mean(rs.iter().map(|r| repetition_rate(&r.generated))),
                generated_precision: mean(
                    rs.iter()
                        .filter_map(|r| generated_precision(&r.generated, context(r), &r.target)),
                ),
                mean_output_words: mean(rs.iter().map(|r| words(&r.generated).len() as f64)),
                mean_target_words: mean(rs.iter().map(|r| {
                    let context_words = words(context(r)).len();
                    words(&r.target).len().saturating_sub(context_words) as f64
                })),
                rouge1_vs_baseline: vs,
                voice_auc: None,
                voice_auc_ci_low: None,
                voice_auc_ci_high: None,
                voice_auc_vs_baseline: None,
            })
        })
        .collect();
    Summary {
        presets: rows,
        split: format!("{:?}", args.split).to_lowercase(),
        limit: args.limit,
        seed,
        max_new_tokens: args.max_new_tokens,
        wall_seconds: wall,
        metric_seconds: started.elapsed().as_secs_f64(),
        voice_ceiling: None,
    }
}

/// Puts the voice scores into the summary's rows.
pub fn attach_voice(summary: &mut Summary, voice: crate::voice::VoiceReport) {
    for row in &mut summary.presets {
        if let Some(v) = voice.presets.get(&row.preset) {
            row.voice_auc = Some(v.auc);
            row.voice_auc_ci_low = Some(v.ci_low);
            row.voice_auc_ci_high = Some(v.ci_high);
        }
        row.voice_auc_vs_baseline = voice.vs_baseline.get(&row.preset).cloned();
    }
    summary.voice_ceiling = voice.ceiling;
}

/// The Markdown table.
pub fn markdown(s: &Summary) -> String {
    let mut out = String::from(
        "| preset | generator | BLEU | R-1 | R-2 | R-L | ΔR-1 vs immediate-context [95% CI] | copy rate | voice AUC [95% CI] | repetition | generated precision | words out / target | no important word | mean latency (s) | examples |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for p in &s.presets {
        let delta = p.rouge1_vs_baseline.as_ref().map_or("—".to_string(), |d| {
            format!("{:+.2} [{:+.2}, {:+.2}]", d.mean_diff, d.ci_low, d.ci_high)
        });
        let voice = match (p.voice_auc, p.voice_auc_ci_low, p.voice_auc_ci_high) {
            (Some(a), Some(l), Some(h)) => format!("{a:.2} [{l:.2}, {h:.2}]"),
            _ => "—".to_string(),
        };
        out.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.1}% | {} | {:.1}% | {:.1}% | {:.0} / {:.0} | {} | {:.1} | {} |\n",
            p.preset,
            if p.generator.is_empty() { "—" } else { p.generator.as_str() },
            p.bleu,
            p.rouge1,
            p.rouge2,
            p.rouge_l,
            delta,
            100.0 * p.copy_rate,
            voice,
            100.0 * p.repetition_rate,
            100.0 * p.generated_precision,
            p.mean_output_words,
            p.mean_target_words,
            p.empty_words_share
                .map_or("—".to_string(), |e| format!("{:.0}%", 100.0 * e)),
            p.mean_latency_ms / 1e3,
            p.examples
        ));
    }
    if let Some(v) = &s.voice_ceiling {
        out.push_str(&format!(
            "\nVoice AUC of the true continuations (the ceiling): {:.2} [{:.2}, {:.2}], {} examples.\n",
            v.auc, v.ci_low, v.ci_high, v.examples
        ));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart of ROUGE-1 per preset.
pub fn svg(s: &Summary) -> String {
    let (row, left, width) = (28.0, 170.0, 420.0);
    let max = s.presets.iter().map(|p| p.rouge1).fold(1.0f64, f64::max) * 1.1;
    let height = 50.0 + row * s.presets.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"20\" font-size=\"14\">ROUGE-1 by preset ({} split, {} examples each)</text>\n",
        s.split,
        s.presets.first().map_or(0, |p| p.examples),
        w = left + width + 70.0,
    );
    for (i, p) in s.presets.iter().enumerate() {
        let y = 35.0 + row * i as f64;
        let w = width * p.rouge1 / max;
        let color = if p.preset == BASELINE {
            "#999999"
        } else {
            "#3b6ea8"
        };
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{left}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\">{:.2}</text>\n",
            left - 8.0,
            y + 15.0,
            escape(&p.preset),
            y + 3.0,
            row - 8.0,
            left + w + 5.0,
            y + 15.0,
            p.rouge1
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// Writes summary.json, table.md and rouge1.svg to `dir`.
pub fn write_all(dir: &Path, s: &Summary) -> anyhow::Result<()> {
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(s)?)?;
    std::fs::write(dir.join("table.md"), markdown(s))?;
    std::fs::write(dir.join("rouge1.svg"), svg(s))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_repetition_rates() {
        let past = "I bought these strings for my old Martin and they sound bright and warm.";
        // 10 words, 3 eight-grams; the first two are in the past review, the last is not.
        let generated = "bought these strings for my old Martin and they buzz";
        assert!((copy_rate(generated, &[past]).unwrap() - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(copy_rate("too short to count", &[past]), None);
        assert_eq!(copy_rate(generated, &[]), Some(0.0));
        assert_eq!(repetition_rate("great strings for the money"), 0.0);
        let r = repetition_rate("great strings for the price great strings for the price");
        // 7 four-grams: the last 2 repeat the first 2.
        assert!((r - 2.0 / 7.0).abs() < 1e-9, "{r}");
    }

    #[test]
    fn generated_precision_counts_only_what_the_context_left() {
        let target = "Great strings. They sound bright and stay in tune; great value.";
        let context = "Great strings. They sound";
        // "bright", "and", "great" are in the rest (stemmed "strings" is not: the context used
        // its one occurrence); "cheap" is in none.
        let p = generated_precision(" bright and cheap strings great", context, target).unwrap();
        assert!((p - 3.0 / 5.0).abs() < 1e-9, "{p}");
        // Clipped: the rest has one "and".
        let p = generated_precision("and and", context, target).unwrap();
        assert!((p - 0.5).abs() < 1e-9, "{p}");
        assert_eq!(generated_precision("", context, target), None);
    }

    #[test]
    fn the_same_records_and_seed_give_the_same_interval() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            eval: EvalArgs,
        }
        let args = <Cli as clap::Parser>::parse_from(["eval"]).eval;
        let record = |preset: &str, i: usize, prediction: String| Record {
            preset: preset.into(),
            user_id: "u".into(),
            doc_id: format!("d{i}"),
            prediction,
            target: format!("great strings number {i} sound bright and warm for the money"),
            latency_ms: 1.0,
            generated_tokens: 1,
            generated: String::new(),
            important_words: 0,
            passage_ids: Vec::new(),
            generator: "SmolLM2-135M-Instruct".into(),
        };
        let mut records: BTreeMap<String, Vec<Record>> = BTreeMap::new();
        for i in 0..40 {
            records.entry(BASELINE.into()).or_default().push(record(
                BASELINE,
                i,
                format!("great strings number {i}"),
            ));
            // Differences that vary by example, so the order of resampling matters.
            let extra = ["sound", "sound bright", "sound bright and warm", "cheap"][i % 4];
            records.entry("syn-ctx".into()).or_default().push(record(
                "syn-ctx",
                i,
                format!("great strings number {i} {extra}"),
            ));
        }
        let presets = vec![BASELINE.to_string(), "syn-ctx".to_string()];
        let interval = || {
            let s = summarize(&presets, &records, &HashMap::new(), 1000, 42, 0.0, &args);
            let d = s.presets[1].rouge1_vs_baseline.clone().unwrap();
            (d.ci_low, d.ci_high, d.p_not_better)
        };
        let first = interval();
        for _ in 0..5 {
            assert_eq!(interval(), first);
        }
    }
}
