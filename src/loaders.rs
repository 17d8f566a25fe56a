//! Reading documents from files: the neutral JSONL format
//! (`{"user_id","doc_id","timestamp","title","text"}`) and the original Amazon reviews format
//! (`reviewerID`, `asin`, `unixReviewTime`, `summary`, `reviewText`), plain or gzipped.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, bail};
use ghostwriter_proto::v1::Document;
use serde_json::Value;

/// Documents read from a file, and what was skipped.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Documents in file order.
    pub documents: Vec<Document>,
    /// Lines skipped because title and text were both empty.
    pub skipped_empty: usize,
}

fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn string(v: &Value, key: &str) -> String {
    match field(v, key) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// Parses one JSON line in either format.
pub fn parse_line(line: &str) -> anyhow::Result<Document> {
    let v: Value = serde_json::from_str(line)?;
    if field(&v, "reviewerID").is_some() {
        let user = string(&v, "reviewerID");
        return Ok(Document {
            doc_id: format!("{user}_{}", string(&v, "asin")),
            user_id: user,
            timestamp: field(&v, "unixReviewTime")
                .and_then(Value::as_i64)
                .unwrap_or_default(),
            title: string(&v, "summary"),
            text: string(&v, "reviewText"),
        });
    }
    if field(&v, "user_id").is_none() || field(&v, "doc_id").is_none() {
        bail!(
            "neither the neutral format (user_id, doc_id, ...) nor an Amazon review (reviewerID, ...)"
        );
    }
    Ok(Document {
        user_id: string(&v, "user_id"),
        doc_id: string(&v, "doc_id"),
        timestamp: field(&v, "timestamp")
            .and_then(Value::as_i64)
            .unwrap_or_default(),
        title: string(&v, "title"),
        text: string(&v, "text"),
    })
}

/// Reads every document of `path` (`.gz` is decompressed).
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut loaded = Loaded::default();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.with_context(|| format!("{}: reading line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let d = parse_line(&line).with_context(|| format!("{}: line {}", path.display(), i + 1))?;
        if d.title.trim().is_empty() && d.text.trim().is_empty() {
            loaded.skipped_empty += 1;
            continue;
        }
        loaded.documents.push(d);
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_formats() {
        let amazon = r#"{"reviewerID": "A1", "asin": "B2", "reviewerName": "x", "helpful": [0, 0], "reviewText": "Nice.", "overall": 5.0, "summary": "Good", "unixReviewTime": 1393545600, "reviewTime": "02 28, 2014"}"#;
        let d = parse_line(amazon).unwrap();
        assert_eq!(
            (d.user_id.as_str(), d.doc_id.as_str(), d.timestamp),
            ("A1", "A1_B2", 1393545600)
        );
        assert_eq!((d.title.as_str(), d.text.as_str()), ("Good", "Nice."));
        let neutral =
            r#"{"user_id": "u", "doc_id": "d", "timestamp": 5, "title": "t", "text": "x"}"#;
        assert_eq!(parse_line(neutral).unwrap().doc_id, "d");
        assert!(parse_line(r#"{"foo": 1}"#).is_err());
    }
}
