//! Static bearer tokens from a file: one per line, `#` starts a comment, blank lines
//! ignored. Only SHA-256 digests are kept, compared in constant time against every
//! token (no early exit, no length leak). The file is re-read when it changes.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthError;

/// How often the token file is checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// The accepted tokens.
pub struct BearerTokens {
    digests: RwLock<Vec<[u8; 32]>>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Parses a token file: one token per line, `#` comments, blank lines ignored.
pub fn parse(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|token| !token.is_empty())
        .map(str::to_string)
        .collect()
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl BearerTokens {
    /// Tokens from a list (for tests and for a freshly read file).
    pub fn from_tokens(tokens: &[String]) -> BearerTokens {
        BearerTokens {
            digests: RwLock::new(tokens.iter().map(|t| digest(t)).collect()),
        }
    }

    /// Reads `path` now (an unreadable or empty file is an error at start-up) and
    /// re-reads it whenever its modification time or size changes. A later unreadable
    /// file keeps the previous tokens (and is logged).
    pub async fn watch(path: PathBuf) -> Result<Arc<BearerTokens>, String> {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("bearer tokens file {}: {e}", path.display()))?;
        let tokens = parse(&text);
        if tokens.is_empty() {
            return Err(format!("bearer tokens file {} lists no token", path.display()));
        }
        let this = Arc::new(BearerTokens::from_tokens(&tokens));
        let weak = Arc::downgrade(&this);
        tokio::spawn(async move {
            let mut last = stamp(&path);
            loop {
                tokio::time::sleep(RELOAD_CHECK).await;
                let Some(this) = weak.upgrade() else {
                    return;
                };
                let now = stamp(&path);
                if now == last {
                    continue;
                }
                last = now;
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let tokens = parse(&text);
                        tracing::info!(file = %path.display(), tokens = tokens.len(), "bearer tokens reloaded");
                        *this.digests.write().unwrap_or_else(|e| e.into_inner()) =
                            tokens.iter().map(|t| digest(t)).collect();
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "cannot re-read bearer tokens; keeping the old ones")
                    }
                }
            }
        });
        Ok(this)
    }

    /// Accepts `token` if it is one of the configured tokens.
    pub fn check(&self, token: &str) -> Result<(), AuthError> {
        let presented = digest(token);
        let digests = self.digests.read().unwrap_or_else(|e| e.into_inner());
        let mut found = subtle::Choice::from(0);
        for known in digests.iter() {
            found |= known.ct_eq(&presented);
        }
        if bool::from(found) {
            Ok(())
        } else {
            Err(AuthError::Invalid("unknown bearer token".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_comments_and_blank_lines() {
        let text = "# tokens for the broker\n  abc123  \n\nxyz # rotated 2026-11\n#old\n";
        assert_eq!(parse(text), vec!["abc123", "xyz"]);
    }

    #[test]
    fn accepts_only_listed_tokens() {
        let tokens = BearerTokens::from_tokens(&["abc123".into(), "xyz".into()]);
        assert!(tokens.check("xyz").is_ok());
        assert!(tokens.check("abc123").is_ok());
        assert!(tokens.check("abc12").is_err());
        assert!(tokens.check("").is_err());
    }
}
