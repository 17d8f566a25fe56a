//! Adapters at run time (the S-LoRA and LoRAX model): named LoRA adapters, registered from
//! `--adapter-dir` (`NAME.safetensors`) or from a caller's bytes, made resident in the backend
//! on first use or on [`Adapters::load`], within a memory budget that evicts the least recently
//! used unpinned adapter no job is running on. Each job names its adapter ([`Params::adapter`]):
//! its sequences carry the adapter's id into the batch (rows of different adapters share a
//! forward pass) and the adapter's content hash into the prefix cache's block-hash chain, so
//! two adapters never share a cached block.
//!
//! Installs and removals travel on the same channel as jobs, so the engine thread installs an
//! adapter before any job that runs on it, and no job still names one it removes: a job holds
//! a lease on its adapter from submission to its end, and leased adapters are never evicted
//! or unloaded.
//!
//! [`Params::adapter`]: super::Params::adapter

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::api::EngineError;
use super::engine_core::Command;
use crate::adapter::Adapter;
use crate::backend::{AdapterId, AdapterShape, STARTUP};

/// The name that asks for the base model without an adapter.
pub const BASE_NAME: &str = ghostwriter_common::BASE_ADAPTER;

/// Where adapters come from and how much memory they may take.
#[derive(Debug, Clone, Default)]
pub struct AdapterSettings {
    /// Directory of `NAME.safetensors` files that [`Adapters::load`] and jobs name.
    pub dir: Option<PathBuf>,
    /// Memory for resident adapters, bytes (0 = no run-time adapter is kept resident).
    pub memory_bytes: usize,
}

/// Something that happened to an adapter, for metrics.
#[derive(Debug, Clone)]
pub enum AdapterEvent {
    /// It became resident; loading and checking it took this long.
    Loaded(String, Duration),
    /// It was evicted to make room.
    Evicted(String),
    /// It was unloaded by a caller.
    Unloaded(String),
}

/// One adapter as [`Adapters::list`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// Its name.
    pub name: String,
    /// Whether it is in the backend now.
    pub resident: bool,
    /// Whether it is kept resident (never evicted).
    pub pinned: bool,
    /// Jobs running or queued on it.
    pub running: usize,
    /// Its weights in memory, bytes (0 when not resident).
    pub bytes: usize,
    /// The first 12 hex digits of its file's sha256 (empty until first loaded).
    pub sha256: String,
    /// Times it was made resident.
    pub loads: u64,
    /// Times it was evicted.
    pub evictions: u64,
}

/// A job's adapter: the id its rows run with, the hash that starts its cache chain, its name
/// for provenance, and the lease that keeps it resident while the job lives.
#[derive(Debug, Clone, Default)]
pub struct AdapterUse {
    /// The backend's id ([`BASE`](crate::backend::BASE) for none).
    pub id: AdapterId,
    /// Starts the block-hash chain of its sequences (0 for the base model).
    pub weights: u64,
    /// `NAME@SHA` (empty for the base model).
    pub name: String,
    _lease: Option<Arc<()>>,
}

struct Resident {
    id: AdapterId,
    bytes: usize,
    last_used: u64,
    lease: Arc<()>,
}

struct Entry {
    /// Bytes a caller gave (`None`: read from the directory, or the start-up adapter).
    bytes: Option<Arc<Vec<u8>>>,
    resident: Option<Resident>,
    pinned: bool,
    sha256: String,
    weights: u64,
    loads: u64,
    evictions: u64,
}

impl Entry {
    fn new(bytes: Option<Arc<Vec<u8>>>) -> Self {
        Self {
            bytes,
            resident: None,
            pinned: false,
            sha256: String::new(),
            weights: 0,
            loads: 0,
            evictions: 0,
        }
    }

    fn running(&self) -> usize {
        self.resident
            .as_ref()
            .map_or(0, |r| Arc::strong_count(&r.lease) - 1)
    }
}

struct State {
    entries: BTreeMap<String, Entry>,
    next_id: AdapterId,
    clock: u64,
}

/// Where adapter events go.
type Observer = Arc<dyn Fn(&AdapterEvent) + Send + Sync>;

/// The engine's adapters; cheap to clone.
#[derive(Clone)]
pub struct Adapters {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    settings: AdapterSettings,
    /// What run-time adapters must fit (`None`: the backend serves its start-up one only).
    shape: Option<AdapterShape>,
    /// The base model file and its sha256, computed once, on the first run-time load.
    model: PathBuf,
    model_sha256: OnceLock<String>,
    /// The adapter that jobs naming none run with (the start-up one), if any.
    default: Option<String>,
    commands: Sender<Command>,
    observer: Mutex<Option<Observer>>,
}

/// Whether `name` may name an adapter: letters, digits, `.`, `_`, `-`, not starting with a
/// dot, at most 128 bytes (never a path).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument(message.into())
}

/// The first 8 bytes of a sha256 as a chain start, never 0 (the base model's).
fn chain_hash(sha256_hex: &str) -> u64 {
    u64::from_str_radix(&sha256_hex[..16.min(sha256_hex.len())], 16).unwrap_or(1) | 1
}

impl Adapters {
    /// The registry of an engine whose backend takes adapters of `shape` (or none), on the
    /// model at `model` (sha256 `model_sha256` if known), with the start-up adapter `startup`
    /// (its `NAME@SHA`, empty for none) installed as [`STARTUP`].
    pub(super) fn new(
        settings: AdapterSettings,
        shape: Option<AdapterShape>,
        model: PathBuf,
        model_sha256: Option<String>,
        startup: &str,
        commands: Sender<Command>,
    ) -> Self {
        let mut entries = BTreeMap::new();
        let default = (!startup.is_empty()).then(|| {
            let (name, sha) = startup.split_once('@').unwrap_or((startup, ""));
            let mut e = Entry::new(None);
            e.resident = Some(Resident {
                id: STARTUP,
                bytes: 0,
                last_used: 0,
                lease: Arc::new(()),
            });
            e.pinned = true;
            e.sha256 = sha.to_string();
            e.weights = chain_hash(if sha.is_empty() { name } else { sha });
            e.loads = 1;
            entries.insert(name.to_string(), e);
            name.to_string()
        });
        let lock = OnceLock::new();
        if let Some(sha) = model_sha256 {
            let _ = lock.set(sha);
        }
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    entries,
                    next_id: STARTUP + 1,
                    clock: 0,
                }),
                settings,
                shape,
                model,
                model_sha256: lock,
                default,
                commands,
                observer: Mutex::new(None),
            }),
        }
    }

    /// Reports adapter events to `f` from now on (metrics).
    pub fn observe(&self, f: impl Fn(&AdapterEvent) + Send + Sync + 'static) {
        *self
            .inner
            .observer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(f));
    }

    fn emit(&self, event: AdapterEvent) {
        let observer = self
            .inner
            .observer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(f) = observer {
            f(&event);
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(&self, name: &str) -> Option<PathBuf> {
        let dir = self.inner.settings.dir.as_ref()?;
        let path = dir.join(format!("{name}.safetensors"));
        path.is_file().then_some(path)
    }

    /// The adapter a job named `name` runs with ("" = the default, [`BASE_NAME`] = none),
    /// made resident if it is not, leased for as long as the returned value lives.
    pub fn resolve(&self, name: &str) -> Result<AdapterUse, EngineError> {
        let name = match name {
            "" => match &self.inner.default {
                Some(d) => d.as_str(),
                None => return Ok(AdapterUse::default()),
            },
            BASE_NAME => {
                if self.inner.shape.is_none() && self.inner.default.is_some() {
                    return Err(invalid(
                        "this backend serves its start-up adapter only; the base model alone \
                         is not available",
                    ));
                }
                return Ok(AdapterUse::default());
            }
            n => n,
        };
        if !valid_name(name) {
            return Err(invalid(format!(
                "adapter name {name:?} is not valid: letters, digits, '.', '_' and '-' only"
            )));
        }
        let mut state = self.state();
        state.clock += 1;
        let clock = state.clock;
        if let Some(e) = state.entries.get_mut(name)
            && let Some(r) = &mut e.resident
        {
            r.last_used = clock;
            return Ok(AdapterUse {
                id: r.id,
                weights: e.weights,
                name: describe(name, &e.sha256),
                _lease: Some(r.lease.clone()),
            });
        }
        if !state.entries.contains_key(name) && self.file(name).is_none() {
            return Err(invalid(format!(
                "unknown adapter {name:?}: load it first, or put {name}.safetensors in the \
                 adapter directory"
            )));
        }
        self.make_resident(&mut state, name, None, false)
    }

    /// Registers (with `bytes`, or from the directory without) and makes resident the adapter
    /// `name`, optionally pinned against eviction.
    pub fn load(
        &self,
        name: &str,
        bytes: Option<Vec<u8>>,
        pin: bool,
    ) -> Result<AdapterInfo, EngineError> {
        if !valid_name(name) || name == BASE_NAME {
            return Err(invalid(format!(
                "adapter name {name:?} is not valid: letters, digits, '.', '_' and '-' only, \
                 and not {BASE_NAME:?}"
            )));
        }
        let bytes = bytes.map(Arc::new);
        let mut state = self.state();
        if let Some(e) = state.entries.get_mut(name) {
            let same = match (&bytes, &e.bytes) {
                (None, _) => true,
                (Some(new), Some(old)) => new == old,
                (Some(_), None) => false,
            };
            if !same && e.resident.is_some() {
                return Err(EngineError::FailedPrecondition(format!(
                    "adapter {name:?} is loaded with other weights; unload it first"
                )));
            }
            if !same {
                e.bytes = bytes.clone();
            }
            e.pinned |= pin;
        } else if bytes.is_none() && self.file(name).is_none() {
            return Err(EngineError::NotFound(format!(
                "no adapter {name:?} in the adapter directory{}",
                match &self.inner.settings.dir {
                    Some(d) => format!(" {}", d.display()),
                    None => " (none is set: pass --adapter-dir, or send the file's bytes)".into(),
                }
            )));
        }
        let resident = state
            .entries
            .get(name)
            .is_some_and(|e| e.resident.is_some());
        if !resident {
            drop(self.make_resident(&mut state, name, bytes, pin)?);
        }
        let e = &state.entries[name];
        Ok(info(name, e))
    }

    /// Removes adapter `name` from the backend and forgets bytes a caller gave; refused while
    /// a job runs on it or for the start-up adapter.
    pub fn unload(&self, name: &str) -> Result<(), EngineError> {
        let mut state = self.state();
        if self.inner.default.as_deref() == Some(name) {
            return Err(EngineError::FailedPrecondition(format!(
                "{name:?} is the start-up adapter, which jobs naming none run with"
            )));
        }
        let Some(e) = state.entries.get(name) else {
            return Err(EngineError::NotFound(format!(
                "adapter {name:?} is not loaded"
            )));
        };
        let running = e.running();
        if running > 0 {
            return Err(EngineError::FailedPrecondition(format!(
                "adapter {name:?} has {running} jobs running or queued"
            )));
        }
        let Some(e) = state.entries.remove(name) else {
            return Ok(());
        };
        if let Some(r) = e.resident {
            let _ = self.inner.commands.send(Command::Remove(r.id));
        }
        drop(state);
        self.emit(AdapterEvent::Unloaded(name.to_string()));
        Ok(())
    }

    /// Every adapter registered (loaded, or in the directory), by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let state = self.state();
        let mut out: BTreeMap<String, AdapterInfo> = state
            .entries
            .iter()
            .map(|(n, e)| (n.clone(), info(n, e)))
            .collect();
        drop(state);
        if let Some(dir) = &self.inner.settings.dir
            && let Ok(files) = std::fs::read_dir(dir)
        {
            for f in files.flatten() {
                let path = f.path();
                let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".safetensors"))
                else {
                    continue;
                };
                if valid_name(name) && !out.contains_key(name) {
                    out.insert(name.to_string(), info(name, &Entry::new(None)));
                }
            }
        }
        out.into_values().collect()
    }

    /// The shape run-time adapters must have (`None`: the backend takes none).
    pub fn shape(&self) -> Option<&AdapterShape> {
        self.inner.shape.as_ref()
    }

    /// The base model's sha256 (hashed on the first call, unless the loader knew it).
    pub fn base_sha256(&self) -> Result<String, EngineError> {
        self.model_sha256().map(str::to_string)
    }

    fn model_sha256(&self) -> Result<&str, EngineError> {
        if let Some(s) = self.inner.model_sha256.get() {
            return Ok(s);
        }
        let sha = ghostwriter_common::models::sha256_file(&self.inner.model)
            .map_err(|e| EngineError::Inference(format!("hashing the base model: {e}")))?;
        Ok(self.inner.model_sha256.get_or_init(|| sha))
    }

    /// Reads, checks and installs `name` (registered or in the directory), evicting the least
    /// recently used unleased, unpinned adapters to fit the budget.
    fn make_resident(
        &self,
        state: &mut State,
        name: &str,
        new_bytes: Option<Arc<Vec<u8>>>,
        pin: bool,
    ) -> Result<AdapterUse, EngineError> {
        let started = Instant::now();
        let Some(shape) = &self.inner.shape else {
            return Err(EngineError::FailedPrecondition(
                "this backend serves only the adapter it was started with (--adapter)".into(),
            ));
        };
        let given = new_bytes.or_else(|| state.entries.get(name).and_then(|e| e.bytes.clone()));
        let bytes = match &given {
            Some(b) => b.clone(),
            None => {
                let path = self.file(name).ok_or_else(|| {
                    invalid(format!("adapter {name:?} is gone from the directory"))
                })?;
                Arc::new(std::fs::read(&path).map_err(|e| {
                    EngineError::Inference(format!("reading {}: {e}", path.display()))
                })?)
            }
        };
        let adapter = Adapter::from_bytes(&bytes, &format!("adapter {name:?}"))
            .map_err(|e| invalid(format!("{e:#}")))?;
        let base = self.model_sha256()?.to_string();
        adapter
            .check(shape.layers, |p| shape.widths.get(p).copied(), Some(&base))
            .map_err(|e| invalid(format!("adapter {name:?}: {e:#}")))?;
        let size = adapter.weight_bytes();
        let budget = self.inner.settings.memory_bytes;
        if size > budget {
            return Err(EngineError::ResourceExhausted(format!(
                "adapter {name:?} needs {} MiB; the adapter memory is {} MiB (--adapter-memory-mb)",
                size.div_ceil(1 << 20),
                budget >> 20
            )));
        }
        // Evict the least recently used adapters no job holds until it fits.
        let mut evicted = Vec::new();
        loop {
            let used: usize = state
                .entries
                .values()
                .filter_map(|e| e.resident.as_ref().map(|r| r.bytes))
                .sum();
            if used + size <= budget {
                break;
            }
            let victim = state
                .entries
                .iter()
                .filter(|(_, e)| !e.pinned && e.resident.is_some() && e.running() == 0)
                .min_by_key(|(_, e)| e.resident.as_ref().map_or(0, |r| r.last_used))
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else {
                return Err(EngineError::ResourceExhausted(format!(
                    "no room for adapter {name:?} ({} MiB): the {} MiB of adapter memory hold \
                     pinned adapters or adapters with running jobs",
                    size.div_ceil(1 << 20),
                    budget >> 20
                )));
            };
            let e = state.entries.get_mut(&victim).expect("victim exists");
            if let Some(r) = e.resident.take() {
                let _ = self.inner.commands.send(Command::Remove(r.id));
            }
            e.evictions += 1;
            evicted.push(victim);
        }
        let sha = ghostwriter_common::models::sha256_bytes(&bytes);
        let id = state.next_id;
        state.next_id += 1;
        state.clock += 1;
        let adapter = Arc::new(adapter);
        self.inner
            .commands
            .send(Command::Install(id, adapter))
            .map_err(|_| EngineError::Stopped)?;
        let lease = Arc::new(());
        let entry = state
            .entries
            .entry(name.to_string())
            .or_insert_with(|| Entry::new(None));
        if given.is_some() {
            entry.bytes = given;
        }
        entry.pinned |= pin;
        entry.sha256 = sha[..12].to_string();
        entry.weights = chain_hash(&sha);
        entry.loads += 1;
        entry.resident = Some(Resident {
            id,
            bytes: size,
            last_used: state.clock,
            lease: lease.clone(),
        });
        let used = AdapterUse {
            id,
            weights: entry.weights,
            name: describe(name, &entry.sha256),
            _lease: Some(lease),
        };
        for v in evicted {
            self.emit(AdapterEvent::Evicted(v));
        }
        self.emit(AdapterEvent::Loaded(name.to_string(), started.elapsed()));
        Ok(used)
    }
}

fn describe(name: &str, sha: &str) -> String {
    if sha.is_empty() {
        name.to_string()
    } else {
        format!("{name}@{sha}")
    }
}

fn info(name: &str, e: &Entry) -> AdapterInfo {
    AdapterInfo {
        name: name.to_string(),
        resident: e.resident.is_some(),
        pinned: e.pinned,
        running: e.running(),
        bytes: e.resident.as_ref().map_or(0, |r| r.bytes),
        sha256: e.sha256.clone(),
        loads: e.loads,
        evictions: e.evictions,
    }
}
