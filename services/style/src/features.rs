//! What a text's style is made of, measured once per text ([`TextStats`]), summed over an
//! author's documents ([`Profile`]), and compared ([`features`]): hashed character 2-, 3- and
//! 4-gram counts, function-word counts, and rates of punctuation, casing, digits, emoji and
//! other habits, with word and sentence lengths.

use std::collections::HashMap;

/// Hash buckets of the character n-grams (a power of two).
pub const BUCKETS: usize = 1 << 16;

/// The character n-gram orders compared.
pub const ORDERS: [usize; 3] = [2, 3, 4];

/// Function words: frequent, topic-free words whose use is habit.
pub const FUNCTION_WORDS: &[&str] = &[
    "a", "about", "above", "after", "again", "all", "also", "although", "am", "an", "and", "any",
    "are", "as", "at", "be", "because", "been", "before", "being", "both", "but", "by", "can",
    "could", "did", "do", "does", "doing", "down", "each", "either", "enough", "even", "ever",
    "every", "few", "for", "from", "had", "has", "have", "having", "he", "her", "here", "him",
    "his", "how", "however", "i", "if", "in", "into", "is", "it", "its", "just", "least", "less",
    "like", "many", "may", "me", "might", "more", "most", "much", "must", "my", "neither", "no",
    "nor", "not", "now", "of", "off", "often", "on", "once", "one", "only", "or", "other", "our",
    "out", "over", "own", "perhaps", "quite", "rather", "really", "same", "she", "should", "since",
    "so", "some", "still", "such", "than", "that", "the", "their", "them", "then", "there",
    "these", "they", "this", "those", "though", "through", "thus", "to", "too", "under", "until",
    "up", "upon", "us", "very", "was", "we", "well", "were", "what", "when", "where", "whether",
    "which", "while", "who", "whom", "why", "will", "with", "would", "yet", "you", "your",
];

/// Contractions written without their apostrophe: a habit of some writers.
const BARE_CONTRACTIONS: &[&str] = &[
    "dont", "cant", "wont", "didnt", "doesnt", "isnt", "wasnt", "im", "ive", "thats", "youre",
    "theyre", "couldnt", "wouldnt", "shouldnt", "havent", "hasnt", "arent", "ill", "id",
];

/// The habits measured as rates, in the order of [`TextStats::rates`].
pub const RATE_NAMES: [&str; RATES] = [
    "commas",
    "periods",
    "exclamations",
    "questions",
    "ellipses",
    "dashes",
    "parentheses",
    "double_quotes",
    "apostrophes",
    "colons_semicolons",
    "uppercase_letters",
    "all_caps_words",
    "lowercase_i",
    "lowercase_sentence_starts",
    "digits",
    "emoji",
    "non_ascii",
    "line_breaks",
    "double_spaces",
    "word_length",
    "sentence_length",
    "sentence_length_spread",
    "repeated_punctuation",
    "bare_contractions",
    "space_before_punctuation",
    "no_space_after_punctuation",
    "ampersands_slashes",
    "long_words",
];

/// Number of rates.
pub const RATES: usize = 28;

/// Counts of one text, enough to compare it and to sum it into a profile.
#[derive(Debug, Clone, Default)]
pub struct TextStats {
    /// Hashed character n-gram counts per order of [`ORDERS`], sorted by bucket.
    pub grams: [Vec<(u32, f32)>; 3],
    /// Counts of each of [`FUNCTION_WORDS`].
    pub function_words: Vec<f32>,
    /// Numerators of the rates (see [`RATE_NAMES`]); [`TextStats::rates`] divides them.
    pub counts: [f64; RATES],
    /// Words.
    pub words: usize,
    /// Characters.
    pub chars: usize,
    /// Letters.
    pub letters: usize,
    /// Sentences.
    pub sentences: usize,
    /// Sum of squared sentence lengths in words (for their spread).
    pub sentence_len_sq: f64,
}

/// The bucket of a character n-gram (FNV-1a over its UTF-8 bytes, folded to 32 bits).
pub fn bucket(gram: &[char]) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut buf = [0u8; 4];
    for c in gram {
        for b in c.encode_utf8(&mut buf).as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    ((h ^ (h >> 32)) as u32) % BUCKETS as u32
}

fn is_emoji(c: char) -> bool {
    matches!(c as u32, 0x1F000..=0x1FAFF | 0x2600..=0x27BF | 0xFE0F)
}

const EMOTICONS: &[&str] = &[
    ":)", ":-)", ":(", ":-(", ";)", ";-)", ":D", ":-D", ":P", ":p", "<3",
];

impl TextStats {
    /// Measures `text`.
    pub fn new(text: &str) -> Self {
        let chars: Vec<char> = text.chars().collect();
        let mut s = TextStats {
            function_words: vec![0.0; FUNCTION_WORDS.len()],
            chars: chars.len(),
            ..Default::default()
        };
        // Runs of whitespace count as one space in the n-grams: layout is measured apart.
        let mut squeezed: Vec<char> = Vec::with_capacity(chars.len() + 2);
        squeezed.push(' ');
        for &c in &chars {
            let c = if c.is_whitespace() { ' ' } else { c };
            if !(c == ' ' && squeezed.last() == Some(&' ')) {
                squeezed.push(c);
            }
        }
        if squeezed.last() != Some(&' ') {
            squeezed.push(' ');
        }
        for (k, &n) in ORDERS.iter().enumerate() {
            let mut all: Vec<u32> = squeezed.windows(n).map(bucket).collect();
            all.sort_unstable();
            let mut v: Vec<(u32, f32)> = Vec::with_capacity(all.len());
            for b in all {
                match v.last_mut() {
                    Some(last) if last.0 == b => last.1 += 1.0,
                    _ => v.push((b, 1.0)),
                }
            }
            s.grams[k] = v;
        }
        let fw_index: HashMap<&str, usize> = FUNCTION_WORDS
            .iter()
            .enumerate()
            .map(|(i, w)| (*w, i))
            .collect();
        let c = &mut s.counts;
        let mut long_words = 0usize;
        let mut word_chars = 0usize;
        for raw in text.split_whitespace() {
            let word = raw.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'');
            let letters: Vec<char> = word.chars().filter(|c| c.is_alphabetic()).collect();
            if EMOTICONS.contains(&raw) {
                c[15] += 1.0;
            }
            if word.is_empty() {
                continue;
            }
            s.words += 1;
            word_chars += word.chars().count();
            if word.chars().count() >= 7 {
                long_words += 1;
            }
            if letters.len() >= 2 && letters.iter().all(|c| c.is_uppercase()) {
                c[11] += 1.0;
            }
            if word == "i" {
                c[12] += 1.0;
            }
            let lower = word.to_lowercase();
            if BARE_CONTRACTIONS.contains(&lower.as_str()) {
                c[23] += 1.0;
            }
            if let Some(&i) = fw_index.get(lower.as_str()) {
                s.function_words[i] += 1.0;
            }
        }
        c[27] = long_words as f64;
        c[19] = word_chars as f64;
        // Sentences: split after . ! ? followed by whitespace, or at line breaks.
        let mut sentence_words = 0usize;
        let mut starts_lower = 0usize;
        let mut at_start = true;
        let mut lens: Vec<usize> = Vec::new();
        let mut in_word = false;
        for (i, &ch) in chars.iter().enumerate() {
            let next = chars.get(i + 1).copied();
            let prev = if i > 0 { Some(chars[i - 1]) } else { None };
            if ch.is_alphanumeric() {
                if !in_word {
                    sentence_words += 1;
                }
                if at_start && ch.is_alphabetic() {
                    if ch.is_lowercase() {
                        starts_lower += 1;
                    }
                    at_start = false;
                } else if at_start {
                    at_start = false;
                }
                in_word = true;
            } else {
                in_word = ch == '\'' && in_word;
            }
            if ch.is_alphabetic() {
                s.letters += 1;
                if ch.is_uppercase() {
                    c[10] += 1.0;
                }
            }
            match ch {
                ',' => c[0] += 1.0,
                '.' => {
                    if next == Some('.') && prev != Some('.') {
                        c[4] += 1.0;
                    } else if next != Some('.') && prev != Some('.') {
                        c[1] += 1.0;
                    }
                }
                '!' => c[2] += 1.0,
                '?' => c[3] += 1.0,
                '…' => c[4] += 1.0,
                '-' | '–' | '—'
                    if prev.is_none_or(char::is_whitespace)
                        || next.is_none_or(char::is_whitespace) =>
                {
                    c[5] += 1.0;
                }
                '(' | ')' => c[6] += 1.0,
                '"' | '“' | '”' => c[7] += 1.0,
                '\'' | '’' => c[8] += 1.0,
                ':' | ';' => c[9] += 1.0,
                '&' | '/' | '+' => c[26] += 1.0,
                '\n' => c[17] += 1.0,
                _ => {}
            }
            if ch.is_ascii_digit() {
                c[14] += 1.0;
            }
            if is_emoji(ch) {
                c[15] += 1.0;
            } else if !ch.is_ascii() {
                c[16] += 1.0;
            }
            if ch == ' ' && next == Some(' ') && prev != Some(' ') {
                c[18] += 1.0;
            }
            if matches!(ch, '!' | '?' | '.') && next == Some(ch) && prev != Some(ch) && ch != '.' {
                c[22] += 1.0;
            }
            if matches!(ch, ',' | '.' | '!' | '?' | ':' | ';')
                && prev == Some(' ')
                && next.is_none_or(|n| !n.is_alphanumeric())
            {
                c[24] += 1.0;
            }
            if matches!(ch, ',' | '!' | '?' | ';')
                && prev.is_some_and(char::is_alphanumeric)
                && next.is_some_and(char::is_alphabetic)
            {
                c[25] += 1.0;
            }
            if ch == '.'
                && prev.is_some_and(char::is_lowercase)
                && next.is_some_and(char::is_uppercase)
            {
                c[25] += 1.0;
            }
            let ends = matches!(ch, '.' | '!' | '?' | '…') && next.is_none_or(char::is_whitespace);
            if (ends || ch == '\n') && sentence_words > 0 {
                lens.push(sentence_words);
                sentence_words = 0;
                at_start = true;
            }
        }
        if sentence_words > 0 {
            lens.push(sentence_words);
        }
        s.sentences = lens.len();
        c[13] = starts_lower as f64;
        c[20] = lens.iter().sum::<usize>() as f64;
        s.sentence_len_sq = lens.iter().map(|&l| (l * l) as f64).sum();
        s
    }

    /// The rates of [`RATE_NAMES`] from summed counts.
    pub fn rates(
        counts: &[f64; RATES],
        words: usize,
        letters: usize,
        chars: usize,
        sentences: usize,
        len_sq: f64,
    ) -> [f64; RATES] {
        let w = words.max(1) as f64;
        let mut r = [0.0; RATES];
        for (i, v) in r.iter_mut().enumerate() {
            *v = counts[i] / w;
        }
        r[10] = counts[10] / letters.max(1) as f64;
        r[13] = counts[13] / sentences.max(1) as f64;
        r[14] = counts[14] / chars.max(1) as f64;
        r[16] = counts[16] / chars.max(1) as f64;
        r[19] = counts[19] / w;
        let n = sentences.max(1) as f64;
        let mean = counts[20] / n;
        r[20] = mean;
        r[21] = (len_sq / n - mean * mean).max(0.0).sqrt();
        r
    }

    /// This text's rates.
    pub fn own_rates(&self) -> [f64; RATES] {
        Self::rates(
            &self.counts,
            self.words,
            self.letters,
            self.chars,
            self.sentences,
            self.sentence_len_sq,
        )
    }
}

/// An author's documents summed: what a text is compared with.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// Summed n-gram counts per order.
    pub grams: [HashMap<u32, f32>; 3],
    /// Summed function-word counts.
    pub function_words: Vec<f32>,
    /// The profile's rates (of its summed counts).
    pub rates: [f64; RATES],
    /// Documents.
    pub documents: usize,
    /// Words in all.
    pub words: usize,
    /// Characters in all.
    pub chars: usize,
    /// Each document's character 3-gram counts.
    pub document_trigrams: Vec<HashMap<u32, f32>>,
}

impl Profile {
    /// Sums `documents`.
    pub fn new(documents: &[&TextStats]) -> Self {
        let mut p = Profile {
            function_words: vec![0.0; FUNCTION_WORDS.len()],
            documents: documents.len(),
            ..Default::default()
        };
        let mut counts = [0.0; RATES];
        let (mut letters, mut sentences, mut len_sq) = (0, 0, 0.0);
        for d in documents {
            for k in 0..ORDERS.len() {
                for &(b, n) in &d.grams[k] {
                    *p.grams[k].entry(b).or_default() += n;
                }
            }
            for (a, b) in p.function_words.iter_mut().zip(&d.function_words) {
                *a += b;
            }
            for (a, b) in counts.iter_mut().zip(&d.counts) {
                *a += b;
            }
            p.document_trigrams
                .push(d.grams[1].iter().copied().collect());
            p.words += d.words;
            p.chars += d.chars;
            letters += d.letters;
            sentences += d.sentences;
            len_sq += d.sentence_len_sq;
        }
        p.rates = TextStats::rates(&counts, p.words, letters, p.chars, sentences, len_sq);
        p
    }
}

/// TF-IDF cosine of a text's n-grams (order index `k`) with a profile's; `idf` by bucket.
pub fn tfidf_cosine(text: &[(u32, f32)], profile: &HashMap<u32, f32>, idf: &[f32]) -> f64 {
    let (mut dot, mut tt) = (0.0f64, 0.0f64);
    for &(b, n) in text {
        let w = f64::from(idf[b as usize]);
        let t = f64::from(n) * w;
        tt += t * t;
        if let Some(&m) = profile.get(&b) {
            dot += t * f64::from(m) * w;
        }
    }
    let pp: f64 = profile
        .iter()
        .map(|(&b, &m)| {
            let v = f64::from(m) * f64::from(idf[b as usize]);
            v * v
        })
        .sum();
    if tt == 0.0 || pp == 0.0 {
        0.0
    } else {
        dot / (tt.sqrt() * pp.sqrt())
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        dot += f64::from(*x) * f64::from(*y);
        aa += f64::from(*x) * f64::from(*x);
        bb += f64::from(*y) * f64::from(*y);
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        dot / (aa.sqrt() * bb.sqrt())
    }
}

/// Names of the features [`features`] returns, in order.
pub fn feature_names() -> Vec<String> {
    let mut names: Vec<String> = ORDERS
        .iter()
        .map(|n| format!("char_{n}gram_tfidf_cosine"))
        .collect();
    names.push("char_3gram_best_document_cosine".into());
    names.push("function_word_cosine".into());
    names.push("function_word_distance".into());
    names.extend(RATE_NAMES.iter().map(|r| format!("{r}_difference")));
    names.push("content_similarity".into());
    names.push("log_text_words".into());
    names.push("document_length_difference".into());
    names.push("log_profile_documents".into());
    names
}

/// The features of `text` against `profile`: n-gram TF-IDF cosines, function-word similarity,
/// each habit's absolute difference divided by its spread across documents (`rate_scale`), the
/// content similarity the caller measured (MiniLM cosine to the profile), and the lengths.
pub fn features(
    text: &TextStats,
    profile: &Profile,
    content_similarity: f32,
    idf: &[f32],
    rate_scale: &[f32],
) -> Vec<f64> {
    let mut f = Vec::with_capacity(8 + RATES);
    for k in 0..ORDERS.len() {
        f.push(tfidf_cosine(&text.grams[k], &profile.grams[k], idf));
    }
    // The profile's closest document: an author repeats phrasings across a few documents.
    f.push(
        profile
            .document_trigrams
            .iter()
            .map(|d| tfidf_cosine(&text.grams[1], d, idf))
            .fold(0.0, f64::max),
    );
    f.push(cosine(&text.function_words, &profile.function_words));
    let (tw, pw) = (
        text.function_words.iter().sum::<f32>().max(1.0),
        profile.function_words.iter().sum::<f32>().max(1.0),
    );
    let l1: f64 = text
        .function_words
        .iter()
        .zip(&profile.function_words)
        .map(|(a, b)| f64::from((a / tw - b / pw).abs()))
        .sum();
    f.push(l1);
    let rates = text.own_rates();
    for (i, (t, p)) in rates.iter().zip(&profile.rates).enumerate() {
        let scale = f64::from(rate_scale.get(i).copied().unwrap_or(1.0)).max(1e-6);
        f.push((t - p).abs() / scale);
    }
    f.push(f64::from(content_similarity));
    f.push((text.words as f64 + 1.0).ln());
    // The habit of writing long or short documents: the text's length in words against the
    // profile's mean document length (the profile's own size is no evidence of authorship).
    let mean_doc = profile.words as f64 / profile.documents.max(1) as f64;
    f.push(((text.words as f64 + 1.0).ln() - (mean_doc + 1.0).ln()).abs());
    f.push((profile.documents as f64).max(1.0).ln());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn habits_are_counted() {
        let s = TextStats::new("i love it!! dont buy the 2nd one... Great :)\nOK.");
        let r = s.own_rates();
        let at = |name: &str| r[RATE_NAMES.iter().position(|n| *n == name).unwrap()];
        assert!(at("lowercase_i") > 0.0);
        assert!(at("bare_contractions") > 0.0);
        assert!(at("repeated_punctuation") > 0.0);
        assert!(at("ellipses") > 0.0);
        assert!(at("emoji") > 0.0, "the emoticon");
        assert!(at("digits") > 0.0);
        assert!(at("all_caps_words") > 0.0, "OK");
        assert!(at("lowercase_sentence_starts") > 0.0);
        assert_eq!(s.sentences, 4, "{s:?}");
        assert_eq!(feature_names().len(), 3 + 3 + RATES + 4);
    }

    #[test]
    fn a_text_is_closest_to_itself() {
        let idf = vec![1.0; BUCKETS];
        let a = TextStats::new("These strings sound bright and stay in tune for weeks.");
        let b = TextStats::new("My cat sleeps all day on the warm windowsill, quietly.");
        let p = Profile::new(&[&a]);
        let same = tfidf_cosine(&a.grams[1], &p.grams[1], &idf);
        let other = tfidf_cosine(&b.grams[1], &p.grams[1], &idf);
        assert!((same - 1.0).abs() < 1e-9, "{same}");
        assert!(other < 0.5, "{other}");
    }
}
