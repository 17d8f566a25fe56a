//! Authorship verification served by the ranker: the style verifier (`ghostwriter-style`, its
//! shipped model) judges a text against the supposed author's profile documents, with this
//! stage's MiniLM embedder for the content-similarity feature (profile embeddings come from its
//! cache, so a user's history is embedded once).

use ghostwriter_common::status::Invalid;
use ghostwriter_embed::CachedEmbedder;
use ghostwriter_style::{Judgement, Verifier, content_similarity};

/// Profile documents a judgement takes at most.
pub const MAX_PROFILE_DOCUMENTS: usize = 16;

/// Checks a request before any work: a text, and at most [`MAX_PROFILE_DOCUMENTS`].
pub fn check(text: &str, profile_documents: usize) -> Result<(), Invalid> {
    if text.trim().is_empty() {
        return Err(Invalid::new("text", "text is empty"));
    }
    if profile_documents > MAX_PROFILE_DOCUMENTS {
        return Err(Invalid::new(
            "profile",
            format!("at most {MAX_PROFILE_DOCUMENTS} profile documents"),
        ));
    }
    Ok(())
}

/// Judges `text` against `profile` (the supposed author's documents, title and body joined by
/// `document_text`); the request was [`check`]ed. Fails only when the embedder does.
pub fn verify(
    verifier: &Verifier,
    embedder: &CachedEmbedder,
    text: &str,
    profile: &[String],
) -> anyhow::Result<Judgement> {
    let refs: Vec<&str> = profile.iter().map(String::as_str).collect();
    // Abstentions need no embedding.
    if let Judgement::Abstained(a) = verifier.judge(text, &refs, 0.0) {
        return Ok(Judgement::Abstained(a));
    }
    let t = embedder.embed(&[text])?;
    let p = embedder.embed(&refs)?;
    let content = content_similarity(&t[0], p.iter().map(|e| &e[..]));
    Ok(verifier.judge(text, &refs, content))
}
