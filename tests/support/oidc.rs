//! A loopback OIDC issuer (discovery + JWKS) with test-only RS256 and ES256 keys
//! (tests/fixtures), and signed tokens as Knative would send them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::get;
use axum::{Json, Router};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// A test-only signing key from tests/fixtures.
pub fn key(file: &str, alg: Algorithm) -> EncodingKey {
    let pem = std::fs::read(format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    }
}

/// The public JWK of a test key, with key id `kid`.
pub fn jwk(file: &str, alg: Algorithm, kid: &str) -> Jwk {
    let mut jwk = Jwk::from_encoding_key(&key(file, alg), alg).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    jwk
}

/// A loopback OIDC issuer whose key set can be changed and whose key fetches are counted.
pub struct Issuer {
    pub url: String,
    pub keys: Arc<Mutex<Vec<Jwk>>>,
    pub fetches: Arc<AtomicUsize>,
}

/// Starts an issuer with an RS256 (`rsa-1`) and an ES256 (`ec-1`) key.
pub async fn issuer() -> Issuer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let keys = Arc::new(Mutex::new(vec![
        jwk("rsa-test-key.pem", Algorithm::RS256, "rsa-1"),
        jwk("ec-test-key.pem", Algorithm::ES256, "ec-1"),
    ]));
    let fetches = Arc::new(AtomicUsize::new(0));
    let discovery = json!({"issuer": url, "jwks_uri": format!("{url}/openid/v1/jwks")});
    let app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || async move { Json(discovery) }),
        )
        .route(
            "/openid/v1/jwks",
            get({
                let (keys, fetches) = (keys.clone(), fetches.clone());
                move || async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Json(JwkSet {
                        keys: keys.lock().unwrap().clone(),
                    })
                }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Issuer { url, keys, fetches }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The claims and header of one token to sign.
pub struct Token<'a> {
    pub alg: Algorithm,
    pub kid: &'a str,
    pub iss: &'a str,
    pub aud: &'a str,
    pub sub: &'a str,
    pub exp: u64,
    pub nbf: u64,
}

impl Token<'_> {
    /// The signed JWT.
    pub fn sign(&self) -> String {
        let file = if self.alg == Algorithm::ES256 {
            "ec-test-key.pem"
        } else {
            "rsa-test-key.pem"
        };
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.to_string());
        let claims =
            json!({"iss": self.iss, "aud": self.aud, "sub": self.sub, "exp": self.exp, "nbf": self.nbf, "iat": now()});
        jsonwebtoken::encode(&header, &claims, &key(file, self.alg)).unwrap()
    }
}
