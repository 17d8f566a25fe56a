//! One trace per request: the orchestrator's span and every stage's span (over real gRPC hops,
//! the W3C trace context in the metadata) share one trace id.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};

use ghostwriter::proto::Document;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_every_stage() {
    let _slot = crate::common::slot(module_path!());
    let (provider, exporter) = common::telemetry();

    let dir = tempfile::tempdir().unwrap();
    let embedded = common::embedded(common::config(dir.path().join("index"))).await;
    let docs: Vec<Document> = (0..3)
        .map(|i| Document {
            user_id: "tracer".into(),
            doc_id: format!("t{i}"),
            timestamp: i,
            title: String::new(),
            text: format!(
                "The strap number {i} is comfortable on long gigs. It has wide leather ends."
            ),
        })
        .collect();
    common::ingest(&embedded.url(), &docs).await;
    exporter.reset();

    let mut client = common::client(&embedded.url()).await;
    client
        .write(common::short_write(
            "tracer",
            "This strap",
            "sum-ctx-ind",
            3,
        ))
        .await
        .unwrap();
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let mut by_trace: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &spans {
        if s.name.starts_with("ghostwriter.v1.") {
            by_trace
                .entry(s.span_context.trace_id().to_string())
                .or_default()
                .insert(s.name.to_string());
        }
    }
    let write = by_trace
        .values()
        .find(|names| names.contains("ghostwriter.v1.Ghostwriter/Write"))
        .unwrap_or_else(|| panic!("no Write span in {by_trace:?}"));
    for expected in [
        "ghostwriter.v1.Retriever/Retrieve",
        "ghostwriter.v1.Ranker/Rank",
        "ghostwriter.v1.Summarizer/Summarize",
        "ghostwriter.v1.Generator/Generate",
    ] {
        assert!(
            write.contains(expected),
            "{expected} is not in the Write's trace: {write:?} (all: {by_trace:?})"
        );
    }
    // The summarizer's own call to the generator is in the same trace: two Generate spans.
    let generates = spans
        .iter()
        .filter(|s| s.name == "ghostwriter.v1.Generator/Generate")
        .map(|s| s.span_context.trace_id())
        .collect::<Vec<_>>();
    assert_eq!(generates.len(), 2);
    assert_eq!(generates[0], generates[1]);
    embedded.shutdown().await;
}
