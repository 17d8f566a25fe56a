//! One `ghostwriter serve` (or `up`) as a child process, the way every caller that starts one
//! needs it: started on port 0, its address read from the first line it prints (`listening on
//! URL`, once it is bound), the last lines of its log kept for the error that names it, and
//! killed (and reaped) when dropped, also when a test fails first (or stopped by a signal
//! first, [`StageProcess::stopped_by`]).

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead as _, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// How long a process may take to report its address.
pub const BIND_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of a process's log kept, and quoted in errors.
pub const TAIL_LINES: usize = 200;

/// A running child that reported where it listens.
pub struct StageProcess {
    name: String,
    child: Child,
    url: String,
    tail: Arc<Mutex<VecDeque<String>>>,
    /// How it is stopped when dropped: this signal, then SIGKILL after the grace period;
    /// `None`, SIGKILL at once.
    stop: Option<(&'static str, Duration)>,
}

/// How long [`StageProcess::wait_log`] waits between looks at the log.
const LOG_POLL: Duration = Duration::from_millis(50);

impl StageProcess {
    /// Spawns `cmd` (a `ghostwriter serve ... --listen HOST:0`, or anything that prints
    /// `listening on URL` as its first stdout line once bound) and waits for that line. The
    /// rest of its stdout goes on to ours; its stderr goes on to ours too, and its last lines
    /// are kept ([`Self::log_tail`]). A process that exits or stays silent for [`BIND_TIMEOUT`]
    /// is killed and the error names it, with its log.
    pub async fn spawn(name: impl Into<String>, cmd: Command) -> anyhow::Result<Self> {
        Self::spawn_keeping(name, cmd, TAIL_LINES).await
    }

    /// [`Self::spawn`], keeping the last `lines` lines of its stderr instead of
    /// [`TAIL_LINES`] (a caller that checks every line of a log keeps them all).
    pub async fn spawn_keeping(
        name: impl Into<String>,
        mut cmd: Command,
        lines: usize,
    ) -> anyhow::Result<Self> {
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
                    if t.len() >= lines.max(1) {
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
            stop: None,
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

    /// The last lines of its stderr (at most [`TAIL_LINES`]), for errors.
    pub fn log_tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let skip = t.len().saturating_sub(TAIL_LINES);
        t.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// Every line of its stderr kept so far (see [`Self::spawn_keeping`]).
    pub fn log_lines(&self) -> Vec<String> {
        let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().cloned().collect()
    }

    /// Waits until a kept line of its stderr satisfies `matches` and returns it (the first such
    /// line); fails at once, with its log, if it exits first, and after `timeout` otherwise.
    pub async fn wait_log(
        &mut self,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            let found = {
                let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                t.iter().find(|l| matches(l)).cloned()
            };
            if let Some(line) = found {
                return Ok(line);
            }
            if let Some(status) = self.try_wait() {
                // Its last words are on stderr: give the reading thread a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let t = self.tail.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(line) = t.iter().find(|l| matches(l)) {
                    return Ok(line.clone());
                }
                drop(t);
                anyhow::bail!(
                    "the {} process exited ({status}) before logging the line waited for:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            anyhow::ensure!(
                started.elapsed() < timeout,
                "the {} process did not log the line waited for within {timeout:?}:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(LOG_POLL).await;
        }
    }

    /// The TCP addresses it listens on: its API's and any other it has bound, such as a
    /// `--metrics-listen HOST:0` endpoint, whose port it does not print. Read from Linux's
    /// `/proc` (its socket inodes, then the listening sockets of its network namespace).
    pub fn listening(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let pid = self.pid();
        let mut inodes = HashSet::new();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("reading the sockets of the {} process", self.name))?;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
            {
                inodes.insert(inode.to_string());
            }
        }
        let mut out = Vec::new();
        for table in ["tcp", "tcp6"] {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
                continue;
            };
            // sl, local_address, rem_address, st (0A: LISTEN), ..., inode (the tenth field).
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                    out.extend(proc_net_address(fields[1]));
                }
            }
        }
        Ok(out)
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

    /// Stops it with `signal` when dropped, and kills it only if it has not exited within
    /// `grace`: for a process that must stop its own children (`up --processes` on SIGINT),
    /// which SIGKILL would leave running.
    pub fn stopped_by(mut self, signal: &'static str, grace: Duration) -> Self {
        self.stop = Some((signal, grace));
        self
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

/// A `/proc/net/tcp{,6}` address, `HEXIP:HEXPORT`: the IP's bytes in network order printed as
/// native-endian 32-bit words, the port as a number.
fn proc_net_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..ip.len()).step_by(8) {
        let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
        bytes.extend(word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        if let Some((signal, grace)) = self.stop
            && self.signal(signal).is_ok()
        {
            let started = Instant::now();
            while started.elapsed() < grace {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_addresses_parse() {
        // What `/proc/net/tcp` shows for a socket bound to 127.0.0.2:8080.
        let v4 = u32::from_ne_bytes([127, 0, 0, 2]);
        let text = format!("{v4:08X}:1F90");
        assert_eq!(
            proc_net_address(&text),
            Some("127.0.0.2:8080".parse().unwrap())
        );
        let any6 = format!("{}:0050", "00000000".repeat(4));
        assert_eq!(proc_net_address(&any6), Some("[::]:80".parse().unwrap()));
        assert_eq!(proc_net_address("zz:0050"), None);
    }

    #[tokio::test]
    async fn a_process_that_listens_reports_its_sockets_and_log() {
        // A real listener: Python binds port 0 on loopback, reports it as `serve` does, logs
        // a line and waits.
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import socket, sys, time\n\
             s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n\
             print(f'listening on http://127.0.0.1:{s.getsockname()[1]}', flush=True)\n\
             print('ready', file=sys.stderr, flush=True)\n\
             time.sleep(60)",
        ]);
        let mut p = StageProcess::spawn("listener", cmd).await.unwrap();
        let port: u16 = p.url().rsplit(':').next().unwrap().parse().unwrap();
        assert_eq!(
            p.listening().unwrap(),
            vec![SocketAddr::from(([127, 0, 0, 1], port))]
        );
        let line = p
            .wait_log(Duration::from_secs(10), |l| l == "ready")
            .await
            .unwrap();
        assert_eq!(line, "ready");
        p.kill();
        let gone = p.wait_log(Duration::from_secs(10), |l| l == "never").await;
        assert!(gone.unwrap_err().to_string().contains("exited"));
    }
}
