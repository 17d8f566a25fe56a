//! Text units of the method: sentences and snippets (consecutive sentences appended until they
//! reach 250 characters or the document ends).

/// A document whole, as it is indexed, ranked, summarized and scored: its title (trimmed) and
/// body joined by a line break, or the body alone when the title is blank.
pub fn document_text(title: &str, body: &str) -> String {
    let title = title.trim();
    if title.is_empty() {
        body.to_string()
    } else {
        format!("{title}\n{body}")
    }
}

/// The paper's snippet length, in characters.
pub const SNIPPET_CHARS: usize = 250;

/// Sentences of `text`: split after `.`, `!` or `?` (runs of them, and closing quotes or
/// brackets) followed by white space, and at line breaks.
pub fn sentences(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut current = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        current.push(c);
        let ends = if matches!(c, '.' | '!' | '?') {
            while i + 1 < chars.len()
                && matches!(
                    chars[i + 1],
                    '.' | '!' | '?' | '"' | '\'' | ')' | '\u{201d}'
                )
            {
                i += 1;
                current.push(chars[i]);
            }
            i + 1 >= chars.len() || chars[i + 1].is_whitespace()
        } else {
            c == '\n'
        };
        if ends {
            let s = current.trim();
            if !s.is_empty() {
                out.push(s.to_string());
            }
            current.clear();
        }
        i += 1;
    }
    let s = current.trim();
    if !s.is_empty() {
        out.push(s.to_string());
    }
    out
}

/// Snippets of `text`: consecutive sentences joined until at least [`SNIPPET_CHARS`]
/// characters, or the end of the document.
pub fn snippets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for s in sentences(text) {
        if !current.is_empty() {
            current.push(' ');
        }
        current.push_str(&s);
        if current.chars().count() >= SNIPPET_CHARS {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Lower-cased words: runs of letters, digits and inner apostrophes; pure numbers are dropped
/// (they are not words of a voice).
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '\u{2019}'))
        .map(|w| {
            w.trim_matches(|c| c == '\'' || c == '\u{2019}')
                .replace('\u{2019}', "'")
                .to_lowercase()
        })
        .filter(|w| !w.is_empty() && w.chars().any(char::is_alphabetic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_join_a_trimmed_title_and_the_body() {
        assert_eq!(
            document_text(" Great ", "strings last"),
            "Great\nstrings last"
        );
        assert_eq!(document_text("  ", "strings last"), "strings last");
        assert_eq!(document_text("", ""), "");
    }

    #[test]
    fn splits_sentences() {
        assert_eq!(
            sentences("Great amp! Loud... really. Buy it?Yes"),
            vec!["Great amp!", "Loud...", "really.", "Buy it?Yes"]
        );
        assert_eq!(
            sentences("Title\nBody one. Body \"two.\" End"),
            vec!["Title", "Body one.", "Body \"two.\"", "End"]
        );
        assert!(sentences("   ").is_empty());
    }

    #[test]
    fn snippets_reach_250_characters_or_the_end() {
        let sentence = "This sentence is exactly fifty characters long ok.";
        let text = [sentence; 12].join(" ");
        let s = snippets(&text);
        assert_eq!(s.len(), 3);
        assert!(s[..2].iter().all(|x| x.chars().count() >= SNIPPET_CHARS));
        assert_eq!(
            s.concat().replace(' ', "").len(),
            text.replace(' ', "").len()
        );
        assert_eq!(snippets("Short one."), vec!["Short one."]);
    }
}
