//! One `ghostwriter serve` as a child process, the way every caller that starts one needs it:
//! started on port 0, its address read from the first line it prints (`listening on URL`, once
//! it is bound), the last lines of its log kept for the error that names it, and killed (and
//! reaped) when dropped, also when a test fails first.

use std::collections::VecDeque;
use std::io::{BufRead as _, Write as _};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a process may take to report its address.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of a process's log kept for errors.
const TAIL_LINES: usize = 200;

/// A running child that reported where it listens.
pub struct StageProcess {
    name: String,
    child: Child,
    url: String,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl StageProcess {
    /// Spawns `cmd` (a `ghostwriter serve ... --listen HOST:0`, or anything that prints
    /// `listening on URL` as its first stdout line once bound) and waits for that line. The
    /// rest of its stdout goes on to ours; its stderr goes on to ours too, and its last lines
    /// are kept ([`Self::log_tail`]). A process that exits or stays silent for [`BIND_TIMEOUT`]
    /// is killed and the error names it, with its log.
    pub async fn spawn(name: impl Into<String>, mut cmd: Command) -> anyhow::Result<Self> {
        let name = name.into();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name} process"))?;
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(std::io::stderr(), "{line}");
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        let stdout = child.stdout.take().context("the process has no stdout")?;
        let read = tokio::task::spawn_blocking(move || {
            let mut reader = std::io::BufReader::new(stdout);
            let mut line = String::new();
            reader.read_line(&mut line).map(|_| (reader, line))
        });
        let mut me = Self {
            name,
            child,
            url: String::new(),
            tail,
        };
        let (reader, line) = match tokio::time::timeout(BIND_TIMEOUT, read).await {
            Ok(read) => read??,
            Err(_) => {
                // Killing it closes the pipe, which ends the blocked read.
                me.kill();
                anyhow::bail!(
                    "the {} process did not report its address within {BIND_TIMEOUT:?}\n{}",
                    me.name,
                    me.log_tail()
                );
            }
        };
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            me.kill();
            // Its last words are on stderr, read by the thread above: give it a moment.
            std::thread::sleep(Duration::from_millis(100));
            anyhow::bail!(
                "the {} process did not report its address (first line: {line:?})\n{}",
                me.name,
                me.log_tail()
            );
        };
        me.url = url.to_string();
        std::thread::spawn(move || {
            let mut reader = reader;
            let _ = std::io::copy(&mut reader, &mut std::io::stdout());
        });
        Ok(me)
    }

    /// The URL it reported.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What it was started as (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its stderr.
    pub fn log_tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Sends a signal by name (`TERM`, `INT`, `STOP`, `CONT`, `KILL`).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} {} failed", self.name);
        Ok(())
    }

    /// Kills it at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until its health service reports SERVING, called over `tls` when given; fails at
    /// once, with its log, if it exits first, and after `timeout` otherwise.
    pub async fn wait_serving(
        &mut self,
        tls: Option<&ghostwriter_transport::Tls>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let url = self.url.clone();
        let serving = ghostwriter_transport::client::wait_until_serving(&url, "", timeout, tls);
        tokio::pin!(serving);
        loop {
            tokio::select! {
                served = &mut serving => {
                    return served.map_err(|s| {
                        anyhow::anyhow!("the {} process: {}\n{}", self.name, s.message(), self.log_tail())
                    });
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if let Some(status) = self.try_wait() {
                        // Its last words are on stderr: give the reading thread a moment.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        anyhow::bail!(
                            "the {} process exited ({status}) before serving:\n{}",
                            self.name,
                            self.log_tail()
                        );
                    }
                }
            }
        }
    }

    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for it to exit on its own.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if started.elapsed() >= timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
