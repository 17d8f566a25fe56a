//! Where a running Ghostwriter's public API is, for every command that calls one.

/// Default address of the public API (`up`'s).
pub const DEFAULT_URL: &str = "http://127.0.0.1:50051";

/// The public API a command calls and the credential it calls with (said once for every
/// command: `write`, `ingest`, `delete`, `distinguish`, `info`, `presets`, `eval`).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Connection")]
pub struct RemoteArgs {
    /// Ghostwriter API: a URL, or HOST:PORT (http://, or https:// with --tls-ca). Default
    /// for commands that need one: http://127.0.0.1:50051; `presets` and `eval` without it
    /// use what is built in (their own embedded pipeline).
    #[arg(long, env = "GHOSTWRITER_URL")]
    pub to: Option<String>,
    /// Bearer token of the public API (one that may act for the users named; an
    /// administrator's for commands that span users).
    #[arg(long, env = "GHOSTWRITER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl RemoteArgs {
    /// `--to`, or the default address.
    pub fn to_or_default(&self) -> &str {
        self.to.as_deref().unwrap_or(DEFAULT_URL)
    }
}
