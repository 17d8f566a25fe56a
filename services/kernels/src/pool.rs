//! A small compute pool for one forward pass: the calling thread works too, and the helper
//! threads spin between the many short parallel regions of a step (about 150 GEMMs and
//! attention passes per forward) instead of sleeping and being woken for each, which costs more
//! than the work itself at batch size 1. After `SPIN` without work they park, so an idle
//! generator burns no CPU. (llama.cpp's thread pool polls the same way.)
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a helper spins for the next parallel region before parking.
const SPIN: Duration = Duration::from_millis(2);
/// After this long a waiting thread yields its core between checks, so that other work of the
/// process (the embedding stages of `up`) is not starved by spinning.
const BUSY: Duration = Duration::from_micros(50);

struct Job {
    /// The region's body; valid while the region runs (see [`Pool::run`]).
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

// SAFETY: `f` is only called for claimed indices `< n`, all of which complete before `run`
// returns, and `f` is `Sync`.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs indices until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.n {
                return;
            }
            // SAFETY: an index below `n` was claimed, so `run` has not returned yet and `f`
            // is alive.
            unsafe { (*self.f)(i) };
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

struct Shared {
    epoch: AtomicU64,
    job: Mutex<Option<Arc<Job>>>,
    wake: Condvar,
    parked: AtomicUsize,
    stop: AtomicU64,
}

/// The pool: `threads - 1` helpers plus the caller.
pub struct Pool {
    shared: Arc<Shared>,
    helpers: Vec<std::thread::JoinHandle<()>>,
    threads: usize,
}

impl Pool {
    /// A pool of `threads` threads in all (the caller included); helpers are named
    /// `{name}-compute-N`.
    pub fn new(threads: usize, name: &str) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            wake: Condvar::new(),
            parked: AtomicUsize::new(0),
            stop: AtomicU64::new(0),
        });
        let helpers = (1..threads)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-compute-{i}"))
                    .spawn(move || helper(&s))
                    .expect("spawning a compute thread")
            })
            .collect();
        Self {
            shared,
            helpers,
            threads,
        }
    }

    /// Threads in all.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0..n)` across the pool and returns when every index is done.
    pub fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.threads == 1 {
            (0..n).for_each(f);
            return;
        }
        // SAFETY: the lifetime is erased only for the duration of this call: every claimed
        // index finishes before the wait below ends, and unclaimed indices are never run.
        let f: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        let job = Arc::new(Job {
            f,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        });
        {
            let mut slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(job.clone());
            self.shared.epoch.fetch_add(1, Ordering::AcqRel);
        }
        if self.shared.parked.load(Ordering::Acquire) > 0 {
            self.shared.wake.notify_all();
        }
        job.work();
        let waiting = Instant::now();
        while job.done.load(Ordering::Acquire) < n {
            if waiting.elapsed() > BUSY {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn helper(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) != 0 {
                return;
            }
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && started.elapsed() > BUSY {
                std::thread::yield_now();
            }
            if spins.is_multiple_of(1024) && started.elapsed() > SPIN {
                // Park until the next region.
                let guard = s.job.lock().unwrap_or_else(|e| e.into_inner());
                s.parked.fetch_add(1, Ordering::AcqRel);
                let guard = s
                    .wake
                    .wait_while(guard, |_| {
                        s.epoch.load(Ordering::Acquire) == seen
                            && s.stop.load(Ordering::Acquire) == 0
                    })
                    .unwrap_or_else(|e| e.into_inner());
                s.parked.fetch_sub(1, Ordering::AcqRel);
                drop(guard);
                continue;
            }
            std::hint::spin_loop();
        }
        let job = s.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(1, Ordering::Release);
        {
            let _g = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Hands out disjoint `chunk`-sized pieces of `data` to `f(index, piece)` across the pool.
pub fn for_each_chunk_mut(
    pool: &Pool,
    data: &mut [f32],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let n = data.len() / chunk;
    let base = SyncPtr(data.as_mut_ptr());
    pool.run(n, &|i| {
        let p = base;
        // SAFETY: index i covers elements [i·chunk, (i+1)·chunk), disjoint from every other
        // index and within `data`, which outlives the call.
        let piece = unsafe { std::slice::from_raw_parts_mut(p.0.add(i * chunk), chunk) };
        f(i, piece);
    });
}

/// Hands out the disjoint `ranges` of `data` (sorted, non-overlapping, within `data`) to
/// `f(index, piece)` across the pool.
pub fn for_each_range_mut(
    pool: &Pool,
    data: &mut [f32],
    ranges: &[std::ops::Range<usize>],
    f: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let mut end = 0;
    for r in ranges {
        assert!(
            end <= r.start && r.start <= r.end,
            "ranges overlap or are unsorted"
        );
        end = r.end;
    }
    assert!(end <= data.len(), "a range is past the data");
    let base = SyncPtr(data.as_mut_ptr());
    pool.run(ranges.len(), &|i| {
        let p = base;
        let r = &ranges[i];
        // SAFETY: the ranges were checked above to be disjoint and within `data`, which
        // outlives the call.
        let piece = unsafe { std::slice::from_raw_parts_mut(p.0.add(r.start), r.end - r.start) };
        f(i, piece);
    });
}

#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: used only to hand out disjoint pieces (see `for_each_chunk_mut`).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once() {
        let pool = Pool::new(3, "test");
        for n in [1usize, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        std::thread::sleep(Duration::from_millis(10)); // helpers park
        let mut v = vec![0f32; 12];
        for_each_chunk_mut(&pool, &mut v, 3, &|i, piece| piece.fill(i as f32));
        assert_eq!(v, [0., 0., 0., 1., 1., 1., 2., 2., 2., 3., 3., 3.]);
        for_each_range_mut(&pool, &mut v, &[0..1, 4..9, 9..9, 11..12], &|i, piece| {
            piece.fill(10.0 + i as f32)
        });
        assert_eq!(v, [10., 0., 0., 1., 11., 11., 11., 11., 11., 3., 3., 13.]);
    }
}
