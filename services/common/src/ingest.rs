//! Ingest limits shared by the public API and the retriever: a batch is checked whole before
//! anything of it is written anywhere (the orchestrator checks before fanning out to shards, the
//! retriever again before indexing), and the bytes of batches being ingested are bounded per
//! process, so concurrent maximum-size batches cannot exhaust memory.

use std::sync::Arc;

use ghostwriter_proto::v1::Document;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::status::{Invalid, Overloaded};

/// Most documents in one batch.
pub const MAX_BATCH: usize = 10_000;
/// Longest user or document id, bytes.
pub const MAX_ID_BYTES: usize = 512;
/// Default ingest budget of a process, MiB of batches (their encoded size) in flight.
pub const DEFAULT_BUDGET_MB: usize = 256;
/// Checks one id (a user's or a document's, named `field`): not blank, at most
/// [`MAX_ID_BYTES`].
pub fn check_id(field: &str, id: &str) -> Result<(), Invalid> {
    if id.trim().is_empty() {
        return Err(Invalid::new(field, format!("{field} is empty")));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(Invalid::new(
            field,
            format!("{field} is limited to {MAX_ID_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Checks a batch whole: the first bad document rejects it, naming the document (its index and
/// id, quoted short), as a violation of the field `documents`.
pub fn check_batch(documents: &[Document]) -> Result<(), Invalid> {
    let invalid = |message: String| Err(Invalid::new("documents", message));
    if documents.is_empty() {
        return invalid("no documents to ingest".into());
    }
    if documents.len() > MAX_BATCH {
        return invalid(format!(
            "{} documents in one batch; at most {MAX_BATCH}",
            documents.len()
        ));
    }
    for (i, d) in documents.iter().enumerate() {
        let bad = |why: String| {
            invalid(format!(
                "document {i} ({}): {why}",
                crate::status::quote(&d.doc_id)
            ))
        };
        if d.user_id.trim().is_empty() {
            return bad("user_id is empty".into());
        }
        if d.doc_id.trim().is_empty() {
            return bad("doc_id is empty".into());
        }
        if d.user_id.len() > MAX_ID_BYTES || d.doc_id.len() > MAX_ID_BYTES {
            return bad(format!("ids are limited to {MAX_ID_BYTES} bytes"));
        }
        if d.title.trim().is_empty() && d.text.trim().is_empty() {
            return bad("title and text are both empty".into());
        }
        let chars = d.title.chars().count() + d.text.chars().count();
        if chars > crate::MAX_DOCUMENT_CHARS {
            return bad(format!(
                "{chars} characters; documents are limited to {}",
                crate::MAX_DOCUMENT_CHARS
            ));
        }
    }
    Ok(())
}

/// The ingest budget of one holder (the public API until every shard has a batch, the retriever
/// until it is stored): the encoded bytes of the batches it holds at once. Clones share it.
#[derive(Debug, Clone)]
pub struct IngestBudget {
    semaphore: Arc<Semaphore>,
    kib: usize,
}

impl Default for IngestBudget {
    fn default() -> Self {
        Self::new(DEFAULT_BUDGET_MB)
    }
}

impl IngestBudget {
    /// A budget of `mb` MiB (0 = the default).
    pub fn new(mb: usize) -> Self {
        let mb = if mb == 0 { DEFAULT_BUDGET_MB } else { mb };
        let kib = mb.saturating_mul(1024).min(Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(kib)),
            kib,
        }
    }

    /// [`Self::reserve`]s the encoded size of `request`.
    pub fn reserve_batch(
        &self,
        request: &ghostwriter_proto::v1::IngestRequest,
    ) -> Result<OwnedSemaphorePermit, Overloaded> {
        self.reserve(prost::Message::encoded_len(request))
    }

    /// Reserves `bytes` while the returned permit lives. A batch that does not fit now is
    /// [`Overloaded::Busy`]; one larger than the whole budget is told to split
    /// ([`Overloaded::TooLarge`]: retrying cannot help).
    pub fn reserve(&self, bytes: usize) -> Result<OwnedSemaphorePermit, Overloaded> {
        let kib = bytes.div_ceil(1024).max(1);
        if kib > self.kib {
            return Err(Overloaded::TooLarge(format!(
                "an ingest batch of {} MiB is larger than this process's ingest budget ({} MiB): \
                 split it",
                kib.div_ceil(1024),
                self.kib / 1024
            )));
        }
        self.semaphore
            .clone()
            .try_acquire_many_owned(kib as u32)
            .map_err(|_| {
                Overloaded::Busy(format!(
                    "the ingest budget ({} MiB of batches in flight) is in use; retry later",
                    self.kib / 1024
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_batches_in_flight() {
        use tonic_types::StatusExt;
        let (retriever, orchestrator) = (IngestBudget::new(1), IngestBudget::new(1));
        let first = retriever.reserve(600 << 10).unwrap();
        let refused = tonic::Status::from(retriever.reserve(600 << 10).unwrap_err());
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
        // Another holder has its own budget.
        drop(orchestrator.reserve(600 << 10).unwrap());
        drop(first);
        drop(retriever.reserve(600 << 10).unwrap());
        let whole = tonic::Status::from(retriever.reserve(2 << 20).unwrap_err());
        assert!(whole.message().contains("split it"), "{whole:?}");
        assert!(whole.get_details_retry_info().is_none());
    }

    #[test]
    fn batches_are_checked_whole() {
        let doc = |user: &str, id: &str, text: &str| Document {
            user_id: user.into(),
            doc_id: id.into(),
            text: text.into(),
            ..Default::default()
        };
        assert!(check_batch(&[doc("u", "1", "ok")]).is_ok());
        let e = check_batch(&[doc("u", "1", "ok"), doc("u", &"d".repeat(600), "ok")]).unwrap_err();
        assert_eq!(e.field, "documents");
        assert!(
            e.message.starts_with("document 1 (") && e.message.len() < 200,
            "{e}"
        );
        assert!(check_batch(&[]).is_err());
        assert!(check_batch(&[doc("", "1", "x")]).is_err());
        assert!(check_batch(&[doc("u", "1", " ")]).is_err());
    }
}
