//! Files re-read when they change: certificates, credential files, password files. One polling
//! loop serves them all (a watch on the files themselves misses Kubernetes' Secret updates,
//! which swap a symlinked directory).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// How often watched files are checked for changes by default.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The modification times of `files` (None for one that cannot be read).
fn modified(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// What a reload says.
pub enum Reload {
    /// The files loaded and are now in force.
    Loaded,
    /// The files did not load; the previous ones stay in force (tried again at their next
    /// change: they may be half written).
    Failed(anyhow::Error),
    /// Whoever used the files is gone: stop watching.
    Stop,
}

/// Polls `files` every `every` from now on (their times now count as loaded) and calls `reload`
/// when any of them changes. `what` names the files in the log lines. Needs a tokio runtime.
pub fn watch_files<F>(
    what: &'static str,
    files: Vec<PathBuf>,
    every: Duration,
    mut reload: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Reload + Send + 'static,
{
    let mut seen = modified(&files);
    tokio::spawn(async move {
        let mut failed = None;
        loop {
            tokio::time::sleep(every).await;
            let now = modified(&files);
            if now == seen || failed.as_ref() == Some(&now) {
                continue;
            }
            match reload() {
                Reload::Loaded => {
                    (seen, failed) = (now, None);
                    tracing::info!("{what} reloaded");
                }
                Reload::Failed(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "{what} changed but do not load; keeping the previous ones");
                    failed = Some(now);
                }
                Reload::Stop => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_change_reloads_and_a_failed_one_waits_for_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "one").unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let path = file.clone();
        let task = watch_files(
            "test file",
            vec![file.clone()],
            Duration::from_millis(20),
            move || {
                c.fetch_add(1, Ordering::SeqCst);
                match std::fs::read_to_string(&path).unwrap().as_str() {
                    "bad" => Reload::Failed(anyhow::anyhow!("bad")),
                    "stop" => Reload::Stop,
                    _ => Reload::Loaded,
                }
            },
        );
        let wait_for = |n: usize| {
            let calls = calls.clone();
            async move {
                for _ in 0..200 {
                    if calls.load(Ordering::SeqCst) >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("no reload {n}");
            }
        };
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "unchanged files are not reloaded"
        );
        // Modification times have a coarse grain on some file systems: set them explicitly.
        let touch = |text: &str, secs: u64| {
            std::fs::write(&file, text).unwrap();
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            std::fs::File::options()
                .write(true)
                .open(&file)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        touch("bad", 1_000);
        wait_for(1).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a failed load waits for a change"
        );
        touch("two", 2_000);
        wait_for(2).await;
        touch("stop", 3_000);
        wait_for(3).await;
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the watch stops")
            .unwrap();
    }
}
