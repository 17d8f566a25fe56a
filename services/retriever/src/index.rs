//! The document index: every user's documents in one persistent tantivy index, searched with
//! BM25 over title and text, always restricted to one user's earlier documents.

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tantivy::collector::{Count, TopDocs};
use tantivy::directory::MmapDirectory;
use tantivy::directory::error::LockError;
use tantivy::query::{BooleanQuery, ConstScoreQuery, Occur, Query, RangeQuery, TermQuery};
use tantivy::schema::{Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TEXT, Value};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term, doc};

use crate::Error;

/// A stored document (the domain twin of the proto `Document`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    /// Author.
    pub user_id: String,
    /// Unique id.
    pub doc_id: String,
    /// Unix seconds.
    pub timestamp: i64,
    /// Title (may be empty).
    pub title: String,
    /// Body.
    pub text: String,
}

/// A document of the store as the index keeps it, and back: the same five fields.
macro_rules! same_document {
    ($($from:ty => $to:ty),*) => {$(
        impl From<$from> for $to {
            fn from(d: $from) -> Self {
                let (user_id, doc_id, timestamp, title, text) =
                    (d.user_id, d.doc_id, d.timestamp, d.title, d.text);
                Self { user_id, doc_id, timestamp, title, text }
            }
        }
    )*};
}

same_document!(
    ghostwriter_store::Document => StoredDocument,
    StoredDocument => ghostwriter_store::Document
);

impl StoredDocument {
    /// Title and body joined, as they are indexed and ranked.
    pub fn content(&self) -> String {
        ghostwriter_common::text::document_text(&self.title, &self.text)
    }
}

/// Document frequencies over the whole index (the domain twin of the proto message).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TermStatistics {
    /// Documents in the index.
    pub documents: u64,
    /// Documents containing each word.
    pub document_frequency: HashMap<String, u64>,
}

/// A retrieved document with its BM25 score.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The document.
    pub document: StoredDocument,
    /// BM25 against the query; 0 when no query term matches.
    pub score: f32,
    /// Snippets computed at ingest.
    pub snippets: Vec<String>,
}

/// One change applied to the index, in order ([`DocumentIndex::apply`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexChange {
    /// Store (replace) the document.
    Upsert(StoredDocument),
    /// Delete one document.
    DeleteDocument {
        /// Author.
        user_id: String,
        /// Id.
        doc_id: String,
    },
    /// Delete every document of the user.
    DeleteUser {
        /// The user.
        user_id: String,
    },
}

/// Which documents count as a user's history for the document being written.
#[derive(Debug, Clone)]
pub struct HistoryFilter {
    /// The author.
    pub user_id: String,
    /// Only documents before this unix time; same-second documents count when their doc_id
    /// sorts before `current_doc_id`.
    pub before: i64,
    /// The document being written; never returned.
    pub current_doc_id: String,
}

/// Result of [`DocumentIndex::retrieve`].
#[derive(Debug, Clone)]
pub struct Retrieved {
    /// Best BM25 first, then most recent.
    pub hits: Vec<Hit>,
    /// The user's earlier documents in all.
    pub total_history: usize,
}

struct Fields {
    user_id: Field,
    doc_id: Field,
    timestamp: Field,
    title: Field,
    text: Field,
    content: Field,
    snippet: Field,
}

/// The persistent index.
pub struct DocumentIndex {
    index: Index,
    reader: IndexReader,
    writer: Mutex<IndexWriter>,
    fields: Fields,
}

/// How long opening waits for a busy writer lock (see [`DocumentIndex::writer`]).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Most query terms used (longer contexts are cut), so one request cannot build a huge query.
const MAX_QUERY_TERMS: usize = 256;

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let fields = Fields {
        user_id: builder.add_text_field("user_id", STRING | STORED),
        doc_id: builder.add_text_field("doc_id", STRING | STORED),
        timestamp: builder.add_i64_field("timestamp", INDEXED | STORED),
        title: builder.add_text_field("title", STORED),
        text: builder.add_text_field("text", STORED),
        // Title and body together, tokenized, for BM25.
        content: builder.add_text_field("content", TEXT),
        // The document's snippets, split once at ingest, stored beside it.
        snippet: builder.add_text_field("snippet", STORED),
    };
    (builder.build(), fields)
}

impl DocumentIndex {
    /// Opens the index in `dir`, creating it (and the directory) when absent.
    pub fn open(dir: &Path, writer_memory_bytes: usize) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Index(format!("cannot create {}: {e}", dir.display())))?;
        let (schema, fields) = schema();
        let directory = MmapDirectory::open(dir).map_err(|e| Error::Index(e.to_string()))?;
        let index = Index::open_or_create(directory, schema)?;
        Self::from_index(index, fields, writer_memory_bytes)
    }

    fn from_index(index: Index, fields: Fields, writer_memory_bytes: usize) -> Result<Self, Error> {
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let writer = Self::writer(&index, writer_memory_bytes, LOCK_WAIT)?;
        Ok(Self {
            index,
            reader,
            writer: Mutex::new(writer),
            fields,
        })
    }

    /// The index's one writer. Its lock file may still be held for a moment after the writer
    /// that held it has gone (a child forked by the process in that moment keeps a copy of
    /// the lock's file descriptor until it runs its program), so a busy lock is tried again,
    /// for at most `wait`, as Elasticsearch waits for a shard lock; a lock still busy then is
    /// another writer on this directory, refused.
    fn writer(index: &Index, memory_bytes: usize, wait: Duration) -> Result<IndexWriter, Error> {
        let deadline = Instant::now() + wait;
        let mut logged = false;
        loop {
            match index.writer_with_num_threads(1, memory_bytes.max(15_000_000)) {
                Err(tantivy::TantivyError::LockFailure(LockError::LockBusy, _))
                    if Instant::now() < deadline =>
                {
                    if !logged {
                        tracing::warn!(
                            stage = "retriever",
                            ?wait,
                            "the index's writer lock is busy; waiting for it"
                        );
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(tantivy::TantivyError::LockFailure(LockError::LockBusy, _)) => {
                    return Err(Error::Index(format!(
                        "another writer holds this index (its lock stayed busy for {wait:?}): \
                         two retrievers cannot share one index directory"
                    )));
                }
                written => return Ok(written?),
            }
        }
    }

    /// Number of documents searchable now.
    pub fn num_docs(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Stores (upserts by doc_id) a validated batch and makes it searchable before returning.
    pub fn ingest(&self, documents: &[StoredDocument]) -> Result<u64, Error> {
        let changes: Vec<IndexChange> =
            documents.iter().cloned().map(IndexChange::Upsert).collect();
        self.apply(&changes, None)
    }

    /// Deletes one document (`Some(doc_id)`) or every document of the user, and merges the
    /// segments holding deleted documents so their text leaves the segment files too; returns
    /// how many were deleted.
    pub fn delete(&self, user_id: &str, doc_id: Option<&str>) -> Result<u64, Error> {
        let before = self.count_user(user_id, doc_id)?;
        let change = match doc_id {
            Some(d) => IndexChange::DeleteDocument {
                user_id: user_id.into(),
                doc_id: d.into(),
            },
            None => IndexChange::DeleteUser {
                user_id: user_id.into(),
            },
        };
        self.apply(&[change], None)?;
        Ok(before)
    }

    fn count_user(&self, user_id: &str, doc_id: Option<&str>) -> Result<u64, Error> {
        let searcher = self.reader.searcher();
        let n = searcher.search(&*self.key_query(user_id, doc_id), &Count)?;
        Ok(n as u64)
    }

    /// The query matching one document, or every document of a user.
    fn key_query(&self, user_id: &str, doc_id: Option<&str>) -> Box<dyn Query> {
        let f = &self.fields;
        let user: Box<dyn Query> = Box::new(TermQuery::new(
            Term::from_field_text(f.user_id, user_id),
            IndexRecordOption::Basic,
        ));
        match doc_id {
            None => user,
            Some(d) => Box::new(BooleanQuery::new(vec![
                (Occur::Must, user),
                (
                    Occur::Must,
                    Box::new(TermQuery::new(
                        Term::from_field_text(f.doc_id, d),
                        IndexRecordOption::Basic,
                    )),
                ),
            ])),
        }
    }

    /// Applies `changes` in order and commits them at once (with `payload` recorded in the
    /// commit, where a follower keeps its store position); searchable before returning. After
    /// a deletion, the segments holding deleted documents are merged, so the deleted text
    /// leaves the segment files. Returns the documents searchable now.
    pub fn apply(&self, changes: &[IndexChange], payload: Option<&str>) -> Result<u64, Error> {
        let f = &self.fields;
        let mut writer = self
            .writer
            .lock()
            .map_err(|_| Error::Index("writer poisoned".into()))?;
        // The segments holding a deleted user's documents, merged after the commit.
        let mut deleted_users: HashSet<&str> = HashSet::new();
        let result = (|| {
            for change in changes {
                match change {
                    IndexChange::Upsert(d) => {
                        // Documents are keyed by (user_id, doc_id): one user's id never
                        // replaces another user's document.
                        writer.delete_query(self.key_query(&d.user_id, Some(&d.doc_id)))?;
                        writer.add_document(Self::document(f, d))?;
                    }
                    IndexChange::DeleteDocument { user_id, doc_id } => {
                        writer.delete_query(self.key_query(user_id, Some(doc_id)))?;
                        deleted_users.insert(user_id);
                    }
                    IndexChange::DeleteUser { user_id } => {
                        writer.delete_term(Term::from_field_text(f.user_id, user_id));
                        deleted_users.insert(user_id);
                    }
                }
            }
            Self::commit(&mut writer, payload)
        })();
        if let Err(e) = result {
            // Nothing half-written: drop whatever this batch added since the last commit.
            let _ = writer.rollback();
            return Err(e);
        }
        if !deleted_users.is_empty() {
            self.expunge(&mut writer, &deleted_users)?;
        }
        drop(writer);
        self.reader.reload()?;
        Ok(self.num_docs())
    }

    /// Adds documents known not to be in the index (a rebuild's snapshot pages), without
    /// committing: the rebuild commits once, with its position, at the end.
    pub fn add_uncommitted(&self, documents: &[StoredDocument]) -> Result<(), Error> {
        let writer = self
            .writer
            .lock()
            .map_err(|_| Error::Index("writer poisoned".into()))?;
        for d in documents {
            writer.add_document(Self::document(&self.fields, d))?;
        }
        Ok(())
    }

    /// Deletes every document, committing with `payload` (the start of a rebuild).
    pub fn clear(&self, payload: Option<&str>) -> Result<(), Error> {
        let mut writer = self
            .writer
            .lock()
            .map_err(|_| Error::Index("writer poisoned".into()))?;
        writer.delete_all_documents()?;
        Self::commit(&mut writer, payload)?;
        drop(writer);
        self.reader.reload()?;
        self.num_docs();
        Ok(())
    }

    /// The payload of the last commit (a follower's store position), if any.
    pub fn payload(&self) -> Result<Option<String>, Error> {
        Ok(self.index.load_metas()?.payload)
    }

    fn commit(writer: &mut IndexWriter, payload: Option<&str>) -> Result<(), Error> {
        let mut prepared = writer.prepare_commit()?;
        if let Some(p) = payload {
            prepared.set_payload(p);
        }
        prepared.commit()?;
        Ok(())
    }

    /// Merges (rewrites) the segments that held documents of `users` and now hold deletions,
    /// so the deleted text leaves the segment files (tantivy otherwise keeps deleted documents
    /// there until a merge happens to pick the segment). Only those segments: a deletion does
    /// not rewrite the whole index.
    fn expunge(&self, writer: &mut IndexWriter, users: &HashSet<&str>) -> Result<(), Error> {
        let searcher = self.reader.searcher();
        let mut segments = Vec::new();
        for reader in searcher.segment_readers() {
            let terms = reader.inverted_index(self.fields.user_id)?;
            let mut holds = false;
            for user in users {
                let term = Term::from_field_text(self.fields.user_id, user);
                if terms
                    .get_term_info(&term)
                    .map_err(|e| Error::Index(e.to_string()))?
                    .is_some()
                {
                    holds = true;
                    break;
                }
            }
            if holds {
                segments.push(reader.segment_id());
            }
        }
        let live: HashSet<_> = self
            .index
            .searchable_segment_metas()?
            .into_iter()
            .filter(|m| m.has_deletes())
            .map(|m| m.id())
            .collect();
        segments.retain(|id| live.contains(id));
        if segments.is_empty() {
            return Ok(());
        }
        writer.merge(&segments).wait()?;
        // The merged-away files go now, not at some later commit.
        writer.garbage_collect_files().wait()?;
        Ok(())
    }

    fn document(f: &Fields, d: &StoredDocument) -> TantivyDocument {
        let content = d.content();
        let mut document = doc!(
            f.user_id => d.user_id.as_str(),
            f.doc_id => d.doc_id.as_str(),
            f.timestamp => d.timestamp,
            f.title => d.title.as_str(),
            f.text => d.text.as_str(),
        );
        for snippet in ghostwriter_common::text::snippets(&content) {
            document.add_text(f.snippet, snippet);
        }
        document.add_text(f.content, content);
        document
    }

    /// Every document of the index, ordered by (user_id, doc_id) (tests and tools).
    pub fn all_documents(&self) -> Result<Vec<StoredDocument>, Error> {
        let searcher = self.reader.searcher();
        let mut out = Vec::new();
        for reader in searcher.segment_readers() {
            let store = reader
                .get_store_reader(0)
                .map_err(|e| Error::Index(e.to_string()))?;
            for id in reader.doc_ids_alive() {
                let d: TantivyDocument = store.get(id)?;
                out.push(self.stored(&d));
            }
        }
        out.sort_by(|a, b| (&a.user_id, &a.doc_id).cmp(&(&b.user_id, &b.doc_id)));
        Ok(out)
    }

    fn query_terms(&self, query: &str) -> Result<Vec<Term>, Error> {
        let mut analyzer = self.index.tokenizer_for_field(self.fields.content)?;
        let mut stream = analyzer.token_stream(query);
        let mut terms = Vec::new();
        while stream.advance() && terms.len() < MAX_QUERY_TERMS {
            terms.push(Term::from_field_text(
                self.fields.content,
                &stream.token().text,
            ));
        }
        Ok(terms)
    }

    fn filter_clause(q: Box<dyn Query>) -> (Occur, Box<dyn Query>) {
        (Occur::Must, Box::new(ConstScoreQuery::new(q, 0.0)))
    }

    /// Background statistics for the synthesizer's IDF: the documents in this index (every
    /// user) and, for each distinct word of `texts` (split as the synthesizer splits them), how
    /// many contain it. A word the index's analyzer splits further (`isn't` → `isn`, `t`) gets
    /// the smallest frequency of its parts, an upper bound of its own.
    pub fn term_statistics(&self, texts: &[String]) -> Result<TermStatistics, Error> {
        let searcher = self.reader.searcher();
        let mut analyzer = self.index.tokenizer_for_field(self.fields.content)?;
        let mut document_frequency = HashMap::new();
        for text in texts {
            for word in ghostwriter_common::text::words(text) {
                if document_frequency.contains_key(&word) {
                    continue;
                }
                let mut df: Option<u64> = None;
                {
                    let mut stream = analyzer.token_stream(&word);
                    while stream.advance() {
                        let term = Term::from_field_text(self.fields.content, &stream.token().text);
                        let n = searcher.doc_freq(&term)?;
                        df = Some(df.map_or(n, |d| d.min(n)));
                    }
                }
                document_frequency.insert(word, df.unwrap_or(0));
            }
        }
        Ok(TermStatistics {
            documents: searcher.num_docs(),
            document_frequency,
        })
    }

    /// A user's documents written before the filter's point, scored by BM25 against `query`
    /// (built term by term: user text is never parsed as query syntax).
    pub fn retrieve(
        &self,
        filter: &HistoryFilter,
        query: &str,
        limit: usize,
    ) -> Result<Retrieved, Error> {
        let f = &self.fields;
        let searcher = self.reader.searcher();
        let user = || -> Box<dyn Query> {
            Box::new(TermQuery::new(
                Term::from_field_text(f.user_id, &filter.user_id),
                IndexRecordOption::Basic,
            ))
        };
        let ts = Term::from_field_i64(f.timestamp, filter.before);

        // Same-second documents: earlier only when their doc_id sorts before the current one.
        let same_second = BooleanQuery::new(vec![
            (Occur::Must, user()),
            (
                Occur::Must,
                Box::new(TermQuery::new(ts.clone(), IndexRecordOption::Basic)),
            ),
        ]);
        let mut excluded: HashSet<String> = HashSet::new();
        for (_, addr) in
            searcher.search(&same_second, &TopDocs::with_limit(100_000).order_by_score())?
        {
            let (d, _) = self.load(&searcher, addr)?;
            if d.doc_id.as_str() >= filter.current_doc_id.as_str() {
                excluded.insert(d.doc_id);
            }
        }
        if !filter.current_doc_id.is_empty() {
            excluded.insert(filter.current_doc_id.clone());
        }

        let mut clauses: Vec<(Occur, Box<dyn Query>)> = vec![
            Self::filter_clause(user()),
            Self::filter_clause(Box::new(RangeQuery::new(
                Bound::Unbounded,
                Bound::Included(ts),
            ))),
        ];
        for doc_id in &excluded {
            clauses.push((
                Occur::MustNot,
                Box::new(TermQuery::new(
                    Term::from_field_text(f.doc_id, doc_id),
                    IndexRecordOption::Basic,
                )),
            ));
        }
        for term in self.query_terms(query)? {
            clauses.push((
                Occur::Should,
                Box::new(TermQuery::new(term, IndexRecordOption::WithFreqs)),
            ));
        }
        let query = BooleanQuery::new(clauses);
        let (top, total) = searcher.search(
            &query,
            &(TopDocs::with_limit(limit.max(1)).order_by_score(), Count),
        )?;
        let mut hits = top
            .into_iter()
            .map(|(score, addr)| {
                let (document, snippets) = self.load(&searcher, addr)?;
                Ok(Hit {
                    document,
                    score,
                    snippets,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        // Documents no term matches score 0: most recent first among equals, then by doc_id.
        hits.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.document.timestamp.cmp(&a.document.timestamp))
                .then(b.document.doc_id.cmp(&a.document.doc_id))
        });
        Ok(Retrieved {
            hits,
            total_history: total,
        })
    }

    fn stored(&self, d: &TantivyDocument) -> StoredDocument {
        let f = &self.fields;
        let text = |field| {
            d.get_first(field)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        StoredDocument {
            user_id: text(f.user_id),
            doc_id: text(f.doc_id),
            timestamp: d
                .get_first(f.timestamp)
                .and_then(|v| v.as_i64())
                .unwrap_or_default(),
            title: text(f.title),
            text: text(f.text),
        }
    }

    /// A stored document and its snippets.
    fn load(
        &self,
        searcher: &tantivy::Searcher,
        addr: tantivy::DocAddress,
    ) -> Result<(StoredDocument, Vec<String>), Error> {
        let f = &self.fields;
        let d: TantivyDocument = searcher.doc(addr)?;
        let document = self.stored(&d);
        let snippets = d
            .get_all(f.snippet)
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        Ok((document, snippets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh index in a temporary directory holding `docs`.
    fn indexed(docs: &[StoredDocument]) -> (tempfile::TempDir, DocumentIndex) {
        let dir = tempfile::tempdir().unwrap();
        let index = DocumentIndex::open(dir.path(), 20_000_000).unwrap();
        index.ingest(docs).unwrap();
        (dir, index)
    }

    fn doc(user: &str, id: &str, ts: i64, text: &str) -> StoredDocument {
        StoredDocument {
            user_id: user.into(),
            doc_id: id.into(),
            timestamp: ts,
            title: String::new(),
            text: text.into(),
        }
    }

    fn filter(user: &str, before: i64, current: &str) -> HistoryFilter {
        HistoryFilter {
            user_id: user.into(),
            before,
            current_doc_id: current.into(),
        }
    }

    fn ids(r: &Retrieved) -> Vec<&str> {
        r.hits.iter().map(|h| h.document.doc_id.as_str()).collect()
    }

    #[test]
    fn one_user_s_doc_id_never_replaces_another_user_s_document() {
        let (_dir, index) = indexed(&[doc("alice", "d1", 10, "alice's review of a capo")]);
        // Bob re-uses alice's id: both documents stay, each with its owner.
        index
            .ingest(&[doc("bob", "d1", 20, "bob's review of a strap")])
            .unwrap();
        assert_eq!(index.num_docs(), 2);
        let alice = index
            .retrieve(&filter("alice", 100, ""), "review", 10)
            .unwrap();
        assert_eq!(ids(&alice), vec!["d1"]);
        assert!(alice.hits[0].document.text.starts_with("alice"));
        // The owner's own re-ingest still replaces.
        index
            .ingest(&[doc("alice", "d1", 10, "alice's new text")])
            .unwrap();
        assert_eq!(index.num_docs(), 2);
        let alice = index
            .retrieve(&filter("alice", 100, ""), "text", 10)
            .unwrap();
        assert_eq!(alice.hits[0].document.text, "alice's new text");
    }

    #[test]
    fn term_statistics_count_every_user_s_documents() {
        let (_dir, index) = indexed(&[
            doc("u1", "a", 10, "Guitar strings isn't bright"),
            doc("u2", "b", 20, "guitar strap"),
            doc("u3", "c", 20, "guitar cable isn't long"),
        ]);
        let stats = index
            .term_statistics(&["guitar strings isn't".into(), "Capo".into()])
            .unwrap();
        assert_eq!(stats.documents, 3);
        let df = |w: &str| stats.document_frequency.get(w).copied();
        assert_eq!(df("guitar"), Some(3));
        assert_eq!(df("strings"), Some(1));
        // Split by the index into "isn" and "t": the smaller count of the two.
        assert_eq!(df("isn't"), Some(2));
        assert_eq!(df("capo"), Some(0));
        assert_eq!(df("strap"), None, "only words of the given texts");
    }

    #[test]
    fn only_the_users_earlier_documents_come_back() {
        let (_dir, index) = indexed(&[
            doc("u1", "a", 10, "guitar strings sound bright"),
            doc("u1", "b", 20, "guitar strap is comfortable"),
            doc("u1", "c", 20, "guitar cable crackles"),
            doc("u1", "d", 30, "guitar tuner works"),
            doc("u2", "x", 5, "guitar guitar guitar"),
        ]);
        let r = index
            .retrieve(&filter("u1", 20, "c"), "guitar", 10)
            .unwrap();
        // a (earlier), b (same second, sorts before c); never c itself, d (later) or u2's x.
        let mut got = ids(&r);
        got.sort();
        assert_eq!(got, vec!["a", "b"]);
        assert_eq!(r.total_history, 2);
        // Same-second tie the other way: writing "b" at 20 sees only "a".
        assert_eq!(
            ids(&index
                .retrieve(&filter("u1", 20, "b"), "guitar", 10)
                .unwrap()),
            vec!["a"]
        );
    }

    #[test]
    fn bm25_orders_matches_before_unmatched_recent_documents() {
        let (_dir, index) = indexed(&[
            doc("u", "old", 1, "the pedal has a warm fuzz tone"),
            doc("u", "mid", 2, "shipping was fast"),
            doc("u", "new", 3, "box arrived on time"),
        ]);
        let r = index
            .retrieve(&filter("u", 100, ""), "fuzz pedal", 10)
            .unwrap();
        assert_eq!(ids(&r), vec!["old", "new", "mid"]);
        assert!(r.hits[0].score > 0.0);
        assert_eq!(r.hits[1].score, 0.0);
    }

    #[test]
    fn query_syntax_is_plain_text() {
        let (_dir, index) = indexed(&[doc(
            "u",
            "a",
            1,
            "AND OR NOT title:x \"quoted\" (paren) star*",
        )]);
        for q in [
            "\"",
            "title:",
            "(",
            "*",
            "AND",
            "a AND",
            "user_id:u2",
            ") OR (",
            "NOT",
        ] {
            let r = index.retrieve(&filter("u", 10, ""), q, 10).unwrap();
            assert_eq!(ids(&r), vec!["a"], "query {q:?}");
        }
        // A crafted query cannot reach another user's documents.
        assert!(
            index
                .retrieve(&filter("v", 10, ""), "user_id:u", 10)
                .unwrap()
                .hits
                .is_empty()
        );
    }

    #[test]
    fn a_deleted_users_text_leaves_the_segment_files() {
        let dir = tempfile::tempdir().unwrap();
        let index = DocumentIndex::open(dir.path(), 20_000_000).unwrap();
        let on_disk = |marker: &str| {
            std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
                std::fs::read(e.path())
                    .unwrap_or_default()
                    .windows(marker.len())
                    .any(|w| w == marker.as_bytes())
            })
        };
        index
            .ingest(&[doc("gone", "a", 1, "zqxjv-secret-of-the-deleted-user")])
            .unwrap();
        index
            .ingest(&[doc("kept", "b", 1, "wkpfy-text-that-stays")])
            .unwrap();
        assert!(on_disk("zqxjv-secret"), "the test must see the text before");
        assert_eq!(index.delete("gone", None).unwrap(), 1);
        assert!(
            !on_disk("zqxjv-secret"),
            "the deleted text is still in a segment file"
        );
        assert!(on_disk("wkpfy-text"));
        assert_eq!(index.num_docs(), 1);
    }

    #[test]
    fn reingesting_replaces_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = DocumentIndex::open(dir.path(), 20_000_000).unwrap();
            index.ingest(&[doc("u", "a", 1, "first version")]).unwrap();
            index.ingest(&[doc("u", "a", 1, "second version")]).unwrap();
            assert_eq!(index.num_docs(), 1);
        }
        let index = DocumentIndex::open(dir.path(), 20_000_000).unwrap();
        let r = index.retrieve(&filter("u", 10, ""), "version", 10).unwrap();
        assert_eq!(r.hits.len(), 1);
        assert_eq!(r.hits[0].document.text, "second version");
    }

    #[test]
    fn a_writer_lock_freed_while_opening_is_taken_and_one_held_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = DocumentIndex::open(dir.path(), 20_000_000).unwrap();
        // Held throughout: refused after the wait, with the reason.
        let held = DocumentIndex::writer(&first.index, 15_000_000, Duration::from_millis(200));
        let Err(Error::Index(message)) = held else { panic!("a held lock was taken") };
        assert!(
            message.contains("another writer holds this index"),
            "{message}"
        );
        // Freed while the second open waits: taken.
        let freed = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(first);
        });
        let started = Instant::now();
        let second = DocumentIndex::open(dir.path(), 20_000_000).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        freed.join().unwrap();
        second
            .ingest(&[doc("u", "a", 1, "after the wait")])
            .unwrap();
        assert_eq!(second.num_docs(), 1);
    }
}
