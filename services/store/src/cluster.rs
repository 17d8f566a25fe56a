//! A throwaway Postgres cluster for tests and benchmarks: `initdb` and `pg_ctl` on a temporary
//! directory and a loopback port (run as the `postgres` system user when we are root, since
//! Postgres refuses to run as root), stopped and removed on drop. Durability is traded for speed
//! (`fsync=off`): its data is thrown away anyway.

use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Where Postgres's server programs are: `GHOSTWRITER_PG_BIN`, else the newest
/// `/usr/lib/postgresql/N/bin` (Debian's `postgresql` package), else `pg_config --bindir`.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("GHOSTWRITER_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.join("initdb").is_file().then_some(dir)
}

/// The uid and gid of the `postgres` system user, when we run as root (else `None`: run as
/// ourselves).
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if me != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            return Ok(Some((f[2].parse()?, f[3].parse()?)));
        }
    }
    bail!("running as root needs the `postgres` system user (Debian's postgresql package makes it)")
}

/// Settings of a throwaway cluster.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve TLS with this certificate and key (PEM).
    pub tls: Option<(String, String)>,
}

/// A running throwaway cluster; its superuser is `postgres`, trusted on loopback.
pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    port: u16,
    options: Options,
}

impl Cluster {
    /// Creates and starts a cluster; fails when Postgres is not installed.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default())
    }

    /// [`Self::start`] with `options`.
    pub fn start_with(options: Options) -> anyhow::Result<Self> {
        let bin = bin_dir().context(
            "Postgres is not installed (no initdb: install Debian's postgresql, or set GHOSTWRITER_PG_BIN)",
        )?;
        let owner = run_as()?;
        let dir = tempfile::Builder::new()
            .prefix("ghostwriter-pg")
            .tempdir()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let me = Self {
            dir,
            bin,
            owner,
            port: free_port()?,
            options,
        };
        let out = me
            .command("initdb")
            .arg("-D")
            .arg(me.data())
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        if let Some((cert, key)) = &me.options.tls {
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = me.data().join(name);
                std::fs::write(&path, pem)?;
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                }
            }
        }
        me.start_server()?;
        Ok(me)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        cmd
    }

    fn start_server(&self) -> anyhow::Result<()> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='{}' \
             -c fsync=off -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        if self.options.tls.is_some() {
            options.push_str(" -c ssl=on");
        }
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "-o", &options, "start"])
            .stdout(Stdio::null())
            .output()
            .context("running pg_ctl start")?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` as the superuser in database `db` (through `psql`).
    pub fn sql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let out = self
            .command("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-tAc", sql])
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates database `name` and returns its URL.
    pub fn database(&self, name: &str) -> anyhow::Result<String> {
        self.sql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.url(name))
    }

    /// Makes loopback TCP connections authenticate with a password (SCRAM) from now on.
    pub fn require_passwords(&self) -> anyhow::Result<()> {
        let hba = "local all all trust\nhost all postgres 127.0.0.1/32 trust\n\
                   host all all 127.0.0.1/32 scram-sha-256\n";
        let path = self.data().join("pg_hba.conf");
        std::fs::write(&path, hba)?;
        self.sql("postgres", "SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// Stops the server (`immediate`: like a crash), keeping its data.
    pub fn stop(&self) -> anyhow::Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Starts the stopped server again, on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.start_server()
    }

    /// The data directory's path (its log is beside it, `../log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(ghostwriter_common::net::free_port()?)
}

/// A cluster for a test: started, or — when Postgres is missing — a failure, unless
/// `GHOSTWRITER_ALLOW_SKIP=1`, where the test is skipped (`None`).
pub fn for_test() -> Option<Cluster> {
    for_test_with(Options::default())
}

/// [`for_test`] with `options`.
pub fn for_test_with(options: Options) -> Option<Cluster> {
    let skip = std::env::var("GHOSTWRITER_ALLOW_SKIP").is_ok_and(|v| v == "1");
    if bin_dir().is_none() && skip {
        eprintln!("SKIPPED: Postgres is not installed");
        return None;
    }
    match Cluster::start_with(options) {
        Ok(c) => Some(c),
        Err(e) => panic!("{e:#} (set GHOSTWRITER_ALLOW_SKIP=1 to skip when Postgres is missing)"),
    }
}
