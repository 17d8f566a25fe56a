//! Read your writes without a token: the latest consistency token of each user's ingests and
//! deletions through this orchestrator, applied to that user's later writes through it. With a
//! token in the request, any orchestrator replica does the same.

use std::collections::HashMap;
use std::sync::Mutex;

use ghostwriter_common::consistency::Token;

/// Users remembered at most; past it the memory starts over (a token that old has long been
/// applied by every replica that serves).
const CAPACITY: usize = 100_000;

/// The latest token of each user's recent writes.
#[derive(Default)]
pub struct RecentTokens {
    map: Mutex<HashMap<String, Token>>,
}

impl RecentTokens {
    /// Remembers `token` for each of `users` (keeping a later one already there).
    pub fn record<'a>(&self, users: impl IntoIterator<Item = &'a str>, token: Token) {
        let Ok(mut map) = self.map.lock() else { return };
        if map.len() >= CAPACITY {
            map.clear();
        }
        for user in users {
            let e = map.entry(user.to_string()).or_insert(token);
            *e = (*e).max(token);
        }
    }

    /// The token a read of `user` must wait for: the later of `requested` and the remembered.
    pub fn for_read(&self, user: &str, requested: Option<Token>) -> Option<Token> {
        let remembered = self.map.lock().ok().and_then(|m| m.get(user).copied());
        match (requested, remembered) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The later of two tokens as the API carries them (empty = none).
pub fn later(a: &str, b: &str) -> String {
    match (a.parse::<Token>(), b.parse::<Token>()) {
        (Ok(x), Ok(y)) => x.max(y).to_string(),
        (Ok(_), Err(_)) => a.to_string(),
        _ => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_later_token_wins() {
        let t = RecentTokens::default();
        assert_eq!(t.for_read("u", None), None);
        t.record(["u"], Token(5));
        t.record(["u", "v"], Token(3));
        assert_eq!(t.for_read("u", None), Some(Token(5)));
        assert_eq!(t.for_read("u", Some(Token(9))), Some(Token(9)));
        assert_eq!(t.for_read("v", Some(Token(1))), Some(Token(3)));
        assert_eq!(later("", &Token(2).to_string()), Token(2).to_string());
        assert_eq!(
            later(&Token(7).to_string(), &Token(2).to_string()),
            Token(7).to_string()
        );
        assert_eq!(later("", ""), "");
    }
}
