//! The gRPC face of a stage whose work is embedding (the ranker, the synthesizer, and the
//! summarizer's SumCtx): its one error type and that error's one `Status`. The rest of the crate
//! knows nothing of gRPC; this module is compiled only with the `grpc` feature.

use ghostwriter_common::status::Invalid;
use tonic::Status;

use crate::EmbedError;

/// Why a call to a stage that embeds failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// A request field fails its check: INVALID_ARGUMENT.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The embedding model is loading (UNAVAILABLE: retry elsewhere or later) or failed
    /// (INTERNAL).
    #[error(transparent)]
    Embed(#[from] EmbedError),
}

impl From<StageError> for Status {
    fn from(e: StageError) -> Self {
        match e {
            StageError::Invalid(e) => e.into(),
            StageError::Embed(EmbedError::Loading) => Status::unavailable(e.to_string()),
            StageError::Embed(EmbedError::Failed(_)) => Status::internal(e.to_string()),
        }
    }
}
