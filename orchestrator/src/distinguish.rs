//! `Distinguish`: did this user write this text?
//!
//! By default (`DISTINGUISH_METHOD_STYLE`) the whole text is judged against the user's profile —
//! their most recent documents written before it (up to 8, `max_documents` up to 16), not
//! documents chosen by topic — by the ranker's style verifier, which answers P(same author)
//! calibrated at a 1:1 prior, the top features with their contributions, or an abstention with
//! its reason when the text or the profile is too short. `DISTINGUISH_METHOD_LLM` keeps the
//! generator's author-distinction answer (the text's first 150 characters against each of the
//! best BM25 matches' first 600, averaged): at chance on unseen users, so only on request.

use std::time::Instant;

use ghostwriter_common::MAX_DOCUMENT_CHARS;
use ghostwriter_common::status::Invalid;
use ghostwriter_common::text::document_text;
use ghostwriter_proto::v1::generate_request::Input;
use ghostwriter_proto::v1::{
    DistinctionInput, DistinctionScore, DistinguishMethod, DistinguishRequest, DistinguishResponse,
    Document, GenerateRequest, RetrieveRequest, VerifyAuthorRequest,
};
use tonic::Request;

use crate::{DEFAULT_CONTEXT_CHARS, Error, OrchestratorService, check_ids, immediate_context};

/// Profile documents of the style verifier by default, and at most (either method).
const DEFAULT_STYLE_DOCUMENTS: u32 = 8;
/// Documents the LLM method compares by default.
const DEFAULT_LLM_DOCUMENTS: u32 = 4;
/// Most documents a request may ask for.
pub(crate) const MAX_DISTINGUISH_DOCUMENTS: u32 = 16;
/// Features a response lists.
const TOP_FEATURES: usize = 5;
/// Earlier documents fetched to find the most recent ones (the retriever orders unmatched
/// documents by recency only after its cut, so the whole history is fetched).
const HISTORY_FETCH: u32 = 10_000;

/// A distinction request, checked: ids, a text within the limits, a known method.
struct Distinction {
    request: DistinguishRequest,
    method: DistinguishMethod,
}

impl TryFrom<DistinguishRequest> for Distinction {
    type Error = Invalid;

    fn try_from(r: DistinguishRequest) -> Result<Self, Invalid> {
        check_ids(&r.user_id, &r.doc_id)?;
        if r.text.trim().is_empty() {
            return Err(Invalid::new("text", "text is empty"));
        }
        if r.text.chars().count() > MAX_DOCUMENT_CHARS {
            let message = format!("text is limited to {MAX_DOCUMENT_CHARS} characters");
            return Err(Invalid::new("text", message));
        }
        if r.max_documents > MAX_DISTINGUISH_DOCUMENTS {
            let message = format!("max_documents is limited to {MAX_DISTINGUISH_DOCUMENTS}");
            return Err(Invalid::new("max_documents", message));
        }
        let method = DistinguishMethod::try_from(r.method)
            .map_err(|_| Invalid::new("method", format!("unknown method {}", r.method)))?;
        Ok(Self { request: r, method })
    }
}

/// The `Distinguish` RPC.
pub(crate) async fn distinguish(
    service: &OrchestratorService,
    request: Request<DistinguishRequest>,
) -> Result<DistinguishResponse, Error> {
    let started = Instant::now();
    let deadline = service.deadline(request.metadata(), started);
    let grant = service.auth.grant(request.metadata())?;
    let Distinction { request: r, method } = request.into_inner().try_into()?;
    grant.allow(&r.user_id)?;
    match method {
        DistinguishMethod::Unspecified | DistinguishMethod::Style => {
            style(service, r, deadline).await
        }
        DistinguishMethod::Llm => llm(service, r, deadline).await,
    }
}

/// The user's documents from before the text (the best `limit` for `query`), read after the
/// request's consistency token.
async fn earlier(
    service: &OrchestratorService,
    r: &DistinguishRequest,
    query: String,
    limit: u32,
    deadline: Option<Instant>,
) -> Result<ghostwriter_proto::v1::RetrieveResponse, Error> {
    let consistency_token = service.read_token(&r.user_id, &r.consistency_token)?;
    let request = RetrieveRequest {
        user_id: r.user_id.clone(),
        query,
        before_timestamp: r.timestamp,
        current_doc_id: r.doc_id.clone(),
        limit,
        term_statistics: false,
        consistency_token,
    };
    service.stages.retrieve(request, deadline).await
}

/// The style verifier against the user's most recent earlier documents.
async fn style(
    service: &OrchestratorService,
    r: DistinguishRequest,
    deadline: Option<Instant>,
) -> Result<DistinguishResponse, Error> {
    let limit = match r.max_documents {
        0 => DEFAULT_STYLE_DOCUMENTS,
        n => n,
    } as usize;
    // No query: every earlier document scores alike; recency picks below.
    let retrieved = earlier(service, &r, String::new(), HISTORY_FETCH, deadline).await?;
    let mut history: Vec<Document> = retrieved
        .documents
        .into_iter()
        .filter_map(|c| c.document)
        .collect();
    history.sort_by(|a, b| (b.timestamp, &b.doc_id).cmp(&(a.timestamp, &a.doc_id)));
    history.truncate(limit);
    let profile_doc_ids: Vec<String> = history.iter().map(|d| d.doc_id.clone()).collect();
    let verdict = service
        .stages
        .verify_author(
            VerifyAuthorRequest {
                text: r.text,
                profile: history,
            },
            deadline,
        )
        .await?;
    Ok(DistinguishResponse {
        probability: verdict.probability.unwrap_or(0.5) as f32,
        documents: Vec::new(),
        model: verdict.model,
        method: DistinguishMethod::Style as i32,
        prior_same_author: verdict.prior_same_author,
        profile_documents: profile_doc_ids.len() as u32,
        profile_doc_ids,
        top_features: verdict.features.into_iter().take(TOP_FEATURES).collect(),
        abstained: verdict.probability.is_none(),
        abstention_reason: verdict.abstention_reason,
    })
}

/// The generator's answer against the best BM25 matches, averaged.
async fn llm(
    service: &OrchestratorService,
    r: DistinguishRequest,
    deadline: Option<Instant>,
) -> Result<DistinguishResponse, Error> {
    let limit = match r.max_documents {
        0 => DEFAULT_LLM_DOCUMENTS,
        n => n,
    };
    // As in training: the text's first 150 characters against an earlier document's first 600.
    let first = immediate_context("", &r.text, DEFAULT_CONTEXT_CHARS);
    let salt = service.salt.of(&r.user_id);
    let retrieved = earlier(service, &r, first.clone(), limit, deadline).await?;
    if retrieved.documents.is_empty() {
        return Err(Error::NoHistory);
    }
    let judged = retrieved
        .documents
        .iter()
        .filter_map(|c| c.document.as_ref())
        .map(|d| {
            let second: String = document_text(&d.title, &d.text)
                .trim()
                .chars()
                .take(600)
                .collect();
            let request = GenerateRequest {
                input: Some(Input::Distinction(DistinctionInput {
                    first: first.clone(),
                    second,
                })),
                params: None,
                cache_salt: salt.clone(),
                adapter: service.config.distinguish_adapter.clone(),
                ..Default::default()
            };
            let doc_id = d.doc_id.clone();
            async move {
                let g = service.stages.generate(request, deadline).await?;
                Ok::<_, Error>((doc_id, g))
            }
        });
    let judged = futures::future::try_join_all(judged).await?;
    let model = judged
        .first()
        .map(|(_, g)| g.model.clone())
        .unwrap_or_default();
    let documents: Vec<DistinctionScore> = judged
        .into_iter()
        .map(|(doc_id, g)| DistinctionScore {
            doc_id,
            probability: g.same_author_probability,
        })
        .collect();
    let probability = documents.iter().map(|d| d.probability).sum::<f32>() / documents.len() as f32;
    Ok(DistinguishResponse {
        probability,
        model,
        method: DistinguishMethod::Llm as i32,
        profile_documents: documents.len() as u32,
        profile_doc_ids: documents.iter().map(|d| d.doc_id.clone()).collect(),
        documents,
        ..Default::default()
    })
}
