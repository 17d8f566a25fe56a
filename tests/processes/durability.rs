//! kill -9 durability of the retriever's index, as a regression test: a real
//! `ghostwriter serve retriever` process takes batches of documents through its own `Ingest`
//! RPC from concurrent writers, is killed with SIGKILL in the middle of the stream, and is
//! restarted on the same index directory, three times. After each restart:
//! - every document of every acknowledged batch (an OK answer) is retrievable;
//! - no batch is half stored: a batch that was in flight when the process died is there whole
//!   or not at all.
//!
//! Run: `cargo test --test processes durability:: -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ghostwriter::proto::retriever_client::RetrieverClient;
use ghostwriter::proto::{Document, IngestRequest, RetrieveRequest};
use tonic::transport::Channel;

use crate::common;

use common::{Rng, StageProcess};

/// Kill rounds.
const ROUNDS: usize = 3;
/// Acknowledged documents a round waits for before it kills the process.
const ACKED_PER_ROUND: u64 = 750;
/// Concurrent writers.
const WRITERS: usize = 4;
/// Users the documents spread over (each batch spans several).
const USERS: u64 = 11;
const SEED: u64 = 0x6b69_6c6c_2d39;

const WORDS: &[&str] = &[
    "strings", "guitar", "tuner", "pedal", "gig", "sound", "great", "cable", "strap", "amp",
    "fret", "capo", "bright", "warm", "noise", "stage", "bass", "drum", "reed", "valve",
];

/// One ingest batch: its (user, doc id) pairs and whether the server acknowledged it.
#[derive(Clone)]
struct Batch {
    round: usize,
    docs: Vec<(String, String)>,
    acked: bool,
}

/// Starts `serve retriever` on a loopback port of its choosing over `index`, and waits until
/// it serves. The process is killed (SIGKILL) when dropped.
async fn start(index: &std::path::Path, n: usize) -> (StageProcess, Duration) {
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ghostwriter"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--model-dir"])
        .arg(common::model_dir())
        .arg("retriever")
        .arg("--index-dir")
        .arg(index)
        .env("RUST_LOG", "warn");
    let mut r = common::start(&format!("retriever {n}"), cmd).await;
    common::wait_serving(&mut r, 60).await;
    (r, started.elapsed())
}

async fn client(url: &str) -> RetrieverClient<Channel> {
    RetrieverClient::new(
        Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .max_decoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(ghostwriter_common::MAX_MESSAGE_BYTES)
}

/// Writes batches from `WRITERS` concurrent tasks until `ACKED_PER_ROUND` documents are
/// acknowledged, then kills the process (SIGKILL) a few milliseconds later, mid-stream.
/// Returns every batch sent (acknowledged or not).
async fn storm(round: usize, retriever: StageProcess, rng: &mut Rng) -> Vec<Batch> {
    let next = Arc::new(AtomicU64::new(0));
    let acked_docs = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let batches: Arc<Mutex<BTreeMap<u64, Batch>>> = Arc::default();
    let c = client(retriever.url()).await;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (next, acked_docs, stop, batches) = (
            next.clone(),
            acked_docs.clone(),
            stop.clone(),
            batches.clone(),
        );
        let mut c = c.clone();
        let mut rng = Rng::new(SEED ^ ((round * WRITERS + w) as u64 + 1).wrapping_mul(0x9e37_79b9));
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let k = next.fetch_add(1, Ordering::SeqCst);
                let size = rng.range(10, 60) as u64;
                let documents: Vec<Document> = (0..size)
                    .map(|i| {
                        let words: Vec<&str> = (0..rng.range(8, 60))
                            .map(|_| WORDS[(rng.next_u64() % WORDS.len() as u64) as usize])
                            .collect();
                        Document {
                            user_id: format!("user-{}", (k * 7 + i) % USERS),
                            doc_id: format!("r{round}-b{k}-d{i}"),
                            timestamp: 1_600_000_000 + (k * 100 + i) as i64,
                            title: format!("Round {round} batch {k} document {i}"),
                            text: words.join(" "),
                        }
                    })
                    .collect();
                let docs: Vec<(String, String)> = documents
                    .iter()
                    .map(|d| (d.user_id.clone(), d.doc_id.clone()))
                    .collect();
                batches.lock().unwrap().insert(
                    k,
                    Batch {
                        round,
                        docs,
                        acked: false,
                    },
                );
                let mut request = tonic::Request::new(IngestRequest { documents });
                request.set_timeout(Duration::from_secs(30));
                match c.ingest(request).await {
                    Ok(response) => {
                        let ingested = response.into_inner().ingested as u64;
                        assert_eq!(ingested, size, "batch {k}: ingested {ingested} of {size}");
                        batches.lock().unwrap().get_mut(&k).unwrap().acked = true;
                        acked_docs.fetch_add(size, Ordering::SeqCst);
                    }
                    // The process is gone (or going): this batch is unacknowledged.
                    Err(_) => return,
                }
            }
        }));
    }
    let started = Instant::now();
    while acked_docs.load(Ordering::SeqCst) < ACKED_PER_ROUND {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "round {round}: only {} documents acknowledged in 120 s\n{}",
            acked_docs.load(Ordering::SeqCst),
            retriever.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Somewhere in the middle of the next batches (commits included).
    tokio::time::sleep(Duration::from_millis(rng.range(0, 40) as u64)).await;
    stop.store(true, Ordering::SeqCst);
    let mut retriever = retriever;
    retriever.kill();
    let status = retriever
        .try_wait()
        .expect("the retriever outlived SIGKILL");
    assert!(
        !status.success(),
        "the retriever exited by itself: {status}"
    );
    for w in writers {
        w.await.unwrap();
    }
    drop(retriever);
    let batches = batches.lock().unwrap();
    batches.values().cloned().collect()
}

/// Per-round figures of one verification.
#[derive(Default, Debug)]
struct Check {
    acked_batches: u64,
    acked_docs: u64,
    lost_docs: u64,
    unacked_batches: u64,
    unacked_stored_whole: u64,
    unacked_absent: u64,
    half_batches: u64,
}

/// Checks every batch so far against what the restarted retriever returns.
async fn verify(url: &str, batches: &[Batch]) -> BTreeMap<usize, Check> {
    let mut c = client(url).await;
    let users: BTreeSet<&str> = batches
        .iter()
        .flat_map(|b| b.docs.iter().map(|(u, _)| u.as_str()))
        .collect();
    let mut stored: BTreeSet<(String, String)> = BTreeSet::new();
    for user in users {
        let r = c
            .retrieve(RetrieveRequest {
                user_id: user.to_string(),
                query: String::new(),
                before_timestamp: Some(i64::MAX),
                current_doc_id: String::new(),
                limit: 10_000,
                term_statistics: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            r.documents.len() as u32 == r.total_history,
            "{user}: {} returned of {}",
            r.documents.len(),
            r.total_history
        );
        for d in r.documents {
            let d = d.document.unwrap();
            assert_eq!(d.user_id, user);
            stored.insert((d.user_id, d.doc_id));
        }
    }
    let mut checks: BTreeMap<usize, Check> = BTreeMap::new();
    for b in batches {
        let c = checks.entry(b.round).or_default();
        let present = b.docs.iter().filter(|d| stored.contains(*d)).count() as u64;
        let n = b.docs.len() as u64;
        if b.acked {
            c.acked_batches += 1;
            c.acked_docs += n;
            c.lost_docs += n - present;
        } else {
            c.unacked_batches += 1;
            if present == n {
                c.unacked_stored_whole += 1;
            } else if present == 0 {
                c.unacked_absent += 1;
            } else {
                c.half_batches += 1;
            }
        }
    }
    checks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_document_and_never_half_a_batch() {
    let _slot = crate::common::slot(module_path!());
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let index = dir.path().join("index");
    let mut rng = Rng::new(SEED);
    let mut all: Vec<Batch> = Vec::new();
    let (mut retriever, _) = start(&index, 0).await;
    let mut last = BTreeMap::new();
    for round in 0..ROUNDS {
        all.extend(storm(round, retriever, &mut rng).await);
        let (restarted, took) = start(&index, round + 1).await;
        retriever = restarted;
        let checks = verify(retriever.url(), &all).await;
        let c = &checks[&round];
        eprintln!(
            "durability round {}: SIGKILL after {} acknowledged batches ({} documents); {} \
             batches in flight: {} stored whole, {} absent, {} half; lost acknowledged \
             documents: {}; restart to SERVING {:.2}s",
            round + 1,
            c.acked_batches,
            c.acked_docs,
            c.unacked_batches,
            c.unacked_stored_whole,
            c.unacked_absent,
            c.half_batches,
            c.lost_docs,
            took.as_secs_f64()
        );
        // Every round so far, checked again after every restart.
        for (r, c) in &checks {
            assert_eq!(
                c.lost_docs,
                0,
                "FINDING: round {}: acknowledged documents lost after kill -9\n{}",
                r + 1,
                retriever.log_tail()
            );
            assert_eq!(
                c.half_batches,
                0,
                "FINDING: round {}: a batch half stored after kill -9\n{}",
                r + 1,
                retriever.log_tail()
            );
        }
        last = checks;
    }
    let acked: u64 = last.values().map(|c| c.acked_docs).sum();
    let acked_batches: u64 = last.values().map(|c| c.acked_batches).sum();
    let in_flight: u64 = last.values().map(|c| c.unacked_batches).sum();
    let whole: u64 = last.values().map(|c| c.unacked_stored_whole).sum();
    eprintln!(
        "durability: {ROUNDS} kill -9 rounds, {WRITERS} writers, {acked} acknowledged documents \
         in {acked_batches} batches, 0 lost; {in_flight} batches in flight at the kills \
         ({whole} stored whole, {} absent), 0 half stored; {:.1}s",
        in_flight - whole,
        started.elapsed().as_secs_f64()
    );
    assert!(acked >= 2_000, "only {acked} acknowledged documents");
}
