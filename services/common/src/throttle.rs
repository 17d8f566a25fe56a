//! Repeated identical warnings, rate-limited: while a stage is down every failed call would
//! log the same line (thousands a second); a [`Throttle`] lets the first through at once, then
//! at most one per interval and key, saying how many it held back in between.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one repeated warning is logged at most, by default.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(10);

/// Keys remembered at most (the oldest are forgotten past it).
const MAX_KEYS: usize = 1024;

/// Rate limits log lines by key (see the module docs).
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(DEFAULT_EVERY)
    }
}

impl Throttle {
    /// At most one line per `every` and key.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            seen: Mutex::default(),
        }
    }

    /// Whether the line of `key` may be logged now: `Some(n)` with the number of lines of the
    /// same key held back since the last one logged, or `None` to hold this one back.
    pub fn allow(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last, held)) = seen.get_mut(key) {
            if now.duration_since(*last) < self.every {
                *held += 1;
                return None;
            }
            let n = *held;
            *last = now;
            *held = 0;
            return Some(n);
        }
        if seen.len() >= MAX_KEYS {
            let every = self.every;
            seen.retain(|_, (last, _)| now.duration_since(*last) < every);
            if seen.len() >= MAX_KEYS {
                seen.clear();
            }
        }
        seen.insert(key.to_string(), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_passes_then_one_per_interval_with_a_count() {
        let t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.allow("a"), Some(0));
        assert_eq!(t.allow("b"), Some(0), "keys are limited apart");
        let held = (0..1000).filter(|_| t.allow("a").is_some()).count();
        assert_eq!(held, 0);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.allow("a"), Some(1000));
        assert_eq!(t.allow("a"), None);
    }
}
