//! The prefix cache's per-user salt: an opaque keyed hash of the user id (HMAC-SHA256 under a
//! key of the deployment's), set on every generation and summary a write asks for, so that the
//! generator's prefix cache shares no block between two users' requests beyond the fixed
//! instruction, and neither the cached token count a response reports nor its timing can tell
//! one user what another wrote. The id itself never leaves the orchestrator this way, and
//! without the key nobody can compute a user's salt.

use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Shortest key accepted, bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Computes users' cache salts under one key.
#[derive(Clone)]
pub struct CacheSalt {
    key: Vec<u8>,
}

impl std::fmt::Debug for CacheSalt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheSalt").finish_non_exhaustive()
    }
}

impl CacheSalt {
    /// The key in `file` (its bytes, surrounding whitespace trimmed; at least
    /// [`MIN_KEY_BYTES`]), or, without a file, a random key of this process (then orchestrator
    /// replicas salt a user differently, and a user's writes share cached blocks only through
    /// the same replica: give replicas one key file).
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let key = match file {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading the cache salt key {}", path.display()))?;
                let key = bytes.trim_ascii().to_vec();
                anyhow::ensure!(
                    key.len() >= MIN_KEY_BYTES,
                    "the cache salt key {} has {} bytes; at least {MIN_KEY_BYTES} (openssl rand -hex 32)",
                    path.display(),
                    key.len()
                );
                key
            }
            None => {
                let mut key = vec![0; MIN_KEY_BYTES];
                use std::io::Read as _;
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut key))
                    .context("reading /dev/urandom for a cache salt key")?;
                key
            }
        };
        Ok(Self { key })
    }

    /// The salt of `user`: HMAC-SHA256(key, user id).
    pub fn of(&self, user: &str) -> Vec<u8> {
        hmac_sha256(&self.key, user.as_bytes()).to_vec()
    }
}

/// HMAC-SHA256 (RFC 2104).
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn salts_differ_by_user_and_key_and_hide_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "k".repeat(40)).unwrap();
        let a = CacheSalt::load(Some(&file)).unwrap();
        let b = CacheSalt::load(Some(&file)).unwrap();
        assert_eq!(
            a.of("maya"),
            b.of("maya"),
            "one key file, one salt per user"
        );
        assert_ne!(a.of("maya"), a.of("maya2"));
        assert!(!a.of("maya").windows(4).any(|w| w == b"maya"));
        let random = CacheSalt::load(None).unwrap();
        assert_ne!(random.of("maya"), a.of("maya"));
        std::fs::write(&file, "short").unwrap();
        let e = CacheSalt::load(Some(&file)).unwrap_err().to_string();
        assert!(e.contains("at least 32"), "{e}");
    }
}
