//! Who may deliver events (and so start VMs): authentication of the ingress caller —
//! `none`, static `bearer` tokens, or `oidc` (Knative Eventing sink authentication: a
//! JWT signed by the issuer, for our audience) — and authorization of its subject,
//! globally and per VM, with Knative EventPolicy's `*` suffix wildcard.
//!
//! Owns: credentials checks. Must not import the activator, lifecycle, backend or axum (it
//! takes a request's header fields only).

pub mod bearer;
mod oidc;

use std::sync::Arc;

use http::HeaderMap;

use crate::http1::lines::{text, ReadFields};

pub use bearer::BearerTokens;
pub use oidc::OidcVerifier;

use crate::config::{AuthConfig, AuthMode};

/// Why a caller was refused. `status()` of the ingress maps these to 401/403/503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` credential.
    #[error("missing bearer token")]
    Missing,
    /// The credential is not valid (unknown token, bad signature, expired, wrong issuer
    /// or audience, unsupported algorithm).
    #[error("invalid token: {0}")]
    Invalid(String),
    /// Valid credential, but its subject may not deliver to this VM.
    #[error("subject {subject:?} may not deliver events to {target}")]
    Forbidden {
        /// The token's subject.
        subject: String,
        /// What it tried to reach.
        target: String,
    },
    /// The token could not be checked right now (the issuer's keys are unreachable):
    /// retryable, unlike a 401, which Knative does not retry.
    #[error("cannot verify tokens right now: {0}")]
    Unavailable(String),
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's subject (`sub`), if the mode has one (`oidc`).
    pub subject: Option<String>,
}

/// The ingress authenticator, chosen in config.
#[derive(Clone)]
pub enum Authenticator {
    /// Everyone may deliver (the default only for the local backend on loopback).
    None,
    /// Static tokens from a file, re-read when it changes.
    Bearer(Arc<BearerTokens>),
    /// Knative OIDC sink authentication.
    Oidc(Arc<OidcVerifier>),
}

impl Authenticator {
    /// Builds the authenticator for `config` (validated already). Bearer mode reads the
    /// token file now and watches it from then on.
    pub async fn from_config(config: &AuthConfig) -> Result<Authenticator, String> {
        match config.mode() {
            AuthMode::None => Ok(Authenticator::None),
            AuthMode::Bearer => {
                let path = config
                    .bearer_tokens_file
                    .clone()
                    .ok_or("auth.bearer_tokens_file is required")?;
                Ok(Authenticator::Bearer(BearerTokens::watch(path).await?))
            }
            AuthMode::Oidc => Ok(Authenticator::Oidc(Arc::new(OidcVerifier::new(&config.oidc)?))),
        }
    }

    /// Checks the request's credentials (its `Authorization` header, looked up only when
    /// some are asked for).
    pub async fn authenticate(&self, headers: &(impl ReadFields + ?Sized)) -> Result<Caller, AuthError> {
        match self {
            Authenticator::None => Ok(Caller { subject: None }),
            Authenticator::Bearer(tokens) => {
                tokens.check(bearer_token_of(headers.field("authorization"))?)?;
                Ok(Caller { subject: None })
            }
            Authenticator::Oidc(verifier) => {
                // Boxed: the verifier's future (it may fetch keys) is large, and inline it
                // would be part of every request's state, held events included.
                let subject = Box::pin(verifier.verify(bearer_token_of(headers.field("authorization"))?)).await?;
                Ok(Caller { subject: Some(subject) })
            }
        }
    }

    /// Whether this authenticator has subjects to authorize.
    pub fn has_subjects(&self) -> bool {
        matches!(self, Authenticator::Oidc(_))
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    bearer_token_of(
        headers
            .get(http::header::AUTHORIZATION)
            .map(http::HeaderValue::as_bytes),
    )
}

/// The token of an `Authorization` header's value `Bearer <token>`.
pub fn bearer_token_of(authorization: Option<&[u8]>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::Missing)?;
    let value = text(value).ok_or_else(|| AuthError::Invalid("authorization header is not ASCII".into()))?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token.trim())
}

/// Whether `subject` matches one of `patterns`: exact, or a prefix ending in `*`
/// (as Knative EventPolicy's `from.sub`).
pub fn subject_allowed(subject: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => subject.starts_with(prefix),
        None => subject == p,
    })
}

/// Authorizes `caller` for `target` against the global list and the VM's own list
/// (each applies when non-empty; both must allow). Modes without subjects pass.
pub fn authorize(
    caller: &Caller,
    global: &[String],
    per_vm: &[String],
    target: &dyn std::fmt::Display,
) -> Result<(), AuthError> {
    let Some(subject) = &caller.subject else {
        return Ok(());
    };
    let allowed = |list: &[String]| list.is_empty() || subject_allowed(subject, list);
    if allowed(global) && allowed(per_vm) {
        Ok(())
    } else {
        Err(AuthError::Forbidden {
            subject: subject.clone(),
            // Formatted only here: the allowed path allocates nothing.
            target: target.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns_match_exactly_or_by_prefix() {
        let patterns = vec![
            "system:serviceaccount:knative-eventing:*".to_string(),
            "alice".to_string(),
        ];
        assert!(subject_allowed(
            "system:serviceaccount:knative-eventing:mt-broker-filter",
            &patterns
        ));
        assert!(subject_allowed("alice", &patterns));
        assert!(!subject_allowed("alicia", &patterns));
        assert!(!subject_allowed("system:serviceaccount:default:app", &patterns));
    }

    #[test]
    fn both_lists_must_allow() {
        let caller = Caller {
            subject: Some("system:serviceaccount:shop:broker".into()),
        };
        let shop = vec!["system:serviceaccount:shop:*".to_string()];
        let other = vec!["system:serviceaccount:other:*".to_string()];
        assert!(authorize(&caller, &[], &[], &"a/b").is_ok());
        assert!(authorize(&caller, &shop, &[], &"a/b").is_ok());
        assert!(authorize(&caller, &shop, &shop, &"a/b").is_ok());
        assert!(matches!(
            authorize(&caller, &shop, &other, &"a/b"),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(authorize(&Caller { subject: None }, &shop, &other, &"a/b").is_ok());
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), Err(AuthError::Missing));
        h.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&h), Err(AuthError::Missing));
        h.insert(http::header::AUTHORIZATION, "bearer  t0k ".parse().unwrap());
        assert_eq!(bearer_token(&h), Ok("t0k"));
    }
}
