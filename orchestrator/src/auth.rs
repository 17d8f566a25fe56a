//! Authentication at the public API, bound to users. Callers send `authorization: Bearer
//! TOKEN`, where TOKEN is either
//! - a static token from a token file (`--auth-tokens`) whose lines are `TOKEN USER_ID` (that
//!   user only) or `TOKEN *` (an administrator: any user, e.g. bulk ingest and evaluation), or
//! - a JWT: HS256 with a shared secret (`--auth-jwt-secret-file`) or RS256/ES256 with public
//!   keys (`--auth-jwt-keys`: one PEM key, or a JWK set whose `kid`s select the key, so an
//!   identity provider can rotate); issuer and audience are checked, `exp` is required and
//!   `nbf` honoured; `sub` is the only user it may act for, unless its `scope` holds
//!   `ghostwriter:admin`. A token's `alg` must be its key's: no algorithm confusion.
//!
//! The files are re-read when they change (checked every few seconds): tokens can be revoked
//! and keys rotated without a restart. A file that no longer loads keeps the previous
//! credentials, with a warning.
//!
//! Missing or unknown credentials get UNAUTHENTICATED; acting for another user gets
//! PERMISSION_DENIED. Neither message says whether the user exists.

use ghostwriter_common::watch::{RELOAD_EVERY, Reload, watch_files};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use jsonwebtoken::{Algorithm, DecodingKey};

use tonic::metadata::MetadataMap;

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No `authorization` header: UNAUTHENTICATED.
    #[error("missing credentials: send `authorization: Bearer TOKEN`")]
    Missing,
    /// Unknown, expired or badly signed credentials: UNAUTHENTICATED.
    #[error("invalid credentials")]
    Invalid,
    /// Valid credentials acting for another user: PERMISSION_DENIED.
    #[error("this credential may not act for the requested user")]
    OtherUser,
    /// Valid credentials of a user, for an administrator's call: PERMISSION_DENIED.
    #[error("only an administrator (a `*` token or the ghostwriter:admin scope) may do this")]
    NotAdmin,
}

/// What a caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Act for this user only.
    User(String),
    /// Act for any user.
    Admin,
}

impl Grant {
    /// Allows an administrator's call, or [`Denied::NotAdmin`].
    pub fn admin(&self) -> Result<(), Denied> {
        match self {
            Grant::Admin => Ok(()),
            Grant::User(_) => Err(Denied::NotAdmin),
        }
    }

    /// Allows acting for `user_id`, or [`Denied::OtherUser`].
    pub fn allow(&self, user_id: &str) -> Result<(), Denied> {
        match self {
            Grant::Admin => Ok(()),
            Grant::User(u) if u == user_id => Ok(()),
            Grant::User(_) => Err(Denied::OtherUser),
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

/// A verification key: its `kid` (from a JWK set) and the one algorithm it verifies.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: jsonwebtoken::Validation,
}

/// JWT verification: the keys, the expected issuer and audience.
pub struct Jwt {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field(
                "keys",
                &self
                    .keys
                    .iter()
                    .map(|k| (k.kid.clone(), k.validation.algorithms.clone()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: String,
}

fn validation(algorithm: Algorithm, issuer: &str, audience: &str) -> jsonwebtoken::Validation {
    let mut validation = jsonwebtoken::Validation::new(algorithm);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[audience]);
    validation.validate_nbf = true;
    validation.leeway = 30;
    validation.required_spec_claims = ["exp", "sub", "iss", "aud"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    validation
}

impl Jwt {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8], issuer: &str, audience: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= 32,
            "the JWT secret must be at least 32 bytes"
        );
        Ok(Self {
            keys: vec![Key {
                kid: None,
                key: DecodingKey::from_secret(secret),
                validation: validation(Algorithm::HS256, issuer, audience),
            }],
        })
    }

    /// RS256/ES256 public keys: one PEM key (RSA, or EC P-256), or a JWK set (JSON,
    /// `{"keys": [...]}`) of RSA and P-256 keys.
    pub fn public_keys(file: &[u8], issuer: &str, audience: &str) -> anyhow::Result<Self> {
        let text = String::from_utf8_lossy(file);
        let keys = if text.trim_start().starts_with('{') {
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("not a JWK set: {e}"))?;
            let mut keys = Vec::new();
            for (i, jwk) in set.keys.iter().enumerate() {
                use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
                let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                    (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => {
                        Algorithm::RS256
                    }
                    (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                        if ec.curve == EllipticCurve::P256 =>
                    {
                        Algorithm::ES256
                    }
                    _ => anyhow::bail!(
                        "key {} of the JWK set is neither an RS256 nor an ES256 (P-256) key",
                        i + 1
                    ),
                };
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    key: DecodingKey::from_jwk(jwk)
                        .map_err(|e| anyhow::anyhow!("key {} of the JWK set: {e}", i + 1))?,
                    validation: validation(algorithm, issuer, audience),
                });
            }
            anyhow::ensure!(!keys.is_empty(), "the JWK set holds no key");
            keys
        } else {
            let (key, algorithm) = match DecodingKey::from_rsa_pem(file) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => (
                    DecodingKey::from_ec_pem(file).map_err(|e| {
                        anyhow::anyhow!("neither a JWK set nor an RSA or EC public key in PEM: {e}")
                    })?,
                    Algorithm::ES256,
                ),
            };
            vec![Key {
                kid: None,
                key,
                validation: validation(algorithm, issuer, audience),
            }]
        };
        Ok(Self { keys })
    }

    fn grant(&self, token: &str) -> Result<Grant, Denied> {
        let invalid = || Denied::Invalid;
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        // The keys of the token's algorithm (and of its kid, when both name one).
        let claims = self
            .keys
            .iter()
            .filter(|k| k.validation.algorithms.contains(&header.alg))
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .find_map(|k| jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation).ok())
            .ok_or_else(invalid)?
            .claims;
        if claims.scope.split_whitespace().any(|s| s == ADMIN_SCOPE) {
            Ok(Grant::Admin)
        } else if claims.sub.is_empty() {
            Err(invalid())
        } else {
            Ok(Grant::User(claims.sub))
        }
    }
}

/// How the public API authenticates (flags of `serve orchestrator` and `up`).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthArgs {
    /// Token file of the public API: lines `TOKEN USER_ID` (acts for that user only) or
    /// `TOKEN *` (any user). Callers send `authorization: Bearer TOKEN`.
    #[arg(long = "auth-tokens", env = "GHOSTWRITER_AUTH_TOKENS")]
    pub tokens: Option<std::path::PathBuf>,
    /// Accept HS256 JWTs signed with the secret in this file (at least 32 bytes).
    #[arg(long = "auth-jwt-secret-file", env = "GHOSTWRITER_AUTH_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<std::path::PathBuf>,
    /// Accept RS256/ES256 JWTs verified with the public keys in this file: one PEM key, or a
    /// JWK set (JSON) whose `kid`s select the key.
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

    /// The credential files these flags name.
    fn files(&self) -> Vec<std::path::PathBuf> {
        [&self.tokens, &self.jwt_secret_file, &self.jwt_keys]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    fn sources(&self) -> anyhow::Result<Sources> {
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
            (None, Some(p)) => Some(
                Jwt::public_keys(&read(p)?, issuer()?, &self.jwt_audience)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            ),
            (None, None) => None,
        };
        Ok(Sources { tokens, jwt })
    }

    /// Loads the credential files once, to report one that does not load (nothing is kept).
    pub fn check(&self) -> anyhow::Result<()> {
        self.sources().map(|_| ())
    }

    /// The authenticator these flags describe (off when none is set). Inside a tokio runtime,
    /// its files are watched: a change is loaded within [`RELOAD_EVERY`], and a file that no
    /// longer loads keeps the previous credentials.
    pub fn load(&self) -> anyhow::Result<Auth> {
        let auth = Auth::from_sources(self.sources()?);
        if self.configured() && tokio::runtime::Handle::try_current().is_ok() {
            let (args, weak) = (self.clone(), Arc::downgrade(&auth.inner));
            watch_files("credential files", self.files(), RELOAD_EVERY, move || {
                // Stops with the authenticator.
                let Some(inner) = weak.upgrade() else {
                    return Reload::Stop;
                };
                match args.sources() {
                    Ok(sources) => {
                        *inner.write().unwrap_or_else(|e| e.into_inner()) = sources;
                        Reload::Loaded
                    }
                    Err(e) => Reload::Failed(e),
                }
            });
        }
        Ok(auth)
    }
}

/// The credentials in force.
#[derive(Debug, Default)]
struct Sources {
    tokens: Option<Tokens>,
    jwt: Option<Jwt>,
}

/// The public API's authenticator; with neither source, authentication is off.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    inner: Arc<RwLock<Sources>>,
}

impl Auth {
    fn from_sources(sources: Sources) -> Self {
        Self {
            inner: Arc::new(RwLock::new(sources)),
        }
    }

    /// Authentication with these tokens.
    pub fn tokens(tokens: Tokens) -> Self {
        Self::from_sources(Sources {
            tokens: Some(tokens),
            jwt: None,
        })
    }

    /// Authentication with JWTs.
    pub fn jwt(jwt: Jwt) -> Self {
        Self::from_sources(Sources {
            tokens: None,
            jwt: Some(jwt),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Sources> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether credentials are checked.
    pub fn enabled(&self) -> bool {
        let s = self.read();
        s.tokens.is_some() || s.jwt.is_some()
    }

    /// The caller's grant from its `authorization` header (with authentication off, everyone
    /// is an administrator).
    pub fn grant(&self, metadata: &MetadataMap) -> Result<Grant, Denied> {
        let s = self.read();
        if s.tokens.is_none() && s.jwt.is_none() {
            return Ok(Grant::Admin);
        }
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Denied::Missing)?;
        if let Some(grant) = s.tokens.as_ref().and_then(|t| t.grants.get(token)) {
            return Ok(grant.clone());
        }
        match &s.jwt {
            Some(jwt) => jwt.grant(token),
            None => Err(Denied::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    /// The code a refusal reaches the caller with.
    fn code(d: Denied) -> tonic::Code {
        tonic::Status::from(crate::Error::from(d)).code()
    }

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
        assert_eq!(code(denied), tonic::Code::PermissionDenied);
        let admin = auth
            .grant(&md(Some("Bearer admin-token-0123456789")))
            .unwrap();
        assert!(admin.allow("bob").is_ok());
        for bad in [None, Some("Bearer nope-nope-nope-nope"), Some("Basic abc")] {
            assert_eq!(
                code(auth.grant(&md(bad)).unwrap_err()),
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
            code(alice.allow("bob").unwrap_err()),
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
                code(auth.grant(&bad).unwrap_err()),
                tonic::Code::Unauthenticated
            );
        }
        assert!(Jwt::hs256(b"short", "i", "a").is_err());
    }

    /// Signs `claims` for alice (issuer `https://idp.example`, audience `ghostwriter`, valid
    /// ten minutes) with `alg`, `kid` and the key `pem`.
    fn signed(alg: Algorithm, kid: Option<&str>, pem: &str, sub: &str) -> MetadataMap {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "sub": sub, "iss": "https://idp.example", "aud": "ghostwriter", "exp": now + 600,
        });
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_secret(pem.as_bytes()),
        };
        let mut header = Header::new(alg);
        header.kid = kid.map(String::from);
        md(Some(&format!(
            "Bearer {}",
            encode(&header, &claims, &key).unwrap()
        )))
    }

    const RSA: &str = include_str!("../tests/data/jwt/rsa.pem");
    const RSA_PUB: &str = include_str!("../tests/data/jwt/rsa.pub.pem");
    const EC: &str = include_str!("../tests/data/jwt/ec.pem");
    const EC_PUB: &str = include_str!("../tests/data/jwt/ec.pub.pem");
    const JWKS: &str = include_str!("../tests/data/jwt/jwks.json");

    #[test]
    fn rs256_and_es256_from_pem_keys_and_a_jwk_set() {
        let unauthenticated = |auth: &Auth, m: &MetadataMap| {
            code(auth.grant(m).unwrap_err()) == tonic::Code::Unauthenticated
        };
        let alice = Grant::User("alice".into());
        // One PEM public key each.
        let rsa = Auth::jwt(
            Jwt::public_keys(RSA_PUB.as_bytes(), "https://idp.example", "ghostwriter").unwrap(),
        );
        let ec = Auth::jwt(
            Jwt::public_keys(EC_PUB.as_bytes(), "https://idp.example", "ghostwriter").unwrap(),
        );
        assert_eq!(
            rsa.grant(&signed(Algorithm::RS256, None, RSA, "alice"))
                .unwrap(),
            alice
        );
        assert_eq!(
            ec.grant(&signed(Algorithm::ES256, None, EC, "alice"))
                .unwrap(),
            alice
        );
        assert!(unauthenticated(
            &rsa,
            &signed(Algorithm::ES256, None, EC, "alice")
        ));
        assert!(unauthenticated(
            &ec,
            &signed(Algorithm::RS256, None, RSA, "alice")
        ));
        // Algorithm confusion: an HS256 token "signed" with the public key's text.
        assert!(unauthenticated(
            &rsa,
            &signed(Algorithm::HS256, None, RSA_PUB, "alice")
        ));
        // A JWK set: both keys, chosen by kid; a token naming the other key's kid fails.
        let set = Auth::jwt(
            Jwt::public_keys(JWKS.as_bytes(), "https://idp.example", "ghostwriter").unwrap(),
        );
        assert_eq!(
            set.grant(&signed(Algorithm::RS256, Some("rsa-1"), RSA, "alice"))
                .unwrap(),
            alice
        );
        assert_eq!(
            set.grant(&signed(Algorithm::ES256, Some("ec-1"), EC, "alice"))
                .unwrap(),
            alice
        );
        assert_eq!(
            set.grant(&signed(Algorithm::ES256, None, EC, "alice"))
                .unwrap(),
            alice
        );
        assert!(unauthenticated(
            &set,
            &signed(Algorithm::ES256, Some("rsa-1"), EC, "alice")
        ));
        assert!(unauthenticated(
            &set,
            &signed(Algorithm::ES256, Some("gone"), EC, "alice")
        ));
        assert!(unauthenticated(
            &set,
            &signed(Algorithm::HS256, Some("rsa-1"), RSA_PUB, "alice")
        ));
        // Not keys.
        assert!(Jwt::public_keys(b"{\"keys\": []}", "i", "a").is_err());
        assert!(Jwt::public_keys(b"-----BEGIN NOTHING-----", "i", "a").is_err());
        assert!(
            Jwt::public_keys(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#, "i", "a").is_err()
        );
    }

    #[tokio::test]
    async fn changed_credential_files_are_reloaded_and_a_bad_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (tokens, keys) = (dir.path().join("tokens"), dir.path().join("keys.pem"));
        std::fs::write(&tokens, "old-token-0123456789 alice\n").unwrap();
        std::fs::write(&keys, EC_PUB).unwrap();
        let args = AuthArgs {
            tokens: Some(tokens.clone()),
            jwt_keys: Some(keys.clone()),
            jwt_issuer: Some("https://idp.example".into()),
            jwt_audience: "ghostwriter".into(),
            ..Default::default()
        };
        let auth = args.load().unwrap();
        let old = md(Some("Bearer old-token-0123456789"));
        let new = md(Some("Bearer new-token-0123456789"));
        assert!(auth.grant(&old).is_ok());
        assert!(
            auth.grant(&signed(Algorithm::ES256, None, EC, "alice"))
                .is_ok()
        );
        // Rotation: a new token replaces the old one, the RSA key replaces the EC key.
        let later = SystemTime::now() + Duration::from_secs(5);
        let touch = |p: &Path| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(later)
                .unwrap()
        };
        std::fs::write(&tokens, "new-token-0123456789 alice\n").unwrap();
        std::fs::write(&keys, RSA_PUB).unwrap();
        touch(&tokens);
        touch(&keys);
        let reloaded = async {
            while auth.grant(&old).is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(RELOAD_EVERY * 5, reloaded)
            .await
            .unwrap();
        assert!(auth.grant(&new).is_ok());
        assert!(
            auth.grant(&signed(Algorithm::RS256, None, RSA, "alice"))
                .is_ok()
        );
        assert!(
            auth.grant(&signed(Algorithm::ES256, None, EC, "alice"))
                .is_err()
        );
        // A token file that no longer parses keeps what was in force.
        std::fs::write(&tokens, "short alice\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tokens)
            .unwrap()
            .set_modified(later + Duration::from_secs(5))
            .unwrap();
        tokio::time::sleep(RELOAD_EVERY * 2).await;
        assert!(auth.grant(&new).is_ok());
    }
}
