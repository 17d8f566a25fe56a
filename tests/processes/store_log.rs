//! The store against a real, throwaway Postgres: the change order under concurrent writers (a
//! naive `seq > last` follower provably loses a change that the store's followers keep),
//! retention and snapshots, identity, migrations, TLS, password rotation, and Postgres down.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ghostwriter_store::{
    Change, Document, Error, Feed, Position, Store, StoreArgs, cluster, schema,
};

/// What a follower holds: (user, doc) -> (timestamp, title, text).
type Table = BTreeMap<(String, String), (i64, String, String)>;

fn table(documents: &[Document]) -> Table {
    documents
        .iter()
        .map(|d| {
            (
                (d.user_id.clone(), d.doc_id.clone()),
                (d.timestamp, d.title.clone(), d.text.clone()),
            )
        })
        .collect()
}

/// A follower applying the log to a map, as a replica applies it to its index.
struct Follower {
    position: Position,
    table: Table,
    rebuilds: usize,
}

impl Follower {
    fn new() -> Self {
        Self {
            position: Position::default(),
            table: Table::new(),
            rebuilds: 0,
        }
    }

    async fn rebuild(&mut self, store: &Store) {
        let mut snapshot = store.snapshot().await.unwrap();
        self.table.clear();
        while let Some(page) = snapshot.next(1000).await.unwrap() {
            self.table.extend(table(&page));
        }
        self.position = snapshot.position;
        self.rebuilds += 1;
    }

    /// Applies one page; returns whether it was caught up.
    async fn step(&mut self, store: &Store) -> bool {
        match store.read(&self.position, 500).await.unwrap() {
            Feed::Pruned { .. } => {
                self.rebuild(store).await;
                false
            }
            Feed::Page(page) => {
                for c in page.changes {
                    match c.change {
                        Change::Upsert(d) => {
                            self.table
                                .insert((d.user_id, d.doc_id), (d.timestamp, d.title, d.text));
                        }
                        Change::DeleteDocument { user_id, doc_id } => {
                            self.table.remove(&(user_id, doc_id));
                        }
                        Change::DeleteUser { user_id } => {
                            self.table.retain(|(u, _), _| *u != user_id);
                        }
                    }
                }
                assert!(page.position.watermark >= self.position.watermark);
                self.position = page.position;
                page.caught_up
            }
        }
    }

    async fn catch_up(&mut self, store: &Store) {
        let head = store.head().await.unwrap();
        while !(self.step(store).await && self.position.watermark >= head) {}
    }
}

fn doc(user: &str, id: &str, text: &str) -> Document {
    Document {
        user_id: user.into(),
        doc_id: id.into(),
        timestamp: 1,
        title: String::new(),
        text: text.into(),
    }
}

async fn open(url: &str) -> Store {
    Store::open(&StoreArgs::with_url(url)).await.unwrap()
}

use crate::common::Rng;

/// The follower that the crate's docs warn against: rows with a sequence above the last seen.
async fn naive_read(store: &Store, last: &mut i64, table: &mut Table) {
    let client = store.client().await.unwrap();
    let rows = client
        .query(
            "SELECT seq, kind, user_id, doc_id, timestamp, title, body FROM ghostwriter_changes \
             WHERE seq > $1 ORDER BY seq",
            &[last],
        )
        .await
        .unwrap();
    for r in rows {
        *last = r.get(0);
        let key = (r.get::<_, String>(2), r.get::<_, String>(3));
        match r.get::<_, i16>(1) {
            1 => {
                table.insert(
                    key,
                    (
                        r.get::<_, Option<i64>>(4).unwrap(),
                        r.get::<_, Option<String>>(5).unwrap(),
                        r.get::<_, Option<String>>(6).unwrap(),
                    ),
                );
            }
            2 => {
                table.remove(&key);
            }
            _ => table.retain(|(u, _), _| *u != key.0),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_equal_the_table_under_concurrent_writers_and_a_held_transaction() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let store = Arc::new(open(&url).await);

    // Two followers tail the log the whole time, woken by LISTEN, polling as the fallback.
    let done = Arc::new(AtomicBool::new(false));
    let mut followers = Vec::new();
    for _ in 0..2 {
        let store = store.clone();
        let done = done.clone();
        followers.push(tokio::spawn(async move {
            let mut f = Follower::new();
            let mut wake = store.listen().await.unwrap();
            let mut max_watermark_seen = Vec::new();
            while !done.load(Ordering::SeqCst) {
                if f.step(&store).await {
                    max_watermark_seen.push(f.position.watermark);
                    let _ = tokio::time::timeout(Duration::from_millis(50), wake.next()).await;
                }
            }
            f.catch_up(&store).await;
            (f, max_watermark_seen)
        }));
    }

    // The held transaction: it takes its id (and its sequence numbers), then waits while
    // later transactions commit.
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let held = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .ingest_with(
                    &[doc("held-user", "held-doc", "committed last")],
                    async move {
                        taken_tx.send(()).unwrap();
                        release_rx.await.unwrap();
                    },
                )
                .await
                .unwrap()
        })
    };
    taken_rx.await.unwrap();

    // 8 concurrent ingesters: 20,000 upserts and deletions over 300 users.
    const CHANGES: u64 = 20_000;
    const WRITERS: u64 = 8;
    let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        let counted = counted.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ (w + 1));
            let mut made = 0;
            while made < CHANGES / WRITERS {
                let user = format!("user{}", rng.below(300));
                match rng.below(100) {
                    0..=69 => {
                        let n = 1 + rng.below(6);
                        let batch: Vec<Document> = (0..n)
                            .map(|_| {
                                let id = format!("doc{}", rng.below(40));
                                let text = format!("w{w} change {made} of {id}");
                                doc(&user, &id, &text)
                            })
                            .collect();
                        store.ingest(&batch).await.unwrap();
                        made += n as u64;
                    }
                    70..=97 => {
                        let id = format!("doc{}", rng.below(40));
                        store.delete(&user, Some(&id)).await.unwrap();
                        made += 1;
                    }
                    _ => {
                        store.delete(&user, None).await.unwrap();
                        made += 1;
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // While the held transaction is open and later ones commit: the naive follower moves past
    // its sequence number, the store's followers' watermark stays at or below its id.
    let started = Instant::now();
    while counted.load(Ordering::SeqCst) < 200 {
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut naive_last = 0i64;
    let mut naive = Table::new();
    naive_read(&store, &mut naive_last, &mut naive).await;
    let naive_during_hold = naive_last;
    let during_hold = match store.read(&Position::default(), 1_000_000).await.unwrap() {
        Feed::Page(p) => p,
        Feed::Pruned { .. } => unreachable!("nothing was pruned"),
    };
    release_tx.send(()).unwrap();
    let written = held.await.unwrap();
    let held_seq: i64 = store
        .client()
        .await
        .unwrap()
        .query_one(
            "SELECT seq FROM ghostwriter_changes WHERE user_id = 'held-user'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // The naive follower had moved past the held transaction's sequence number before it
    // committed; the store's read stopped below its transaction id.
    assert!(
        naive_during_hold > held_seq,
        "{naive_during_hold} <= {held_seq}"
    );
    assert!(during_hold.position.watermark <= written.token.0);
    assert!(during_hold.changes.iter().all(|c| c.xid < written.token.0));
    for w in writers {
        w.await.unwrap();
    }
    naive_read(&store, &mut naive_last, &mut naive).await;
    done.store(true, Ordering::SeqCst);

    let expected = table(&store.documents().await.unwrap());
    assert!(expected.len() > 1000, "{} documents", expected.len());
    let held_key = ("held-user".to_string(), "held-doc".to_string());
    assert!(expected.contains_key(&held_key));
    assert!(
        !naive.contains_key(&held_key),
        "the naive follower must have skipped the transaction that committed late"
    );
    for f in followers {
        let (f, watermarks) = f.await.unwrap();
        assert!(f.position.watermark > written.token.0);
        let missing = expected
            .keys()
            .filter(|k| !f.table.contains_key(*k))
            .count();
        let extra = f
            .table
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .count();
        let different = expected
            .iter()
            .filter(|(k, v)| f.table.get(*k).is_some_and(|w| w != *v))
            .count();
        assert_eq!((missing, extra, different), (0, 0, 0));
        assert_eq!(f.table, expected);
        // Watermarks never pass the held transaction before it committed: the followers saw it.
        assert!(watermarks.windows(2).all(|w| w[0] <= w[1]));
        assert!(f.position.has(written.token));
    }
}

#[tokio::test]
async fn a_follower_behind_the_retention_rebuilds_from_a_snapshot() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let store = open(&url).await;
    store
        .ingest(&[doc("a", "1", "one"), doc("b", "1", "two")])
        .await
        .unwrap();
    let mut behind = Follower::new();
    behind.catch_up(&store).await;
    let mut fresh = Follower::new();
    store.ingest(&[doc("a", "2", "three")]).await.unwrap();
    store.delete("b", None).await.unwrap();
    store.delete("a", Some("1")).await.unwrap();
    assert!(store.prune(Duration::ZERO).await.unwrap() > 0);
    // A write in flight while the snapshot is taken comes through the log afterwards.
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let store = Arc::new(store);
    let held = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .ingest_with(&[doc("c", "1", "in flight")], async move {
                    taken_tx.send(()).unwrap();
                    release_rx.await.unwrap();
                })
                .await
                .unwrap()
        })
    };
    taken_rx.await.unwrap();
    assert!(matches!(
        store.read(&behind.position, 100).await.unwrap(),
        Feed::Pruned { .. }
    ));
    behind.catch_up(&store).await;
    fresh.rebuild(&store).await;
    release_tx.send(()).unwrap();
    held.await.unwrap();
    behind.catch_up(&store).await;
    fresh.catch_up(&store).await;
    let expected = table(&store.documents().await.unwrap());
    assert_eq!(expected.len(), 2);
    assert_eq!(behind.table, expected);
    assert_eq!(fresh.table, expected);
    assert_eq!(behind.rebuilds, 1);
    // The deleted texts are nowhere in the store.
    let client = store.client().await.unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM ghostwriter_changes WHERE body IN ('one', 'two')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

#[tokio::test]
async fn deletion_removes_the_text_from_the_log_too() {
    let Some((_slot, _pg, url)) = crate::common::postgres(module_path!()) else { return };
    let store = open(&url).await;
    store
        .ingest(&[
            doc("u", "1", "secret one"),
            doc("u", "2", "secret two"),
            doc("v", "1", "kept"),
        ])
        .await
        .unwrap();
    store
        .ingest(&[doc("u", "1", "secret one, edited")])
        .await
        .unwrap();
    assert_eq!(store.delete("u", Some("1")).await.unwrap().documents, 1);
    let body_count = |pattern: &'static str| {
        let store = &store;
        async move {
            let client = store.client().await.unwrap();
            client
                .query_one(
                    "SELECT (SELECT count(*) FROM ghostwriter_changes WHERE body LIKE $1) + \
                     (SELECT count(*) FROM ghostwriter_documents WHERE body LIKE $1)",
                    &[&pattern],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(body_count("secret one%").await, 0);
    assert_eq!(body_count("secret two").await, 2);
    assert_eq!(store.delete("u", None).await.unwrap().documents, 1);
    assert_eq!(body_count("secret%").await, 0);
    assert_eq!(body_count("kept").await, 2);
    // A follower from the start sees the tombstones and ends with v's document alone.
    let mut f = Follower::new();
    f.catch_up(&store).await;
    assert_eq!(f.table.len(), 1);
}

#[tokio::test]
async fn identity_tells_databases_and_clusters_apart() {
    let _slot = crate::common::slot(module_path!());
    let Some(pg) = cluster::for_test() else { return };
    let Some(other) = cluster::for_test() else { return };
    let a = open(&pg.database("a").unwrap()).await;
    let b = open(&pg.database("b").unwrap()).await;
    let c = open(&other.database("a").unwrap()).await;
    assert_eq!(a.identity().system_id, b.identity().system_id);
    assert_ne!(a.identity().store_id, b.identity().store_id);
    assert_ne!(a.identity().system_id, c.identity().system_id);
    // The same database, opened again, is the same store.
    let again = open(&pg.url("a")).await;
    assert_eq!(again.identity(), a.identity());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let Some((_slot, pg, url)) = crate::common::postgres(module_path!()) else { return };
    let opened = futures::future::join_all((0..6).map(|_| {
        let url = url.clone();
        tokio::spawn(async move { Store::open(&StoreArgs::with_url(url)).await })
    }))
    .await;
    let stores: Vec<Store> = opened.into_iter().map(|s| s.unwrap().unwrap()).collect();
    assert!(
        stores
            .windows(2)
            .all(|w| w[0].identity() == w[1].identity())
    );
    assert_eq!(
        pg.sql("gw", "SELECT version FROM ghostwriter_meta")
            .unwrap(),
        schema::SCHEMA_VERSION.to_string()
    );
    let client = stores[0].client().await.unwrap();
    schema::force_version(&client, schema::SCHEMA_VERSION + 1)
        .await
        .unwrap();
    match Store::open(&StoreArgs::with_url(url)).await {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!(
                (found, supported),
                (schema::SCHEMA_VERSION + 1, schema::SCHEMA_VERSION)
            );
        }
        other => panic!("a newer schema was not refused: {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_batch_stores_nothing_and_postgres_down_is_unavailable() {
    let Some((_slot, pg, url)) = crate::common::postgres(module_path!()) else { return };
    let store = open(&url).await;
    store.ingest(&[doc("u", "1", "first")]).await.unwrap();
    // Postgres refuses the third document (a NUL byte): the first two are not stored either.
    let err = store
        .ingest(&[
            doc("u", "2", "fine"),
            doc("u", "3", "fine"),
            doc("u", "4", "bad\0"),
        ])
        .await
        .unwrap_err();
    assert!(!err.is_unavailable(), "{err}");
    let documents = store.documents().await.unwrap();
    assert_eq!(documents.len(), 1);
    let changes = pg
        .sql("gw", "SELECT count(*) FROM ghostwriter_changes")
        .unwrap();
    assert_eq!(changes, "1");

    pg.stop().unwrap();
    let started = Instant::now();
    let err = store
        .ingest(&[doc("u", "5", "while down")])
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        store
            .delete("u", Some("1"))
            .await
            .unwrap_err()
            .is_unavailable()
    );
    pg.restart().unwrap();
    // Back: the pool reconnects; what was acknowledged is there once, nothing else.
    let mut tries = 0;
    let written = loop {
        match store.ingest(&[doc("u", "6", "after")]).await {
            Ok(w) => break w,
            Err(e) if e.is_unavailable() && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(written.documents, 1);
    let ids: Vec<String> = store
        .documents()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.doc_id)
        .collect();
    assert_eq!(ids, ["1", "6"]);
    let mut f = Follower::new();
    f.catch_up(&store).await;
    assert_eq!(f.table.len(), 2);
}

fn authority(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

#[tokio::test]
async fn tls_verify_full_checks_the_ca_and_the_host_name() {
    let _slot = crate::common::slot(module_path!());
    let (ca, cert, key) = authority(&["localhost", "127.0.0.1"]);
    let Some(pg) = cluster::for_test_with(cluster::Options {
        tls: Some((cert, key)),
    }) else {
        return;
    };
    pg.database("gw").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let args = |host: &str, ca: &std::path::Path| StoreArgs {
        ca: Some(ca.to_path_buf()),
        ..StoreArgs::with_url(format!(
            "postgres://postgres@{host}:{}/gw?sslmode=verify-full",
            pg.port()
        ))
    };
    let store = Store::open(&args("localhost", &ca_file)).await.unwrap();
    let client = store.client().await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    // Another CA: refused.
    let (other_ca, _, _) = authority(&["localhost"]);
    let other = dir.path().join("other.pem");
    std::fs::write(&other, other_ca).unwrap();
    let err = Store::open(&args("localhost", &other)).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // verify-full without a CA: a configuration error, before any connection.
    assert!(matches!(
        Store::open(&StoreArgs::with_url(format!(
            "postgres://postgres@localhost:{}/gw?sslmode=verify-full",
            pg.port()
        )))
        .await,
        Err(Error::Config(_))
    ));
}

#[tokio::test]
async fn a_rotated_password_file_is_read_again_for_new_connections() {
    let _slot = crate::common::slot(module_path!());
    let Some(pg) = cluster::for_test() else { return };
    pg.database("gw").unwrap();
    pg.sql("postgres", "CREATE ROLE app LOGIN PASSWORD 'first-secret'")
        .unwrap();
    pg.sql("postgres", "ALTER DATABASE gw OWNER TO app")
        .unwrap();
    pg.require_passwords().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, "first-secret\n").unwrap();
    let args = StoreArgs {
        password_file: Some(file.clone()),
        ..StoreArgs::with_url(format!("postgres://app@127.0.0.1:{}/gw", pg.port()))
    };
    assert!(!format!("{args:?}").contains("secret"));
    let store = Store::open(&args).await.unwrap();
    store.ingest(&[doc("u", "1", "x")]).await.unwrap();
    pg.sql("postgres", "ALTER ROLE app PASSWORD 'second-secret'")
        .unwrap();
    std::fs::write(&file, "second-secret\n").unwrap();
    // A new connection of the same store authenticates with the new password.
    store.listen().await.unwrap();
    let wrong = StoreArgs {
        password_file: None,
        ..args.clone()
    };
    let err = Store::open(&wrong).await.unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[tokio::test]
async fn key_locks_are_taken_before_the_transaction_has_an_id() {
    let _slot = crate::common::slot(module_path!());
    // The order's proof rests on this: a transaction waiting for (or holding) an advisory lock
    // has no transaction id yet; its first write takes one.
    let Some(pg) = cluster::for_test() else { return };
    let store = open(&pg.database("gw").unwrap()).await;
    let mut client = store.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("SELECT pg_advisory_xact_lock(42)", &[])
        .await
        .unwrap();
    let before: Option<String> = tx
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, None);
    tx.execute(
        "INSERT INTO ghostwriter_changes (kind, user_id) VALUES (3, 'x')",
        &[],
    )
    .await
    .unwrap();
    let after: Option<String> = tx
        .query_one("SELECT pg_current_xact_id_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert!(after.is_some());
    tx.rollback().await.unwrap();
}
