//! Authorship verification served by the ranker: the style verifier (`ghostwriter-style`, its
//! shipped model) judges a text against the supposed author's profile documents, with this
//! stage's MiniLM embedder for the content-similarity feature (profile embeddings come from its
//! cache, so a user's history is embedded once).

use ghostwriter_embed::CachedEmbedder;
use ghostwriter_style::{Judgement, Verifier, content_similarity};

/// Profile documents a judgement takes at most.
pub const MAX_PROFILE_DOCUMENTS: usize = 16;

/// Why a judgement could not be made (not an abstention: a failure).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The embedder failed.
    #[error("embedding failed: {0}")]
    Embedding(String),
}

/// A document as the verifier reads it: title and body joined.
pub fn document_text(title: &str, text: &str) -> String {
    if title.trim().is_empty() {
        text.to_string()
    } else {
        format!("{}\n{}", title.trim(), text)
    }
}

/// Judges `text` against `profile` (the supposed author's documents, title and body joined).
pub fn verify(
    verifier: &Verifier,
    embedder: &CachedEmbedder,
    text: &str,
    profile: &[String],
) -> Result<Judgement, VerifyError> {
    if text.trim().is_empty() {
        return Err(VerifyError::Invalid("text is empty".into()));
    }
    if profile.len() > MAX_PROFILE_DOCUMENTS {
        return Err(VerifyError::Invalid(format!(
            "at most {MAX_PROFILE_DOCUMENTS} profile documents"
        )));
    }
    let refs: Vec<&str> = profile.iter().map(String::as_str).collect();
    // Abstentions need no embedding.
    if let Judgement::Abstained(a) = verifier.judge(text, &refs, 0.0) {
        return Ok(Judgement::Abstained(a));
    }
    let content = {
        let t = embedder
            .embed(&[text])
            .map_err(|e| VerifyError::Embedding(e.to_string()))?;
        let p = embedder
            .embed(&refs)
            .map_err(|e| VerifyError::Embedding(e.to_string()))?;
        content_similarity(&t[0], p.iter().map(|e| &e[..]))
    };
    Ok(verifier.judge(text, &refs, content))
}
