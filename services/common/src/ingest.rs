//! Ingest limits shared by the public API and the retriever: a batch is checked whole before
//! anything of it is written anywhere (the orchestrator checks before fanning out to shards, the
//! retriever again before indexing), and the bytes of batches being ingested are bounded per
//! process, so concurrent maximum-size batches cannot exhaust memory.

use std::sync::OnceLock;

use ghostwriter_proto::v1::Document;
use tokio::sync::{Semaphore, SemaphorePermit};
use tonic::Status;

/// Most documents in one batch.
pub const MAX_BATCH: usize = 10_000;
/// Longest user or document id, bytes.
pub const MAX_ID_BYTES: usize = 512;
/// Default ingest budget of a process, MiB of batches (their encoded size) in flight.
pub const DEFAULT_BUDGET_MB: usize = 256;
/// Checks one id (a user's or a document's, named `field`): not blank, at most
/// [`MAX_ID_BYTES`].
pub fn check_id(field: &str, id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err(format!("{field} is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!("{field} is limited to {MAX_ID_BYTES} bytes"));
    }
    Ok(())
}

/// Checks a batch whole: the first bad document rejects it, naming the document (its index and
/// id, quoted short).
pub fn check_batch(documents: &[Document]) -> Result<(), String> {
    if documents.is_empty() {
        return Err("no documents to ingest".into());
    }
    if documents.len() > MAX_BATCH {
        return Err(format!(
            "{} documents in one batch; at most {MAX_BATCH}",
            documents.len()
        ));
    }
    for (i, d) in documents.iter().enumerate() {
        let bad = |why: String| {
            Err(format!(
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

/// Who holds ingest batches in a process: each has its own budget, so the orchestrator and the
/// retriever in one process (`up`) never wait on each other for the same batch.
#[derive(Debug, Clone, Copy)]
pub enum Holder {
    /// The public API, until every shard has the batch.
    Orchestrator = 0,
    /// The retriever, until the batch is indexed.
    Retriever = 1,
}

static BUDGETS: OnceLock<[(Semaphore, usize); 2]> = OnceLock::new();

/// Sets this process's ingest budget in MiB, per holder (the first call wins; 0 = the default).
pub fn configure_budget(mb: usize) {
    let mb = if mb == 0 { DEFAULT_BUDGET_MB } else { mb };
    let kib = mb.saturating_mul(1024).min(Semaphore::MAX_PERMITS);
    let _ = BUDGETS.set([(Semaphore::new(kib), kib), (Semaphore::new(kib), kib)]);
}

/// [`reserve`]s the encoded size of `request`.
pub fn reserve_batch(
    holder: Holder,
    request: &ghostwriter_proto::v1::IngestRequest,
) -> Result<SemaphorePermit<'static>, Status> {
    reserve(holder, prost::Message::encoded_len(request))
}

/// Reserves `bytes` of `holder`'s ingest budget while the returned permit lives. A batch that
/// does not fit now gets RESOURCE_EXHAUSTED with a RetryInfo; one larger than the whole budget
/// is told to split (RESOURCE_EXHAUSTED, without a RetryInfo: retrying cannot help).
pub fn reserve(holder: Holder, bytes: usize) -> Result<SemaphorePermit<'static>, Status> {
    if BUDGETS.get().is_none() {
        configure_budget(0);
    }
    let Some((semaphore, total)) = BUDGETS.get().map(|b| &b[holder as usize]) else {
        return Err(Status::internal("ingest budget unset"));
    };
    let kib = bytes.div_ceil(1024).max(1);
    if kib > *total {
        return Err(Status::resource_exhausted(format!(
            "an ingest batch of {} MiB is larger than this process's ingest budget ({} MiB): \
             split it",
            kib.div_ceil(1024),
            total / 1024
        )));
    }
    semaphore.try_acquire_many(kib as u32).map_err(|_| {
        crate::status::overloaded(format!(
            "the ingest budget ({} MiB of batches in flight) is in use; retry later",
            total / 1024
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_bounds_batches_in_flight() {
        use tonic_types::StatusExt;
        configure_budget(1); // 1 MiB per holder (the first call in this test binary)
        let first = reserve(Holder::Retriever, 600 << 10).unwrap();
        let refused = reserve(Holder::Retriever, 600 << 10).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
        // The other holder has its own budget.
        drop(reserve(Holder::Orchestrator, 600 << 10).unwrap());
        drop(first);
        drop(reserve(Holder::Retriever, 600 << 10).unwrap());
        let whole = reserve(Holder::Retriever, 2 << 20).unwrap_err();
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
        assert!(e.starts_with("document 1 (") && e.len() < 200, "{e}");
        assert!(check_batch(&[]).is_err());
        assert!(check_batch(&[doc("", "1", "x")]).is_err());
        assert!(check_batch(&[doc("u", "1", " ")]).is_err());
    }
}
