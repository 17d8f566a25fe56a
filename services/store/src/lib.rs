//! The system of record: users' documents in Postgres, and the append-only change log that
//! retriever replicas follow to keep their indexes (derived, rebuildable) equal to it.
//!
//! A write (an ingest batch, a deletion) is one Postgres transaction: it updates the documents
//! table and appends its changes to `ghostwriter_changes`, or does neither. A replica reads the
//! log in pages ([`Store::read`]) from its [`Position`], applies each page to its index, and
//! records the position beside it; a replica with no index, one further behind than the log's
//! retention, or one built against another database rebuilds from a [`Snapshot`].
//!
//! # Why the change order is safe under concurrent writers
//!
//! The log is ordered by `(xid, seq)`: the writing transaction's id (`pg_current_xact_id()`),
//! then a sequence inside it. A follower reads only changes of transactions whose id is below
//! the *watermark*, `pg_snapshot_xmin(pg_current_snapshot())` of the reading transaction: the id
//! of the oldest transaction still running. Two facts make that order both complete and correct:
//!
//! 1. **No change is ever skipped.** Every transaction with an id below the watermark has ended
//!    at the reader's snapshot: its changes are visible in that snapshot (committed) or never
//!    will be (aborted). No transaction can take an id below it later: ids are handed out in
//!    increasing order, and a transaction that has none yet gets one at or above the snapshot's
//!    `xmax`. So once a follower has read every row with `xid < watermark`, no such row can
//!    appear afterwards. A follower that reads "rows with a sequence number above the last one I
//!    saw" (a `bigserial`) has no such guarantee: a transaction that drew sequence 100 and
//!    commits after another drew 101 and committed is skipped for good, because the follower
//!    has moved past 101 already. Here the long transaction holds the watermark down until it
//!    ends, and the rows after it wait.
//! 2. **Per document, the order is the commit order.** Two transactions that write the same
//!    document (or the same user, for a user's deletion) first take `pg_advisory_xact_lock`s on
//!    its key, before their first write, and a transaction gets its id only at its first write.
//!    The second transaction to lock waits until the first has committed and only then takes
//!    its id: for any two transactions that touch the same key, id order is commit order.
//!    Transactions that touch disjoint keys commute. Applying changes in `(xid, seq)` order
//!    therefore reaches exactly the documents table's state. (The locks are taken in one
//!    statement in ascending key order, so writers cannot deadlock on them.)
//!
//! The order is global, not per shard: a replica keeps its shard's users of every change, so
//! changing the shard count needs no change to the log, only rebuilt replicas.
//!
//! A long write transaction on the same database (ours or anyone's) holds the watermark and so
//! delays every follower: give Ghostwriter a database of its own.

pub mod cluster;
mod connect;
pub mod schema;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use connect::Target;
pub use connect::{StoreArgs, redact};

/// The `NOTIFY` channel a commit wakes replicas on.
pub const CHANNEL: &str = "ghostwriter_changes";

/// `pg_advisory_xact_lock` key of the pruning (one pruner at a time).
const PRUNE_LOCK: i64 = 0x6777_2d70_7275_6e65;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong (URL, TLS, password file): said at start-up.
    #[error("store configuration: {0}")]
    Config(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Postgres cannot be reached, or the connection broke: nothing was stored.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A statement ran past the statement timeout: nothing was stored.
    #[error("the store did not answer in time: {0}")]
    Timeout(String),
    /// The database's schema is newer than this binary.
    #[error(
        "the store's schema is version {found}, newer than this binary's {supported}: run a newer Ghostwriter"
    )]
    SchemaTooNew {
        /// The database's version.
        found: i32,
        /// This binary's.
        supported: i32,
    },
    /// Anything else Postgres answered.
    #[error("store error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether a caller may retry (on this replica later, or another).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Timeout(_))
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let message = db.message().to_string();
            return match code {
                // query_canceled: the statement timeout.
                "57014" => Error::Timeout(message),
                // Connection exceptions, shutdowns, too many connections, out of resources,
                // a read-only standby, a deadlock or serialization failure (retryable).
                c if c.starts_with("08")
                    || c.starts_with("57P")
                    || c.starts_with("53")
                    || c == "25006"
                    || c == "40001"
                    || c == "40P01" =>
                {
                    Error::Unavailable(message)
                }
                _ => Error::Internal(message),
            };
        }
        // No server answer: the connection failed or closed (refused, reset, TLS, timeout).
        Error::Unavailable(e.to_string())
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => Error::Unavailable(other.to_string()),
        }
    }
}

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Author.
    pub user_id: String,
    /// Id, unique per user.
    pub doc_id: String,
    /// Unix seconds.
    pub timestamp: i64,
    /// Title (may be empty).
    pub title: String,
    /// Body.
    pub text: String,
}

/// One change of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The document was stored (replacing any with its `(user_id, doc_id)`).
    Upsert(Document),
    /// A tombstone: the document was deleted.
    DeleteDocument {
        /// Author.
        user_id: String,
        /// Id.
        doc_id: String,
    },
    /// Every document of the user was deleted.
    DeleteUser {
        /// The user.
        user_id: String,
    },
}

impl Change {
    /// The user the change is about.
    pub fn user_id(&self) -> &str {
        match self {
            Change::Upsert(d) => &d.user_id,
            Change::DeleteDocument { user_id, .. } | Change::DeleteUser { user_id } => user_id,
        }
    }
}

/// A change with its place in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// The writing transaction's id.
    pub xid: u64,
    /// Its order inside the transaction (and across the log, unique).
    pub seq: i64,
    /// What changed.
    pub change: Change,
}

/// How far a follower has applied the log: every change at or before `(xid, seq)`, and every
/// change of a transaction with an id below `watermark`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// Transaction id of the last change applied.
    pub xid: u64,
    /// Its sequence number.
    pub seq: i64,
    /// Every transaction below this id is applied (or aborted).
    pub watermark: u64,
}

impl Position {
    /// The position that has applied everything below `watermark` and nothing at or above it.
    pub fn at_watermark(watermark: u64) -> Self {
        Self {
            xid: watermark.saturating_sub(1),
            seq: i64::MAX,
            watermark,
        }
    }

    /// Whether a write whose [`Token`] is `token` is applied.
    pub fn has(&self, token: Token) -> bool {
        self.watermark > token.0
    }

    /// `xid:seq:watermark`, as an index records it.
    pub fn encode(&self) -> String {
        format!("{}:{}:{}", self.xid, self.seq, self.watermark)
    }

    /// The inverse of [`Self::encode`].
    pub fn decode(s: &str) -> Option<Self> {
        let mut it = s.split(':');
        let p = Self {
            xid: it.next()?.parse().ok()?,
            seq: it.next()?.parse().ok()?,
            watermark: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(p)
    }
}

pub use ghostwriter_common::consistency::Token;

/// Which database a store is: Postgres's system identifier (different for every cluster
/// `initdb` made, the same for its physical replicas and backups) and the id created with the
/// schema (different for every database, also a logical restore into a fresh one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `pg_control_system().system_identifier`.
    pub system_id: u64,
    /// `ghostwriter_meta.store_id`.
    pub store_id: String,
}

impl Identity {
    /// `system_id/store_id`, as an index records it.
    pub fn encode(&self) -> String {
        format!("{}/{}", self.system_id, self.store_id)
    }
}

/// What a write committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Its consistency token.
    pub token: Token,
    /// Documents stored (an ingest) or removed (a deletion).
    pub documents: u64,
}

/// One read of the log.
#[derive(Debug, Clone)]
pub enum Feed {
    /// Changes after the position, in order.
    Page(Page),
    /// The position is older than the log's retention: rebuild from a [`Snapshot`].
    Pruned {
        /// The log's changes start at this transaction id.
        pruned_below: u64,
    },
}

/// Changes after a position, in order.
#[derive(Debug, Clone)]
pub struct Page {
    /// The changes, at most the limit asked for.
    pub changes: Vec<Logged>,
    /// The position once they are applied.
    pub position: Position,
    /// Whether the page reached the watermark of its read (no more changes were safe to read).
    pub caught_up: bool,
    /// With `caught_up`: how old the oldest committed change not yet safe to read was (zero
    /// when there was none), by Postgres's clock.
    pub lag: Option<Duration>,
}

/// The store: a pool of connections to Postgres, its schema migrated.
pub struct Store {
    target: Arc<Target>,
    pool: Pool,
    identity: Identity,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.target.display)
            .field("identity", &self.identity)
            .finish()
    }
}

/// Advisory-lock key of a user (`shared` by document writes, exclusive by a user's deletion) or
/// of one of its documents (exclusive): FNV-1a, stable across processes and versions.
fn lock_key(user: &str, doc: Option<&str>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    };
    match doc {
        None => eat(b"u\0"),
        Some(_) => eat(b"d\0"),
    }
    eat(user.as_bytes());
    if let Some(d) = doc {
        eat(b"\0");
        eat(d.as_bytes());
    }
    h as i64
}

/// The locks of a write, in the one global order (ascending key); a key wanted both shared and
/// exclusive is taken exclusive.
fn lock_plan(locks: impl IntoIterator<Item = (i64, bool)>) -> (Vec<i64>, Vec<bool>) {
    let mut map = std::collections::BTreeMap::<i64, bool>::new();
    for (key, shared) in locks {
        let e = map.entry(key).or_insert(shared);
        *e = *e && shared;
    }
    map.into_iter().unzip()
}

/// Takes every lock of the plan in one statement, in array order (a function scan yields the
/// array in order, and the aggregate consumes it in that order).
const LOCK: &str = "SELECT count(CASE WHEN s THEN pg_advisory_xact_lock_shared(k)::text \
                    ELSE pg_advisory_xact_lock(k)::text END) \
                    FROM unnest($1::int8[], $2::bool[]) AS t(k, s)";

impl Store {
    /// Connects to the store of `args`, creates or migrates its schema (refusing a newer one),
    /// and reads its identity.
    pub async fn open(args: &StoreArgs) -> Result<Self, Error> {
        let target = Arc::new(Target::new(args)?);
        let (mut client, _) = target.connect().await?;
        schema::migrate(&mut client).await?;
        let identity = identity(&client).await?;
        let pool = target.pool(args.pool_size)?;
        tracing::info!(store = %target.display, system_id = identity.system_id, store_id = %identity.store_id, "store open");
        Ok(Self {
            target,
            pool,
            identity,
        })
    }

    /// Which database this is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The store's URL without its password.
    pub fn display(&self) -> &str {
        &self.target.display
    }

    /// Stores a batch whole (upserts by `(user_id, doc_id)`; a batch naming one twice keeps the
    /// last), and answers once it has committed.
    pub async fn ingest(&self, documents: &[Document]) -> Result<Written, Error> {
        self.ingest_with(documents, async {}).await
    }

    /// [`Self::ingest`], running `before_commit` after the batch is written (its transaction id
    /// taken) and before it commits: tests hold a transaction open with it.
    pub async fn ingest_with(
        &self,
        documents: &[Document],
        before_commit: impl Future<Output = ()>,
    ) -> Result<Written, Error> {
        if documents.is_empty() {
            return Err(Error::InvalidArgument("no documents to store".into()));
        }
        // The last occurrence of a key wins, in the batch's order otherwise.
        let mut last = std::collections::HashMap::new();
        for (i, d) in documents.iter().enumerate() {
            last.insert((d.user_id.as_str(), d.doc_id.as_str()), i);
        }
        let batch: Vec<&Document> = documents
            .iter()
            .enumerate()
            .filter(|(i, d)| last[&(d.user_id.as_str(), d.doc_id.as_str())] == *i)
            .map(|(_, d)| d)
            .collect();
        let (keys, shared) = lock_plan(batch.iter().flat_map(|d| {
            [
                (lock_key(&d.user_id, None), true),
                (lock_key(&d.user_id, Some(&d.doc_id)), false),
            ]
        }));
        let users: Vec<&str> = batch.iter().map(|d| d.user_id.as_str()).collect();
        let ids: Vec<&str> = batch.iter().map(|d| d.doc_id.as_str()).collect();
        let times: Vec<i64> = batch.iter().map(|d| d.timestamp).collect();
        let titles: Vec<&str> = batch.iter().map(|d| d.title.as_str()).collect();
        let bodies: Vec<&str> = batch.iter().map(|d| d.text.as_str()).collect();

        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // 1. The keys' locks, before any write: the transaction has no id yet.
        tx.query_one(LOCK, &[&keys, &shared]).await?;
        // 2. The log: the first write, which takes the transaction's id.
        tx.execute(
            "INSERT INTO ghostwriter_changes (kind, user_id, doc_id, timestamp, title, body) \
             SELECT 1, u, d, t, ti, b FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[]) \
             WITH ORDINALITY AS x(u, d, t, ti, b, n) ORDER BY n",
            &[&users, &ids, &times, &titles, &bodies],
        )
        .await?;
        // 3. The documents.
        tx.execute(
            "INSERT INTO ghostwriter_documents (user_id, doc_id, timestamp, title, body) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[]) \
             ON CONFLICT (user_id, doc_id) DO UPDATE SET timestamp = excluded.timestamp, \
             title = excluded.title, body = excluded.body",
            &[&users, &ids, &times, &titles, &bodies],
        )
        .await?;
        let token = self.finish(&tx).await?;
        before_commit.await;
        tx.commit().await?;
        Ok(Written {
            token,
            documents: batch.len() as u64,
        })
    }

    /// Deletes one document (`Some(doc_id)`) or every document of `user_id`, from the documents
    /// table and from the log's earlier changes (the text stays nowhere in the store but in
    /// Postgres's own backups and WAL archives), leaving a tombstone that replicas apply.
    pub async fn delete(&self, user_id: &str, doc_id: Option<&str>) -> Result<Written, Error> {
        let (keys, shared) = match doc_id {
            Some(d) => lock_plan([
                (lock_key(user_id, None), true),
                (lock_key(user_id, Some(d)), false),
            ]),
            None => lock_plan([(lock_key(user_id, None), false)]),
        };
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.query_one(LOCK, &[&keys, &shared]).await?;
        let (kind, doc) = match doc_id {
            Some(d) => (2i16, d),
            None => (3i16, ""),
        };
        tx.execute(
            "INSERT INTO ghostwriter_changes (kind, user_id, doc_id) VALUES ($1, $2, $3)",
            &[&kind, &user_id, &doc],
        )
        .await?;
        let (deleted, redact) = match doc_id {
            Some(d) => (
                tx.execute(
                    "DELETE FROM ghostwriter_documents WHERE user_id = $1 AND doc_id = $2",
                    &[&user_id, &d],
                )
                .await?,
                tx.execute(
                    "DELETE FROM ghostwriter_changes WHERE user_id = $1 AND doc_id = $2 \
                     AND xid <> pg_current_xact_id()::text::bigint",
                    &[&user_id, &d],
                )
                .await?,
            ),
            None => (
                tx.execute(
                    "DELETE FROM ghostwriter_documents WHERE user_id = $1",
                    &[&user_id],
                )
                .await?,
                // Every earlier change of the user: superseded by the tombstone (a follower
                // behind them applies the tombstone instead), and they hold the user's text.
                tx.execute(
                    "DELETE FROM ghostwriter_changes WHERE user_id = $1 \
                     AND xid <> pg_current_xact_id()::text::bigint",
                    &[&user_id],
                )
                .await?,
            ),
        };
        tracing::debug!(deleted, redacted = redact, "store delete");
        let token = self.finish(&tx).await?;
        tx.commit().await?;
        Ok(Written {
            token,
            documents: deleted,
        })
    }

    /// Wakes the followers (delivered at commit) and returns the transaction's token.
    async fn finish(&self, tx: &tokio_postgres::Transaction<'_>) -> Result<Token, Error> {
        let row = tx
            .query_one(
                "SELECT pg_current_xact_id()::text::bigint, pg_notify($1, '')::text",
                &[&CHANNEL],
            )
            .await?;
        Ok(Token(row.get::<_, i64>(0) as u64))
    }

    /// The head: every transaction with an id below it has ended or is running now, so a
    /// follower whose watermark reaches it has applied everything committed before this call.
    pub async fn head(&self) -> Result<u64, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Reads up to `limit` changes after `from`, in the safe order (see the crate's docs), in
    /// one snapshot.
    pub async fn read(&self, from: &Position, limit: usize) -> Result<Feed, Error> {
        let mut client = self.pool.get().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let meta = tx
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, pruned_below \
                 FROM ghostwriter_meta",
                &[],
            )
            .await?;
        let watermark = (meta.get::<_, i64>(0) as u64).max(from.watermark);
        let pruned_below = meta.get::<_, i64>(1) as u64;
        if from.watermark < pruned_below {
            return Ok(Feed::Pruned { pruned_below });
        }
        let limit = limit.max(1);
        let rows = tx
            .query(
                "SELECT xid, seq, kind, user_id, doc_id, timestamp, title, body \
                 FROM ghostwriter_changes WHERE (xid, seq) > ($1, $2) AND xid < $3 \
                 ORDER BY xid, seq LIMIT $4",
                &[
                    &(from.xid as i64),
                    &from.seq,
                    &(watermark as i64),
                    &(limit as i64),
                ],
            )
            .await?;
        let changes = rows
            .iter()
            .map(|r| {
                let user_id: String = r.get(3);
                let doc_id: String = r.get(4);
                let change = match r.get::<_, i16>(2) {
                    1 => Change::Upsert(Document {
                        user_id,
                        doc_id,
                        timestamp: r.get::<_, Option<i64>>(5).unwrap_or_default(),
                        title: r.get::<_, Option<String>>(6).unwrap_or_default(),
                        text: r.get::<_, Option<String>>(7).unwrap_or_default(),
                    }),
                    2 => Change::DeleteDocument { user_id, doc_id },
                    _ => Change::DeleteUser { user_id },
                };
                Logged {
                    xid: r.get::<_, i64>(0) as u64,
                    seq: r.get(1),
                    change,
                }
            })
            .collect::<Vec<_>>();
        let caught_up = changes.len() < limit;
        let (position, lag) = if caught_up {
            let age: Option<f64> = tx
                .query_one(
                    "SELECT extract(epoch FROM clock_timestamp() - min(committed_at))::float8 \
                     FROM ghostwriter_changes WHERE xid >= $1",
                    &[&(watermark as i64)],
                )
                .await?
                .get(0);
            (
                Position::at_watermark(watermark),
                Some(Duration::from_secs_f64(age.unwrap_or(0.0).max(0.0))),
            )
        } else {
            let last = changes
                .last()
                .map_or((from.xid, from.seq), |c| (c.xid, c.seq));
            (
                Position {
                    xid: last.0,
                    seq: last.1,
                    watermark: from.watermark,
                },
                None,
            )
        };
        tx.commit().await?;
        Ok(Feed::Page(Page {
            changes,
            position,
            caught_up,
            lag,
        }))
    }

    /// A consistent snapshot of every document and the position it corresponds to: replaying
    /// the log from there reaches the head (changes the snapshot already holds are applied
    /// again, which upserts and deletions by key make harmless).
    pub async fn snapshot(&self) -> Result<Snapshot, Error> {
        let (client, _) = self.target.connect().await?;
        client
            .batch_execute(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL statement_timeout = 0",
            )
            .await?;
        let row = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint, \
                 (SELECT count(*) FROM ghostwriter_documents)",
                &[],
            )
            .await?;
        let position = Position::at_watermark(row.get::<_, i64>(0) as u64);
        let documents = row.get::<_, i64>(1) as u64;
        client
            .batch_execute(
                "DECLARE ghostwriter_snapshot NO SCROLL CURSOR FOR \
                 SELECT user_id, doc_id, timestamp, title, body FROM ghostwriter_documents",
            )
            .await?;
        Ok(Snapshot {
            client,
            position,
            documents,
            done: false,
        })
    }

    /// A direct connection listening for commits (`LISTEN` needs a session of its own: it does
    /// not pass through a transaction-mode pooler such as PgBouncer).
    pub async fn listen(&self) -> Result<Wakeups, Error> {
        let (client, messages) = self.target.connect().await?;
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        Ok(Wakeups {
            _client: client,
            messages,
        })
    }

    /// Removes the changes older than `retention` (on a transaction boundary, so a follower never
    /// sees part of a transaction) and records where the log now starts; returns how many it
    /// removed. One pruner at a time; the others return 0.
    pub async fn prune(&self, retention: Duration) -> Result<u64, Error> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&PRUNE_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(0);
        }
        // Below the watermark (finished transactions only), and below every change younger than
        // the retention.
        let below: i64 = tx
            .query_one(
                "SELECT least(pg_snapshot_xmin(pg_current_snapshot())::text::bigint, \
                 coalesce((SELECT min(xid) FROM ghostwriter_changes \
                 WHERE committed_at >= clock_timestamp() - make_interval(secs => $1)), 9223372036854775807))",
                &[&retention.as_secs_f64()],
            )
            .await?
            .get(0);
        let removed = tx
            .execute("DELETE FROM ghostwriter_changes WHERE xid < $1", &[&below])
            .await?;
        tx.execute(
            "UPDATE ghostwriter_meta SET pruned_below = greatest(pruned_below, $1)",
            &[&below],
        )
        .await?;
        tx.commit().await?;
        Ok(removed)
    }

    /// Every stored document (tests and tools: the table a follower must equal).
    pub async fn documents(&self) -> Result<Vec<Document>, Error> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT user_id, doc_id, timestamp, title, body FROM ghostwriter_documents \
                 ORDER BY user_id, doc_id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Document {
                user_id: r.get(0),
                doc_id: r.get(1),
                timestamp: r.get(2),
                title: r.get(3),
                text: r.get(4),
            })
            .collect())
    }

    /// A pooled connection (tests and tools).
    pub async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        Ok(self.pool.get().await?)
    }

    /// Closes the pool (tests: a store that is gone).
    pub fn close(&self) {
        self.pool.close();
    }
}

async fn identity(client: &tokio_postgres::Client) -> Result<Identity, Error> {
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text, store_id \
             FROM ghostwriter_meta",
            &[],
        )
        .await?;
    let system: String = row.get(0);
    Ok(Identity {
        system_id: system
            .parse()
            .map_err(|_| Error::Internal(format!("system identifier {system:?}")))?,
        store_id: row.get(1),
    })
}

/// A consistent snapshot of the documents, read in pages ([`Store::snapshot`]).
pub struct Snapshot {
    client: tokio_postgres::Client,
    /// The log position the snapshot corresponds to.
    pub position: Position,
    /// Documents in the snapshot.
    pub documents: u64,
    done: bool,
}

impl Snapshot {
    /// The next (up to) `n` documents; `None` once every one was read.
    pub async fn next(&mut self, n: usize) -> Result<Option<Vec<Document>>, Error> {
        if self.done {
            return Ok(None);
        }
        let messages = self
            .client
            .simple_query(&format!("FETCH {} FROM ghostwriter_snapshot", n.max(1)))
            .await?;
        let mut page = Vec::new();
        for m in messages {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                let text = |i: usize| r.get(i).unwrap_or_default().to_string();
                page.push(Document {
                    user_id: text(0),
                    doc_id: text(1),
                    timestamp: text(2).parse().unwrap_or_default(),
                    title: text(3),
                    text: text(4),
                });
            }
        }
        if page.is_empty() {
            self.done = true;
            let _ = self.client.batch_execute("COMMIT").await;
            return Ok(None);
        }
        Ok(Some(page))
    }
}

/// Commit notifications ([`Store::listen`]).
pub struct Wakeups {
    _client: tokio_postgres::Client,
    messages: tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
}

impl Wakeups {
    /// Waits for the next notification; `false` when the connection closed (listen again, and
    /// poll meanwhile).
    pub async fn next(&mut self) -> bool {
        while let Some(m) = self.messages.recv().await {
            if matches!(m, tokio_postgres::AsyncMessage::Notification(_)) {
                // Several commits may have notified: one read serves them all.
                while self.messages.try_recv().is_ok() {}
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_ordered_and_exclusive_wins() {
        let a = lock_key("u", None);
        let b = lock_key("u", Some("d"));
        let (keys, shared) = lock_plan([(b, false), (a, true), (a, false), (b, false)]);
        let mut sorted = vec![a, b];
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(shared.iter().all(|s| !s));
        assert_ne!(lock_key("u", Some("")), lock_key("u", None));
    }

    #[test]
    fn tokens_and_positions_round_trip() {
        let p = Position {
            xid: 7,
            seq: 9,
            watermark: 5,
        };
        assert_eq!(Position::decode(&p.encode()), Some(p));
        assert!(Position::at_watermark(10).has(Token(9)));
        assert!(!Position::at_watermark(10).has(Token(10)));
    }
}
