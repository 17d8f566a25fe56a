//! The schema, created and migrated by the program itself: numbered migrations applied in order
//! under a session advisory lock (replicas that start together wait for each other instead of
//! racing), each in its own transaction with the version it reaches; a database whose schema is
//! newer than this binary knows is refused.

use crate::Error;

/// `pg_advisory_lock` key of the migrations ("gw-migr" as bytes).
const MIGRATION_LOCK: i64 = 0x0067_772d_6d69_6772;

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Migration `i + 1` is `MIGRATIONS[i]`; never edit one that shipped, append.
const MIGRATIONS: &[&str] = &[
    // 1: documents, the change log, the store's identity.
    r#"
    CREATE TABLE ghostwriter_meta (
        singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version       integer NOT NULL,
        -- Created once with the schema: a restored or different database has another, so a
        -- replica's index built against it is recognised as foreign.
        store_id      text NOT NULL DEFAULT gen_random_uuid()::text,
        -- Changes of transactions with an id below this were removed by retention: a replica
        -- whose position is below it rebuilds from a snapshot.
        pruned_below  bigint NOT NULL DEFAULT 0,
        created_at    timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO ghostwriter_meta (version) VALUES (0);

    -- The system of record: one row per stored document.
    CREATE TABLE ghostwriter_documents (
        user_id    text   NOT NULL,
        doc_id     text   NOT NULL,
        timestamp  bigint NOT NULL,
        title      text   NOT NULL,
        body       text   NOT NULL,
        PRIMARY KEY (user_id, doc_id)
    );

    CREATE SEQUENCE ghostwriter_change_seq;

    -- The append-only change log replicas follow. Ordered by (xid, seq): xid is the writing
    -- transaction's id, taken only after its key locks (see the crate's docs for why that
    -- order is safe); seq orders the changes inside one transaction.
    CREATE TABLE ghostwriter_changes (
        xid          bigint   NOT NULL DEFAULT pg_current_xact_id()::text::bigint,
        seq          bigint   NOT NULL DEFAULT nextval('ghostwriter_change_seq'),
        -- 1 upsert, 2 delete one document (a tombstone), 3 delete every document of a user.
        kind         smallint NOT NULL CHECK (kind IN (1, 2, 3)),
        user_id      text     NOT NULL,
        doc_id       text     NOT NULL DEFAULT '',
        timestamp    bigint,
        title        text,
        body         text,
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (xid, seq)
    );
    CREATE INDEX ghostwriter_changes_user ON ghostwriter_changes (user_id, doc_id);
    CREATE INDEX ghostwriter_changes_time ON ghostwriter_changes (committed_at);
    "#,
];

/// Brings the schema to [`SCHEMA_VERSION`] and returns the version found before, or refuses a
/// newer one with [`Error::SchemaTooNew`].
pub(crate) async fn migrate(client: &mut tokio_postgres::Client) -> Result<i32, Error> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = migrate_locked(client).await;
    // Released also after a failure (the session ends with the connection anyway).
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> Result<i32, Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('ghostwriter_meta') IS NOT NULL", &[])
        .await?
        .get(0);
    let found: i32 = if exists {
        client
            .query_one("SELECT version FROM ghostwriter_meta", &[])
            .await?
            .get(0)
    } else {
        0
    };
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i32 + 1;
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute("UPDATE ghostwriter_meta SET version = $1", &[&version])
            .await?;
        tx.commit().await?;
        tracing::info!(version, "store schema migrated");
    }
    Ok(found)
}

/// Sets the schema's version (tests: a database migrated by a newer binary).
#[doc(hidden)]
pub async fn force_version(client: &tokio_postgres::Client, version: i32) -> Result<(), Error> {
    client
        .execute("UPDATE ghostwriter_meta SET version = $1", &[&version])
        .await?;
    Ok(())
}
