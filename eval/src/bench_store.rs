//! `bench-store`: the store against a throwaway Postgres on this machine, JSON out. Ingest
//! throughput into Postgres against the local index (the same reviews), a new replica's
//! catch-up rate from an empty volume, replication lag under a steady ingest, retrieval latency
//! of a replica against an index with no store, and retrieval latency, index size and store
//! size at a scale of one shard (synthetic users drawn from the reviews' lengths and history
//! sizes).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ghostwriter_retriever::{DocumentIndex, Follower, HistoryFilter, Shard, StoredDocument};
use ghostwriter_runtime::loaders;
use ghostwriter_store::{Document, Store, StoreArgs, cluster};
use serde_json::{Value, json};

/// Options of `bench-store`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchStoreArgs {
    /// The reviews (JSONL or Amazon .json.gz).
    #[arg(long, env = "GHOSTWRITER_BENCH_DATA", default_value_os_t = crate::bench::default_data())]
    pub data: std::path::PathBuf,
    /// Documents a new replica catches up on (synthetic users drawn from the reviews).
    #[arg(long, default_value_t = 100_000)]
    pub catch_up: usize,
    /// Documents of the one-shard scale measurement (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    pub scale: usize,
    /// Batches committed during the lag measurement (one every 20 ms).
    #[arg(long, default_value_t = 500)]
    pub lag_batches: usize,
    /// Retrievals timed per measurement.
    #[arg(long, default_value_t = 2_000)]
    pub retrievals: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn millis(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    json!({"p50_ms": percentile(&v, 0.5), "p99_ms": percentile(&v, 0.99), "n": v.len()})
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn to_store(d: &ghostwriter_proto::v1::Document) -> Document {
    Document {
        user_id: d.user_id.clone(),
        doc_id: d.doc_id.clone(),
        timestamp: d.timestamp,
        title: d.title.clone(),
        text: d.text.clone(),
    }
}

fn to_index(d: &Document) -> StoredDocument {
    StoredDocument {
        user_id: d.user_id.clone(),
        doc_id: d.doc_id.clone(),
        timestamp: d.timestamp,
        title: d.title.clone(),
        text: d.text.clone(),
    }
}

/// `n` synthetic documents: users whose history sizes are drawn from the reviews' users, each
/// document a real review (its length distribution) under a new id.
fn synthetic(reviews: &[Document], n: usize, seed: u64) -> Vec<Document> {
    let mut sizes: Vec<usize> = {
        let mut per_user = std::collections::HashMap::<&str, usize>::new();
        for d in reviews {
            *per_user.entry(&d.user_id).or_default() += 1;
        }
        per_user.into_values().collect()
    };
    sizes.sort();
    let mut rng = crate::Rng::new(seed);
    let mut next = move || rng.next_u64();
    let mut out = Vec::with_capacity(n);
    let mut user = 0usize;
    while out.len() < n {
        let size = sizes[next() as usize % sizes.len()];
        for k in 0..size.min(n - out.len()) {
            let r = &reviews[next() as usize % reviews.len()];
            out.push(Document {
                user_id: format!("s{seed}-u{user}"),
                doc_id: format!("d{k}"),
                timestamp: r.timestamp,
                title: r.title.clone(),
                text: r.text.clone(),
            });
        }
        user += 1;
    }
    out
}

async fn follow(store: &Arc<Store>, dir: &Path) -> anyhow::Result<(Arc<DocumentIndex>, Follower)> {
    let index = Arc::new(DocumentIndex::open(dir, 256_000_000)?);
    let follower = Follower::start(
        index.clone(),
        store.clone(),
        Shard::ALL,
        Duration::from_millis(1000),
        ghostwriter_common::shutdown::Shutdown::never(),
        ghostwriter_retriever::follow::StoreGauges::unregistered(),
    );
    Ok((index, follower))
}

async fn retrieval(
    index: &Arc<DocumentIndex>,
    users: &[String],
    queries: &[String],
    n: usize,
) -> Value {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let filter = HistoryFilter {
            user_id: users[i * 7919 % users.len()].clone(),
            before: i64::MAX,
            current_doc_id: String::new(),
        };
        let query = queries[i % queries.len()].clone();
        let index = index.clone();
        let t = Instant::now();
        let _ = tokio::task::spawn_blocking(move || index.retrieve(&filter, &query, 200)).await;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    millis(times)
}

/// Runs the benchmark; the JSON report.
pub async fn run(args: BenchStoreArgs) -> anyhow::Result<Value> {
    let pg = cluster::Cluster::start()?;
    let reviews: Vec<Document> = {
        let path = args.data.clone();
        let loaded = tokio::task::spawn_blocking(move || loaders::load(&path)).await??;
        loaded.documents.iter().map(to_store).collect()
    };
    let queries: Vec<String> = reviews
        .iter()
        .take(500)
        .map(|d| d.text.chars().take(150).collect())
        .collect();
    let work = tempfile::tempdir()?;
    let mut report = serde_json::Map::new();
    report.insert("documents".into(), json!(reviews.len()));

    // 1. Ingest throughput: Postgres against the local index, batches of 1,000.
    let store = Arc::new(Store::open(&StoreArgs::with_url(pg.database("ingest")?)).await?);
    let t = Instant::now();
    for batch in reviews.chunks(1000) {
        store.ingest(batch).await?;
    }
    let into_store = reviews.len() as f64 / t.elapsed().as_secs_f64();
    let local = Arc::new(DocumentIndex::open(
        &work.path().join("local"),
        256_000_000,
    )?);
    let t = Instant::now();
    for batch in reviews.chunks(1000) {
        let batch: Vec<StoredDocument> = batch.iter().map(to_index).collect();
        let local = local.clone();
        tokio::task::spawn_blocking(move || local.ingest(&batch)).await??;
    }
    let into_index = reviews.len() as f64 / t.elapsed().as_secs_f64();
    report.insert(
        "ingest_docs_per_s".into(),
        json!({"store_postgres": into_store, "embedded_index": into_index}),
    );

    // 2. Retrieval: a replica following the store against the index with no store (the same
    // documents; what a write's retrieval costs in each mode).
    let (replica, follower) = follow(&store, &work.path().join("replica")).await?;
    follower.ready().await;
    let users: Vec<String> = {
        let mut u: Vec<String> = reviews.iter().map(|d| d.user_id.clone()).collect();
        u.sort();
        u.dedup();
        u
    };
    report.insert(
        "retrieve".into(),
        json!({
            "store_replica": retrieval(&replica, &users, &queries, args.retrievals).await,
            "embedded_index": retrieval(&local, &users, &queries, args.retrievals).await,
        }),
    );

    // 3. Replication lag under a steady ingest: from a batch's acknowledged commit to the
    // follower having applied it (searchable).
    let mut lags = Vec::with_capacity(args.lag_batches);
    let steady = synthetic(&reviews, args.lag_batches * 10, 7);
    let mut progress = follower.progress();
    for batch in steady.chunks(10) {
        let written = store.ingest(batch).await?;
        let t = Instant::now();
        progress.wait_for(|p| p.position.has(written.token)).await?;
        lags.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    report.insert("replication_lag_commit_to_applied".into(), millis(lags));
    drop(follower);

    // 4. A new replica's catch-up from an empty volume.
    let store = Arc::new(Store::open(&StoreArgs::with_url(pg.database("catchup")?)).await?);
    for batch in synthetic(&reviews, args.catch_up, 11).chunks(1000) {
        store.ingest(batch).await?;
    }
    let t = Instant::now();
    let (_, follower) = follow(&store, &work.path().join("catchup")).await?;
    follower.ready().await;
    let took = t.elapsed().as_secs_f64();
    report.insert(
        "catch_up".into(),
        json!({"documents": args.catch_up, "seconds": took, "docs_per_s": args.catch_up as f64 / took}),
    );
    drop(follower);

    // 5. One shard at scale.
    if args.scale > 0 {
        let store = Arc::new(Store::open(&StoreArgs::with_url(pg.database("scale")?)).await?);
        let docs = synthetic(&reviews, args.scale, 13);
        let t = Instant::now();
        for batch in docs.chunks(1000) {
            store.ingest(batch).await?;
        }
        let ingest_s = t.elapsed().as_secs_f64();
        let users: Vec<String> = {
            let mut u: Vec<String> = docs.iter().map(|d| d.user_id.clone()).collect();
            u.dedup();
            u
        };
        drop(docs);
        let dir = work.path().join("scale");
        let t = Instant::now();
        let (index, follower) = follow(&store, &dir).await?;
        follower.ready().await;
        let rebuild_s = t.elapsed().as_secs_f64();
        let store_bytes: i64 = store
            .client()
            .await?
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await?
            .get(0);
        report.insert(
            "one_shard".into(),
            json!({
                "documents": args.scale,
                "users": users.len(),
                "ingest_into_store_s": ingest_s,
                "replica_rebuild_s": rebuild_s,
                "index_bytes": dir_bytes(&dir),
                "store_bytes": store_bytes,
                "store_bytes_per_million_documents": store_bytes as f64 * 1e6 / args.scale as f64,
                "retrieve": retrieval(&index, &users, &queries, args.retrievals).await,
            }),
        );
    }
    report.insert(
        "machine".into(),
        json!({"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)}),
    );
    Ok(Value::Object(report))
}
