//! Authentication at the public API, bound to users. Callers send `authorization: Bearer
//! TOKEN`, where TOKEN is either
//! - a static token from a token file (`--auth-tokens`) whose lines are `TOKEN USER_ID` (that
//!   user only) or `TOKEN *` (an administrator: any user, e.g. bulk ingest and evaluation), or
//! - a JWT: HS256 with a shared secret (`--auth-jwt-secret-file`) or RS256/ES256 with a PEM
//!   public key (`--auth-jwt-keys`); issuer and audience are checked, `exp` is required and
//!   `nbf` honoured; `sub` is the only user it may act for, unless its `scope` holds
//!   `ghostwriter:admin`.
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

/// The scope that may act for any user.
pub const ADMIN_SCOPE: &str = "ghostwriter:admin";

/// JWT verification: one key, its algorithm, the expected issuer and audience.
pub struct Jwt {
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("algorithms", &self.validation.algorithms)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: String,
}

impl Jwt {
    fn new(
        key: jsonwebtoken::DecodingKey,
        algorithm: jsonwebtoken::Algorithm,
        issuer: &str,
        audience: &str,
    ) -> Self {
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation.required_spec_claims = ["exp", "sub", "iss", "aud"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        Self { key, validation }
    }

    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], issuer: &str, audience: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= 32,
            "the JWT secret must be at least 32 bytes"
        );
        Ok(Self::new(
            jsonwebtoken::DecodingKey::from_secret(secret),
            jsonwebtoken::Algorithm::HS256,
            issuer,
            audience,
        ))
    }

    /// RS256 or ES256 with a PEM public key (RSA or P-256).
    pub fn public_key(pem: &[u8], issuer: &str, audience: &str) -> anyhow::Result<Self> {
        use jsonwebtoken::{Algorithm, DecodingKey};
        let (key, algorithm) = match DecodingKey::from_rsa_pem(pem) {
            Ok(k) => (k, Algorithm::RS256),
            Err(_) => (
                DecodingKey::from_ec_pem(pem)
                    .map_err(|e| anyhow::anyhow!("not an RSA or EC public key in PEM: {e}"))?,
                Algorithm::ES256,
            ),
        };
        Ok(Self::new(key, algorithm, issuer, audience))
    }

    fn grant(&self, token: &str) -> Result<Grant, Status> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|_| Status::unauthenticated("invalid credentials"))?;
        let c = data.claims;
        if c.scope.split_whitespace().any(|s| s == ADMIN_SCOPE) {
            Ok(Grant::Admin)
        } else if c.sub.is_empty() {
            Err(Status::unauthenticated("invalid credentials"))
        } else {
            Ok(Grant::User(c.sub))
        }
    }
}

/// How the public API authenticates (flags of `serve orchestrator` and `up`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// Token file of the public API: lines `TOKEN USER_ID` (acts for that user only) or
    /// `TOKEN *` (any user). Callers send `authorization: Bearer TOKEN`.
    #[arg(long = "auth-tokens", env = "GHOSTWRITER_AUTH_TOKENS")]
    pub tokens: Option<std::path::PathBuf>,
    /// Accept HS256 JWTs signed with the secret in this file (at least 32 bytes).
    #[arg(
        long = "auth-jwt-secret-file",
        env = "GHOSTWRITER_AUTH_JWT_SECRET_FILE"
    )]
    pub jwt_secret_file: Option<std::path::PathBuf>,
    /// Accept RS256/ES256 JWTs verified with the public key in this PEM file.
    #[arg(long = "auth-jwt-keys", env = "GHOSTWRITER_AUTH_JWT_KEYS")]
    pub jwt_keys: Option<std::path::PathBuf>,
    /// Required `iss` of JWTs.
    #[arg(long = "auth-jwt-issuer", env = "GHOSTWRITER_AUTH_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of JWTs.
    #[arg(
        long = "auth-jwt-audience",
        env = "GHOSTWRITER_AUTH_JWT_AUDIENCE",
        default_value = "ghostwriter"
    )]
    pub jwt_audience: String,
}

impl AuthArgs {
    /// Whether any credential source is configured.
    pub fn configured(&self) -> bool {
        self.tokens.is_some() || self.jwt_secret_file.is_some() || self.jwt_keys.is_some()
    }

    /// The authenticator these flags describe (off when none is set).
    pub fn load(&self) -> anyhow::Result<Auth> {
        let tokens = self.tokens.as_deref().map(Tokens::load).transpose()?;
        let issuer = || {
            self.jwt_issuer
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("JWT authentication needs --auth-jwt-issuer"))
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
        };
        let jwt = match (&self.jwt_secret_file, &self.jwt_keys) {
            (Some(_), Some(_)) => anyhow::bail!(
                "--auth-jwt-secret-file and --auth-jwt-keys are exclusive: pick one kind of JWT"
            ),
            (Some(p), None) => {
                let secret = read(p)?;
                let secret = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
                Some(Jwt::hs256(&secret, issuer()?, &self.jwt_audience)?)
            }
            (None, Some(p)) => Some(Jwt::public_key(&read(p)?, issuer()?, &self.jwt_audience)?),
            (None, None) => None,
        };
        Ok(Auth {
            tokens: tokens.map(Arc::new),
            jwt: jwt.map(Arc::new),
        })
    }
}

/// The public API's authenticator; with neither source, authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    tokens: Option<Arc<Tokens>>,
    jwt: Option<Arc<Jwt>>,
}

impl Auth {
    /// Authentication with these tokens.
    pub fn tokens(tokens: Tokens) -> Self {
        Self {
            tokens: Some(Arc::new(tokens)),
            jwt: None,
        }
    }

    /// Authentication with JWTs.
    pub fn jwt(jwt: Jwt) -> Self {
        Self {
            tokens: None,
            jwt: Some(Arc::new(jwt)),
        }
    }

    /// Whether credentials are checked.
    pub fn enabled(&self) -> bool {
        self.tokens.is_some() || self.jwt.is_some()
    }

    /// The caller's grant from its `authorization` header (with authentication off, everyone
    /// is an administrator).
    pub fn grant(&self, metadata: &MetadataMap) -> Result<Grant, Status> {
        if !self.enabled() {
            return Ok(Grant::Admin);
        }
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                Status::unauthenticated("missing credentials: send `authorization: Bearer TOKEN`")
            })?;
        if let Some(grant) = self.tokens.as_ref().and_then(|t| t.grants.get(token)) {
            return Ok(grant.clone());
        }
        match &self.jwt {
            Some(jwt) => jwt.grant(token),
            None => Err(Status::unauthenticated("invalid credentials")),
        }
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

    #[test]
    fn jwts_carry_the_user_and_the_admin_scope() {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let secret = b"0123456789abcdef0123456789abcdef";
        let auth = Auth::jwt(Jwt::hs256(secret, "https://idp.example", "ghostwriter").unwrap());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let token = |claims: serde_json::Value, key: &[u8]| {
            let t = encode(&Header::default(), &claims, &EncodingKey::from_secret(key)).unwrap();
            md(Some(&format!("Bearer {t}")))
        };
        let base = |extra: serde_json::Value| {
            let mut c = serde_json::json!({
                "sub": "alice", "iss": "https://idp.example", "aud": "ghostwriter",
                "exp": now + 600,
            });
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let alice = auth
            .grant(&token(base(serde_json::json!({})), secret))
            .unwrap();
        assert_eq!(alice, Grant::User("alice".into()));
        assert_eq!(
            alice.allow("bob").unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let admin = auth
            .grant(&token(
                base(serde_json::json!({"scope": "read ghostwriter:admin"})),
                secret,
            ))
            .unwrap();
        assert_eq!(admin, Grant::Admin);
        for bad in [
            token(base(serde_json::json!({"exp": now - 600})), secret),
            token(base(serde_json::json!({"nbf": now + 600})), secret),
            token(base(serde_json::json!({"aud": "other"})), secret),
            token(
                base(serde_json::json!({"iss": "https://evil.example"})),
                secret,
            ),
            token(
                base(serde_json::json!({})),
                b"another-secret-another-secret-xx",
            ),
        ] {
            assert_eq!(
                auth.grant(&bad).unwrap_err().code(),
                tonic::Code::Unauthenticated
            );
        }
        assert!(Jwt::hs256(b"short", "i", "a").is_err());
    }
}
