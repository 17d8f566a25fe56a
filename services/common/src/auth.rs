//! Authentication at the public API, bound to users: a static token file (`--auth-tokens`)
//! whose lines are `TOKEN USER_ID` (the token may act for that user only) or `TOKEN *` (an
//! administrator: any user, e.g. bulk ingest and evaluation). Callers send
//! `authorization: Bearer TOKEN`.
//!
//! Missing or unknown credentials get UNAUTHENTICATED; acting for another user gets
//! PERMISSION_DENIED. Neither message says whether the user exists.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tonic::Status;
use tonic::metadata::MetadataMap;

/// What a caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Act for this user only.
    User(String),
    /// Act for any user.
    Admin,
}

impl Grant {
    /// Allows acting for `user_id`, or PERMISSION_DENIED.
    pub fn allow(&self, user_id: &str) -> Result<(), Status> {
        match self {
            Grant::Admin => Ok(()),
            Grant::User(u) if u == user_id => Ok(()),
            Grant::User(_) => Err(Status::permission_denied(
                "this credential may not act for the requested user",
            )),
        }
    }
}

/// The tokens of a token file.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    grants: HashMap<String, Grant>,
}

impl Tokens {
    /// Parses `TOKEN USER_ID` / `TOKEN *` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut grants = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(user), None) = (parts.next(), parts.next(), parts.next()) else {
                anyhow::bail!("line {}: expected `TOKEN USER_ID` or `TOKEN *`", i + 1);
            };
            if token.len() < 16 {
                anyhow::bail!("line {}: tokens must be at least 16 characters", i + 1);
            }
            let grant = if user == "*" {
                Grant::Admin
            } else {
                Grant::User(user.to_string())
            };
            if grants.insert(token.to_string(), grant).is_some() {
                anyhow::bail!("line {}: the token appears twice", i + 1);
            }
        }
        if grants.is_empty() {
            anyhow::bail!("the token file holds no token");
        }
        Ok(Self { grants })
    }

    /// Reads a token file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

/// The public API's authenticator; `None` inside means authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Auth(Option<Arc<Tokens>>);

impl Auth {
    /// Authentication with these tokens.
    pub fn tokens(tokens: Tokens) -> Self {
        Self(Some(Arc::new(tokens)))
    }

    /// Whether credentials are checked.
    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The caller's grant from its `authorization` header (with authentication off, everyone
    /// is an administrator).
    pub fn grant(&self, metadata: &MetadataMap) -> Result<Grant, Status> {
        let Some(tokens) = &self.0 else {
            return Ok(Grant::Admin);
        };
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("missing credentials: send `authorization: Bearer TOKEN`")
            })?;
        tokens
            .grants
            .get(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("invalid credentials"))
    }
}

/// Adds `authorization: Bearer TOKEN` to a request (clients: `--token`).
pub fn bearer<T>(request: &mut tonic::Request<T>, token: Option<&str>) -> anyhow::Result<()> {
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(header: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(h) = header {
            m.insert("authorization", h.parse().unwrap());
        }
        m
    }

    #[test]
    fn tokens_bind_callers_to_users() {
        let tokens =
            Tokens::parse("# comment\nalice-token-0123456789 alice\n\nadmin-token-0123456789 *\n")
                .unwrap();
        let auth = Auth::tokens(tokens);
        let alice = auth
            .grant(&md(Some("Bearer alice-token-0123456789")))
            .unwrap();
        assert!(alice.allow("alice").is_ok());
        let denied = alice.allow("bob").unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let admin = auth
            .grant(&md(Some("Bearer admin-token-0123456789")))
            .unwrap();
        assert!(admin.allow("bob").is_ok());
        for bad in [None, Some("Bearer nope-nope-nope-nope"), Some("Basic abc")] {
            assert_eq!(
                auth.grant(&md(bad)).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
        assert_eq!(Auth::default().grant(&md(None)).unwrap(), Grant::Admin);
        assert!(Tokens::parse("short alice").is_err());
        assert!(Tokens::parse("alice-token-0123456789 a b").is_err());
        assert!(Tokens::parse("# nothing").is_err());
    }
}
