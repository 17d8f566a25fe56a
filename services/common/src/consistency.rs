//! Consistency tokens: what `Ingest` and `Delete` answer and later reads carry back, so a reader
//! sees its writes (read your writes) whichever replica or orchestrator serves it.

use crate::status::Invalid;

/// The opaque consistency token of a write: the id of the store transaction that committed it.
/// A replica has the write once its watermark is above it. Written as `gw1.<hex>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Token(pub u64);

impl std::fmt::Display for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "gw1.{:x}", self.0)
    }
}

impl std::str::FromStr for Token {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("gw1.")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .map(Token)
            .ok_or_else(|| {
                Invalid::new(
                    "consistency_token",
                    format!("{} is not a consistency token", crate::status::quote(s)),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_other_text() {
        let t = Token(0xdead);
        assert_eq!(t.to_string().parse::<Token>().unwrap(), t);
        let bad = "dead".parse::<Token>().unwrap_err();
        assert_eq!(bad.field, "consistency_token");
    }
}
