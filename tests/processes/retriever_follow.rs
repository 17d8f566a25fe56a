//! Retrievers following a real, throwaway Postgres: a wiped volume rebuilds, a restart resumes,
//! an index built against another database rebuilds, a deletion disappears from every replica,
//! Postgres down keeps retrieval serving and makes ingest UNAVAILABLE; without a store the
//! local index stays the store.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use ghostwriter_proto::v1::retriever_client::RetrieverClient;
use ghostwriter_proto::v1::{
    DeleteRequest, Document, IngestRequest, ReplicaRequest, ReplicaResponse, RetrieveRequest,
};
use ghostwriter_retriever::RetrieverConfig;
use ghostwriter_store::{StoreArgs, cluster};
use tonic::transport::Channel;

struct Retriever(crate::common::InProcess);

impl Retriever {
    async fn start(dir: &Path, store: Option<&str>) -> Self {
        Self::start_sharded(dir, store, None, 1).await
    }

    async fn start_sharded(
        dir: &Path,
        store: Option<&str>,
        shard: Option<u32>,
        shards: u32,
    ) -> Self {
        let config = RetrieverConfig {
            index_dir: dir.to_path_buf(),
            default_limit: 200,
            writer_mb: 32,
            store: StoreArgs {
                url: store.map(String::from),
                poll_ms: 200,
                ..StoreArgs::default()
            },
            max_lag_secs: 5.0,
            shards,
            shard,
            ingest_budget_mb: 0,
        };
        Self(
            crate::common::InProcess::start(Duration::from_secs(60), |l, shutdown| async move {
                ghostwriter_retriever::serve(config, l, shutdown, &Default::default()).await
            })
            .await,
        )
    }

    async fn client(&self) -> RetrieverClient<Channel> {
        RetrieverClient::new(ghostwriter_transport::client::channel(&self.0.url, None).unwrap())
    }

    async fn replica(&self) -> ReplicaResponse {
        self.client()
            .await
            .replica(ReplicaRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(self) {
        self.0.stop().await
    }
}

fn doc(user: &str, id: &str, text: &str) -> Document {
    Document {
        user_id: user.into(),
        doc_id: id.into(),
        timestamp: 10,
        title: String::new(),
        text: text.into(),
    }
}

async fn ingest(r: &Retriever, docs: Vec<Document>) -> String {
    r.client()
        .await
        .ingest(IngestRequest { documents: docs })
        .await
        .unwrap()
        .into_inner()
        .consistency_token
}

/// The doc ids of `user`'s history as `r` returns it, after the write of `token`.
async fn history(r: &Retriever, user: &str, token: &str) -> Vec<String> {
    let mut ids: Vec<String> = r
        .client()
        .await
        .retrieve(RetrieveRequest {
            user_id: user.into(),
            query: "guitar".into(),
            before_timestamp: Some(100),
            limit: 1000,
            consistency_token: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .documents
        .into_iter()
        .map(|d| d.document.unwrap().doc_id)
        .collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_and_a_wiped_volume_rebuilds_with_the_same_documents() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let r = Retriever::start(&index, Some(&url)).await;
    let docs: Vec<Document> = (0..300)
        .map(|i| doc(&format!("u{}", i % 7), &format!("d{i}"), "a guitar review"))
        .collect();
    let token = ingest(&r, docs).await;
    assert!(!token.is_empty());
    let before = history(&r, "u3", &token).await;
    assert_eq!(before.len(), 43);
    let first = r.replica().await;
    assert!(first.follows_store && first.caught_up);
    assert_eq!(first.rebuilds, 1, "a new index is built from the store");
    r.stop().await;

    // A restart resumes from the position the index recorded: no rebuild.
    let r = Retriever::start(&index, Some(&url)).await;
    let resumed = r.replica().await;
    assert_eq!(resumed.rebuilds, 0);
    assert_eq!(resumed.documents, 300);
    assert_eq!(history(&r, "u3", "").await, before);
    r.stop().await;

    // A wiped volume rebuilds from the store.
    std::fs::remove_dir_all(&index).unwrap();
    let r = Retriever::start(&index, Some(&url)).await;
    let rebuilt = r.replica().await;
    assert_eq!(rebuilt.rebuilds, 1);
    assert_eq!(rebuilt.documents, 300);
    assert_eq!(history(&r, "u3", "").await, before);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_built_against_another_database_rebuilds() {
    let _slot = crate::common::slot(module_path!());
    let Some(pg) = cluster::for_test() else { return };
    let a = pg.database("a").unwrap();
    let b = pg.database("b").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let r = Retriever::start(dir.path(), Some(&a)).await;
    ingest(&r, vec![doc("u", "from-a", "a guitar in a")]).await;
    let identity_a = r.replica().await.store_identity;
    r.stop().await;
    let other = tempfile::tempdir().unwrap();
    let rb = Retriever::start(other.path(), Some(&b)).await;
    let token = ingest(&rb, vec![doc("u", "from-b", "a guitar in b")]).await;
    rb.stop().await;
    let r = Retriever::start(dir.path(), Some(&b)).await;
    let replica = r.replica().await;
    assert_ne!(replica.store_identity, identity_a);
    assert_eq!(replica.rebuilds, 1);
    assert_eq!(history(&r, "u", &token).await, ["from-b"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_disappears_from_every_replica() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = Retriever::start(d1.path(), Some(&url)).await;
    let two = Retriever::start(d2.path(), Some(&url)).await;
    let token = ingest(
        &one,
        vec![
            doc("alice", "a1", "guitar one"),
            doc("alice", "a2", "guitar two"),
            doc("bob", "b1", "guitar three"),
        ],
    )
    .await;
    assert_eq!(history(&two, "alice", &token).await, ["a1", "a2"]);
    let deleted = two
        .client()
        .await
        .delete(DeleteRequest {
            user_id: "alice".into(),
            doc_id: "a1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    for r in [&one, &two] {
        assert_eq!(
            history(r, "alice", &deleted.consistency_token).await,
            ["a2"]
        );
    }
    let deleted = one
        .client()
        .await
        .delete(DeleteRequest {
            user_id: "alice".into(),
            doc_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    for r in [&one, &two] {
        assert!(
            history(r, "alice", &deleted.consistency_token)
                .await
                .is_empty()
        );
        assert_eq!(history(r, "bob", "").await, ["b1"]);
    }
    // Bad input: a blank user.
    let status = one
        .client()
        .await
        .delete(DeleteRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_keeps_retrieval_and_refuses_ingest_with_unavailable() {
    let Some((_slot, pg, url)) = crate::common::postgres(module_path!()) else { return };
    let dir = tempfile::tempdir().unwrap();
    let r = Retriever::start(dir.path(), Some(&url)).await;
    let token = ingest(&r, vec![doc("u", "1", "guitar before")]).await;
    assert_eq!(history(&r, "u", &token).await, ["1"]);
    pg.stop().unwrap();
    let status = r
        .client()
        .await
        .ingest(IngestRequest {
            documents: vec![doc("u", "2", "guitar while down")],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Retrieval keeps serving from the index, and health stays SERVING past --max-lag.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(history(&r, "u", "").await, ["1"]);
    ghostwriter_transport::client::wait_until_serving(&r.0.url, "", Duration::from_secs(1), None)
        .await
        .unwrap();
    pg.restart().unwrap();
    let started = Instant::now();
    let token = loop {
        match r
            .client()
            .await
            .ingest(IngestRequest {
                documents: vec![doc("u", "3", "guitar after")],
            })
            .await
        {
            Ok(t) => break t.into_inner().consistency_token,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(started.elapsed() < Duration::from_secs(30), "{s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    // Nothing lost, nothing doubled.
    assert_eq!(history(&r, "u", &token).await, ["1", "3"]);
    assert_eq!(r.replica().await.documents, 2);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_store_the_local_index_is_the_store() {
    let _slot = crate::common::slot(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let r = Retriever::start(dir.path(), None).await;
    let token = ingest(&r, vec![doc("u", "1", "guitar"), doc("u", "2", "guitar")]).await;
    assert!(
        token.is_empty(),
        "no store, no token: writes are visible at once"
    );
    let replica = r.replica().await;
    assert!(!replica.follows_store);
    let deleted = r
        .client()
        .await
        .delete(DeleteRequest {
            user_id: "u".into(),
            doc_id: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.deleted, 1);
    assert_eq!(history(&r, "u", "").await, ["2"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_shard_count_backfills_from_the_store() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let users: Vec<String> = (0..30).map(|i| format!("user{i}")).collect();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Two shards.
    let mut two = Vec::new();
    for (s, dir) in dirs.iter().take(2).enumerate() {
        two.push(Retriever::start_sharded(dir.path(), Some(&url), Some(s as u32), 2).await);
    }
    let docs: Vec<Document> = users
        .iter()
        .flat_map(|u| (0..4).map(move |i| doc(u, &format!("d{i}"), "guitar")))
        .collect();
    let token = ingest(&two[0], docs).await;
    let mut per_shard = 0;
    for r in &two {
        history(r, "user0", &token).await;
        per_shard += r.replica().await.documents;
    }
    assert_eq!(per_shard, 120);
    for r in two {
        r.stop().await;
    }
    // Three shards over the same store and volumes: every user's history is complete on the
    // shard that now owns it, with no re-ingest.
    let mut three = Vec::new();
    for (s, dir) in dirs.iter().enumerate() {
        three.push(Retriever::start_sharded(dir.path(), Some(&url), Some(s as u32), 3).await);
    }
    let mut total = 0;
    for r in &three {
        total += r.replica().await.documents;
    }
    assert_eq!(total, 120);
    for u in &users {
        let owner = ghostwriter_discovery::shard_of(u, 3) as usize;
        assert_eq!(history(&three[owner], u, "").await.len(), 4, "{u}");
    }
    for r in three {
        r.stop().await;
    }
}
