//! BLEU and ROUGE, implemented to agree with the reference implementations the field reports:
//! - BLEU: `sacrebleu`'s corpus BLEU with its defaults (13a tokenizer, no lowercasing,
//!   exponential smoothing, 4-grams, one reference per segment);
//! - ROUGE-1/2/L: `rouge-score`'s `RougeScorer(["rouge1","rouge2","rougeL"], use_stemmer=True)`
//!   F-measure (lower-casing, non-alphanumerics as spaces, NLTK's Porter stemmer on tokens longer
//!   than 3 characters, `rougeL` = sentence-level LCS without sentence splitting).
//!
//! `tests/services/metrics_reference.rs` checks both against the Python packages on real pairs.

use std::collections::HashMap;

use super::porter;

/// ROUGE F-measures of one pair, in [0, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rouge {
    /// ROUGE-1 F.
    pub r1: f64,
    /// ROUGE-2 F.
    pub r2: f64,
    /// ROUGE-L F.
    pub rl: f64,
}

thread_local! {
    /// Stems already computed on this thread: most tokens of a corpus repeat.
    static STEMS: std::cell::RefCell<HashMap<String, String>> = std::cell::RefCell::new(HashMap::new());
}

fn stem_cached(token: &str) -> String {
    STEMS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(s) = cache.get(token) {
            return s.clone();
        }
        let s = porter::stem(token);
        if cache.len() < 1_000_000 {
            cache.insert(token.to_string(), s.clone());
        }
        s
    })
}

/// Maps the tokens of two texts to small integers, so n-grams and the LCS compare numbers.
fn intern<'a>(a: &'a [String], b: &'a [String]) -> (Vec<u32>, Vec<u32>) {
    let mut ids: HashMap<&'a str, u32> = HashMap::with_capacity(a.len() + b.len());
    let mut map = |tokens: &'a [String]| -> Vec<u32> {
        tokens
            .iter()
            .map(|t| {
                let n = ids.len() as u32;
                *ids.entry(t.as_str()).or_insert(n)
            })
            .collect()
    };
    let x = map(a);
    let y = map(b);
    (x, y)
}

/// rouge-score's tokenizer with stemming.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let cleaned: String = lower
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                ' '
            }
        })
        .collect();
    cleaned
        .split(' ')
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.len() > 3 {
                stem_cached(t)
            } else {
                t.to_string()
            }
        })
        .filter(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        .collect()
}

fn fmeasure(p: f64, r: f64) -> f64 {
    if p + r > 0.0 {
        2.0 * p * r / (p + r)
    } else {
        0.0
    }
}

fn ngrams(tokens: &[u32], n: usize) -> HashMap<&[u32], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

fn rouge_n(target: &[u32], prediction: &[u32], n: usize) -> f64 {
    let t = ngrams(target, n);
    let p = ngrams(prediction, n);
    let overlap: usize = t
        .iter()
        .map(|(g, c)| (*c).min(p.get(g).copied().unwrap_or(0)))
        .sum();
    let tc: usize = t.values().sum();
    let pc: usize = p.values().sum();
    fmeasure(
        overlap as f64 / pc.max(1) as f64,
        overlap as f64 / tc.max(1) as f64,
    )
}

fn lcs(a: &[u32], b: &[u32]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-1/2/L F of `prediction` against `target`.
pub fn rouge(target: &str, prediction: &str) -> Rouge {
    let (target_tokens, prediction_tokens) = (rouge_tokens(target), rouge_tokens(prediction));
    let (t, p) = intern(&target_tokens, &prediction_tokens);
    let rl = if t.is_empty() || p.is_empty() {
        0.0
    } else {
        let l = lcs(&t, &p) as f64;
        fmeasure(l / p.len() as f64, l / t.len() as f64)
    };
    Rouge {
        r1: rouge_n(&t, &p, 1),
        r2: rouge_n(&t, &p, 2),
        rl,
    }
}

/// Replaces every non-overlapping match of a two-character pattern, left to right, like
/// Python's `re.sub` does for `(A)(B)` → `\1 \2 ` style rules.
fn sub2(
    line: &str,
    first: impl Fn(char) -> bool,
    second: impl Fn(char) -> bool,
    render: impl Fn(char, char, &mut String),
) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len() + 16);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && first(chars[i]) && second(chars[i + 1]) {
            render(chars[i], chars[i + 1], &mut out);
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// sacrebleu's 13a tokenizer (mteval-v13a).
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let line = format!(" {line} ");
    let is_symbol =
        |c: char| matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/');
    let mut spaced = String::with_capacity(line.len() * 2);
    for c in line.chars() {
        if is_symbol(c) {
            spaced.push(' ');
            spaced.push(c);
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let dot = |c: char| c == '.' || c == ',';
    let s = sub2(
        &spaced,
        |c| !digit(c),
        dot,
        |a, b, o| {
            o.push(a);
            o.push(' ');
            o.push(b);
            o.push(' ');
        },
    );
    let s = sub2(
        &s,
        dot,
        |c| !digit(c),
        |a, b, o| {
            o.push(' ');
            o.push(a);
            o.push(' ');
            o.push(b);
        },
    );
    let s = sub2(
        &s,
        digit,
        |c| c == '-',
        |a, b, o| {
            o.push(a);
            o.push(' ');
            o.push(b);
            o.push(' ');
        },
    );
    python_split(&s).join(" ")
}

/// Python's `str.split()` with no argument (its whitespace set includes \x1c-\x1f).
fn python_split(s: &str) -> Vec<&str> {
    s.split(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .filter(|t| !t.is_empty())
        .collect()
}

/// Sufficient statistics of one segment for corpus BLEU.
#[derive(Debug, Clone, Default)]
pub struct BleuStats {
    hyp_len: usize,
    ref_len: usize,
    correct: [usize; 4],
    total: [usize; 4],
}

impl BleuStats {
    /// Statistics of one hypothesis against one reference.
    pub fn new(hypothesis: &str, reference: &str) -> Self {
        let h = tokenize_13a(hypothesis.trim_end());
        let r = tokenize_13a(reference.trim_end());
        let h: Vec<String> = python_split(&h).into_iter().map(String::from).collect();
        let r: Vec<String> = python_split(&r).into_iter().map(String::from).collect();
        let (h, r) = intern(&h, &r);
        let mut s = Self {
            hyp_len: h.len(),
            ref_len: r.len(),
            ..Default::default()
        };
        for n in 1..=4 {
            let hg = ngrams(&h, n);
            let rg = ngrams(&r, n);
            for (g, c) in &hg {
                s.total[n - 1] += c;
                s.correct[n - 1] += (*c).min(rg.get(g).copied().unwrap_or(0));
            }
        }
        s
    }

    /// Adds another segment's statistics.
    pub fn add(&mut self, other: &Self) {
        self.hyp_len += other.hyp_len;
        self.ref_len += other.ref_len;
        for i in 0..4 {
            self.correct[i] += other.correct[i];
            self.total[i] += other.total[i];
        }
    }

    /// Corpus BLEU in percent (sacrebleu's `compute_bleu` with `smooth_method="exp"`).
    pub fn bleu(&self) -> f64 {
        let bp = if self.hyp_len < self.ref_len {
            if self.hyp_len > 0 {
                (1.0 - self.ref_len as f64 / self.hyp_len as f64).exp()
            } else {
                0.0
            }
        } else {
            1.0
        };
        if self.correct.iter().all(|&c| c == 0) {
            return 0.0;
        }
        let mut precisions = [0.0f64; 4];
        let mut smooth = 1.0;
        for (precision, (&correct, &total)) in precisions
            .iter_mut()
            .zip(self.correct.iter().zip(&self.total))
        {
            if total == 0 {
                break;
            }
            *precision = if correct == 0 {
                smooth *= 2.0;
                100.0 / (smooth * total as f64)
            } else {
                100.0 * correct as f64 / total as f64
            };
        }
        let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
        bp * (precisions.iter().map(|&p| log(p)).sum::<f64>() / 4.0).exp()
    }
}

/// Maps `f` over `items` on every core, keeping the order.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let chunk = items.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| scope.spawn(|| c.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Corpus BLEU of hypotheses against their references, in percent.
pub fn corpus_bleu<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let pairs: Vec<(&str, &str)> = pairs.into_iter().collect();
    let mut total = BleuStats::default();
    for stats in par_map(&pairs, |(hyp, reference)| BleuStats::new(hyp, reference)) {
        total.add(&stats);
    }
    total.bleu()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rouge_of_identical_and_disjoint_texts() {
        let r = rouge("The strings sound great.", "the strings sound great");
        assert!(
            (r.r1 - 1.0).abs() < 1e-12 && (r.r2 - 1.0).abs() < 1e-12 && (r.rl - 1.0).abs() < 1e-12
        );
        assert_eq!(rouge("abc def", "xyz"), Rouge::default());
        assert_eq!(
            rouge_tokens("Guitars, strings & AMPLIFIERS!"),
            vec!["guitar", "string", "amplifi"]
        );
    }

    #[test]
    fn thirteen_a_tokenization() {
        assert_eq!(
            tokenize_13a("Hello, world. It's 3.5-4 $!"),
            "Hello , world . It's 3.5 - 4 $ !"
        );
        assert_eq!(tokenize_13a("a&amp;b"), "a & b");
    }

    #[test]
    fn bleu_of_identical_text_is_100() {
        let b = corpus_bleu([("the quick brown fox jumps", "the quick brown fox jumps")]);
        assert!((b - 100.0).abs() < 1e-9, "{b}");
        assert_eq!(corpus_bleu([("a b", "c d")]), 0.0);
    }
}
