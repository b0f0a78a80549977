//! Knative Eventing sink authentication: `Authorization: Bearer <JWT>`, verified against
//! the issuer's JWKS (from `<issuer>/.well-known/openid-configuration`, or a configured
//! URL), with `iss`, `aud`, `exp`/`nbf` (small leeway) checked by `jsonwebtoken`. Only
//! asymmetric algorithms are accepted (RS*, PS*, ES*, EdDSA): never `none`, never HMAC
//! (whose "key" would be the public key). Keys are cached by `kid` and refetched when
//! an unknown `kid` appears, at most once per `jwks_min_refresh`.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;

use super::AuthError;
use crate::config::OidcConfig;

const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Where a pod finds the cluster's CA and its service-account token.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

#[derive(Deserialize)]
struct Discovery {
    jwks_uri: String,
}

/// Verifies OIDC tokens for one issuer and audience.
pub struct OidcVerifier {
    issuer: String,
    audience: String,
    jwks_url: Option<String>,
    leeway: Duration,
    min_refresh: Duration,
    token_file: Option<PathBuf>,
    http: reqwest::Client,
    keys: RwLock<JwkSet>,
    /// When the keys were last fetched (single-flight and rate limit).
    fetched: tokio::sync::Mutex<Option<Instant>>,
}

impl OidcVerifier {
    /// A verifier for `config` (issuer and audience required). When the issuer is the
    /// cluster's own, the in-cluster CA and service-account token are used to fetch keys.
    pub fn new(config: &OidcConfig) -> Result<OidcVerifier, String> {
        let issuer = config.issuer.clone().ok_or("auth.oidc.issuer is required")?;
        let audience = config.audience.clone().ok_or("auth.oidc.audience is required")?;
        let in_cluster = issuer.starts_with("https://kubernetes.default.svc");
        let sa = |file: &str| Some(Path::new(SA_DIR).join(file)).filter(|p| in_cluster && p.exists());
        let ca_file = config.ca_file.clone().or_else(|| sa("ca.crt"));
        let token_file = config.token_file.clone().or_else(|| sa("token"));
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(5));
        if let Some(ca) = &ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("auth.oidc.ca_file {}: {e}", ca.display()))?;
            let cert =
                reqwest::Certificate::from_pem(&pem).map_err(|e| format!("auth.oidc.ca_file {}: {e}", ca.display()))?;
            http = http.add_root_certificate(cert);
        }
        Ok(OidcVerifier {
            issuer: issuer.trim_end_matches('/').to_string(),
            audience,
            jwks_url: config.jwks_url.clone(),
            leeway: config.leeway,
            min_refresh: config.jwks_min_refresh,
            token_file,
            http: http.build().map_err(|e| e.to_string())?,
            keys: RwLock::new(JwkSet { keys: Vec::new() }),
            fetched: tokio::sync::Mutex::new(None),
        })
    }

    /// Verifies `token` and returns its subject.
    pub async fn verify(&self, token: &str) -> Result<String, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(format!("malformed token: {e}")))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let jwk = match self.find(header.kid.as_deref()) {
            Some(jwk) => jwk,
            None => {
                self.refresh().await?;
                self.find(header.kid.as_deref())
                    .ok_or_else(|| AuthError::Invalid(format!("no signing key {:?} at the issuer", header.kid)))?
            }
        };
        if let Some(alg) = &jwk.common.key_algorithm {
            if alg.to_string() != format!("{:?}", header.alg) {
                return Err(AuthError::Invalid(format!(
                    "key is for {alg}, token says {:?}",
                    header.alg
                )));
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| AuthError::Invalid(format!("unusable key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer, &format!("{}/", self.issuer)]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();
        let data =
            jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(data.claims.sub)
    }

    fn find(&self, kid: Option<&str>) -> Option<Jwk> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        match kid {
            Some(kid) => keys.find(kid).cloned(),
            // A token without `kid` is only unambiguous when the issuer has one key.
            None if keys.keys.len() == 1 => keys.keys.first().cloned(),
            None => None,
        }
    }

    /// Fetches the issuer's keys, at most once per `min_refresh` (an unknown `kid` must
    /// not let anyone make us hammer the issuer).
    async fn refresh(&self) -> Result<(), AuthError> {
        let mut fetched = self.fetched.lock().await;
        if let Some(at) = *fetched {
            if at.elapsed() < self.min_refresh {
                return Ok(());
            }
        }
        let result = self.fetch().await;
        *fetched = Some(Instant::now());
        match result {
            Ok(set) => {
                tracing::info!(issuer = %self.issuer, keys = set.keys.len(), "OIDC keys fetched");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = set;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "cannot fetch OIDC keys");
                Err(AuthError::Unavailable(e))
            }
        }
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let url = match &self.jwks_url {
            Some(url) => url.clone(),
            None => {
                let discovery = format!("{}/.well-known/openid-configuration", self.issuer);
                self.get::<Discovery>(&discovery).await?.jwks_uri
            }
        };
        self.get::<JwkSet>(&url).await
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let mut request = self.http.get(url);
        if let Some(file) = &self.token_file {
            let token = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            request = request.bearer_auth(token.trim());
        }
        let response = request.send().await.map_err(|e| format!("GET {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: {}", response.status()));
        }
        response.json::<T>().await.map_err(|e| format!("GET {url}: {e}"))
    }
}
