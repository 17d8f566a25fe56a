//! Reading documents from files: the neutral JSONL format
//! (`{"user_id","doc_id","timestamp","title","text"}`), the original Amazon reviews format
//! (`reviewerID`, `asin`, `unixReviewTime`, `summary`, `reviewText`), plain or gzipped, and the
//! LaMP benchmark's question/profile JSON (`[{id, input, profile: [{id, title, text, date}]}]`
//! with outputs `{golds: [{id, output}]}`).

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

fn open(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// Whether `path` holds a LaMP questions file (a JSON array, not JSON lines).
fn is_lamp(path: &Path) -> anyhow::Result<bool> {
    let mut head = [0u8; 64];
    let n = open(path)?.read(&mut head)?;
    Ok(head[..n].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'['))
}

/// Reads every document of `path` (`.gz` is decompressed): JSON lines in the neutral or Amazon
/// format, or a LaMP questions file (its profiles become the documents).
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    if is_lamp(path)? {
        let lamp = load_lamp(path, None)?;
        return Ok(Loaded {
            documents: lamp.documents,
            skipped_empty: lamp.skipped_empty,
        });
    }
    let reader = open(path)?;
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

/// One LaMP question with its gold output, if the outputs file was given.
#[derive(Debug, Clone, PartialEq)]
pub struct LampQuestion {
    /// Question id (also the user id of its profile's documents).
    pub id: String,
    /// The task input.
    pub input: String,
    /// The gold output.
    pub output: Option<String>,
}

/// A LaMP split: the profiles as documents (user id = question id, since each question carries
/// its own user's profile) and the questions.
#[derive(Debug, Default)]
pub struct Lamp {
    /// Profile items as documents.
    pub documents: Vec<Document>,
    /// Questions, in file order.
    pub questions: Vec<LampQuestion>,
    /// Profile items with neither title nor text.
    pub skipped_empty: usize,
}

/// LaMP dates: `YYYY-MM-DD` (optionally with a time, ignored), or a number of seconds.
fn lamp_date(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Number(n)) => n.as_i64().unwrap_or_default(),
        Some(Value::String(s)) => {
            let mut parts = s
                .get(..10)
                .unwrap_or(s)
                .split('-')
                .map(|p| p.parse::<i64>().ok());
            match (
                parts.next().flatten(),
                parts.next().flatten(),
                parts.next().flatten(),
            ) {
                (Some(y), Some(m), Some(d)) => days_from_civil(y, m, d) * 86_400,
                _ => s.trim().parse().unwrap_or_default(),
            }
        }
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Reads a LaMP questions file and, when given, its outputs file.
pub fn load_lamp(questions: &Path, outputs: Option<&Path>) -> anyhow::Result<Lamp> {
    let parsed: Value = serde_json::from_reader(BufReader::new(open(questions)?))
        .with_context(|| format!("{}: not LaMP questions JSON", questions.display()))?;
    let items = parsed
        .as_array()
        .with_context(|| format!("{}: expected a JSON array", questions.display()))?;
    let golds: std::collections::HashMap<String, String> = match outputs {
        None => Default::default(),
        Some(path) => {
            let v: Value = serde_json::from_reader(BufReader::new(open(path)?))
                .with_context(|| format!("{}: not LaMP outputs JSON", path.display()))?;
            let golds = v
                .get("golds")
                .and_then(Value::as_array)
                .with_context(|| format!("{}: no golds", path.display()))?;
            golds
                .iter()
                .map(|g| (string(g, "id"), string(g, "output")))
                .collect()
        }
    };
    let mut lamp = Lamp::default();
    for (i, q) in items.iter().enumerate() {
        let id = string(q, "id");
        anyhow::ensure!(
            !id.is_empty(),
            "{}: question {i} has no id",
            questions.display()
        );
        let profile = q
            .get("profile")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (j, p) in profile.iter().enumerate() {
            let mut pid = string(p, "id");
            if pid.is_empty() {
                pid = format!("{j}");
            }
            let d = Document {
                user_id: id.clone(),
                doc_id: format!("{id}/{pid}"),
                timestamp: lamp_date(field(p, "date")),
                title: string(p, "title"),
                text: string(p, "text"),
            };
            if d.title.trim().is_empty() && d.text.trim().is_empty() {
                lamp.skipped_empty += 1;
            } else {
                lamp.documents.push(d);
            }
        }
        lamp.questions.push(LampQuestion {
            output: golds.get(&id).cloned(),
            id,
            input: string(q, "input"),
        });
    }
    Ok(lamp)
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

    #[test]
    fn reads_lamp_questions_and_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let questions = dir.path().join("dev_questions.json");
        let outputs = dir.path().join("dev_outputs.json");
        std::fs::write(
            &questions,
            r#"[{"id": "q1", "input": "Generate a headline for: rain in Lisbon", "profile": [
                 {"id": "p1", "title": "Sun returns", "text": "After a week of clouds...", "date": "2016-05-17"},
                 {"id": "p2", "title": "", "text": "", "date": "2016-05-18"},
                 {"id": "p3", "title": "Tram fares rise", "text": "Lisbon's trams...", "date": "1970-01-02"}]},
               {"id": "q2", "input": "Paraphrase: hello", "profile": []}]"#,
        )
        .unwrap();
        std::fs::write(
            &outputs,
            r#"{"task": "LaMP_4", "golds": [{"id": "q1", "output": "Lisbon braces for rain"}]}"#,
        )
        .unwrap();
        let lamp = load_lamp(&questions, Some(&outputs)).unwrap();
        assert_eq!(lamp.questions.len(), 2);
        assert_eq!(
            lamp.questions[0].output.as_deref(),
            Some("Lisbon braces for rain")
        );
        assert_eq!(lamp.questions[1].output, None);
        assert_eq!(lamp.skipped_empty, 1);
        let ids: Vec<&str> = lamp.documents.iter().map(|d| d.doc_id.as_str()).collect();
        assert_eq!(ids, vec!["q1/p1", "q1/p3"]);
        assert_eq!(lamp.documents[0].user_id, "q1");
        assert_eq!(lamp.documents[0].timestamp, 1_463_443_200);
        assert_eq!(lamp.documents[1].timestamp, 86_400);
        // `load` recognizes the format and returns the profiles as documents.
        assert_eq!(load(&questions).unwrap().documents.len(), 2);
    }
}
