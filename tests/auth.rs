//! Ingress authentication end to end: a loopback OIDC issuer (tests/support/oidc.rs)
//! with RS256 and ES256 keys, tokens as Knative would send them, and the bearer-token
//! mode with its file re-read on change.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use support::oidc::{issuer, jwk, now, Issuer, Token};
use support::{policy, Harness};
use vm_activator::backend::fake::FakeOptions;
use vm_activator::config::{AuthMode, Config};
use vm_activator::vm::{Policy, VmKey};

const AUDIENCE: &str = "vm-activator";
const BROKER: &str = "system:serviceaccount:knative-eventing:mt-broker-filter";

fn b64(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

async fn oidc_harness(issuer: &Issuer) -> Harness {
    let mut config = Config::for_tests();
    let auth = &mut config.ingress.auth;
    auth.mode = Some(AuthMode::Oidc);
    auth.oidc.issuer = Some(issuer.url.clone());
    auth.oidc.audience = Some(AUDIENCE.into());
    auth.oidc.jwks_min_refresh = Duration::from_millis(500);
    auth.allowed_subjects = vec!["system:serviceaccount:knative-eventing:*".into()];
    let private = Policy {
        allowed_subjects: vec!["system:serviceaccount:knative-eventing:special".into()],
        ..policy()
    };
    Harness::start_with(
        vec![(support::demo(), policy()), (VmKey::new("default", "private"), private)],
        FakeOptions::default(),
        config,
    )
    .await
}

async fn post(h: &Harness, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = h
        .client
        .post(format!("{}{path}", h.ingress))
        .header("ce-specversion", "1.0")
        .header("ce-id", "a-1")
        .header("ce-source", "/auth")
        .header("ce-type", "t");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn oidc_tokens_are_verified_and_subjects_authorized() {
    let issuer = issuer().await;
    let h = oidc_harness(&issuer).await;
    let iss = issuer.url.as_str();
    let good = Token {
        alg: Algorithm::RS256,
        kid: "rsa-1",
        iss,
        aud: AUDIENCE,
        sub: BROKER,
        exp: now() + 600,
        nbf: now() - 10,
    };
    let valid = good.sign();
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
        parts[1] = b64(&json!({"iss": iss, "aud": AUDIENCE, "sub": "system:admin", "exp": now() + 600}));
        parts.join(".")
    };
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"iss": iss, "aud": AUDIENCE, "sub": BROKER, "exp": now() + 600}))
    );
    // HS256 "signed" with the public key: the classic algorithm-confusion attack.
    let confused = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa-1".into());
        let claims = json!({"iss": iss, "aud": AUDIENCE, "sub": BROKER, "exp": now() + 600});
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"public key bytes")).unwrap()
    };
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("missing token", "/default/demo", None, 401, "unauthenticated"),
        (
            "garbage token",
            "/default/demo",
            Some("not.a.jwt".into()),
            401,
            "invalid_token",
        ),
        (
            "expired",
            "/default/demo",
            Some(
                Token {
                    exp: now() - 120,
                    ..good_ref(&good)
                }
                .sign(),
            ),
            401,
            "invalid_token",
        ),
        (
            "not yet valid",
            "/default/demo",
            Some(
                Token {
                    nbf: now() + 600,
                    ..good_ref(&good)
                }
                .sign(),
            ),
            401,
            "invalid_token",
        ),
        (
            "wrong audience",
            "/default/demo",
            Some(
                Token {
                    aud: "someone-else",
                    ..good_ref(&good)
                }
                .sign(),
            ),
            401,
            "invalid_token",
        ),
        (
            "wrong issuer",
            "/default/demo",
            Some(
                Token {
                    iss: "https://evil.example",
                    ..good_ref(&good)
                }
                .sign(),
            ),
            401,
            "invalid_token",
        ),
        ("alg none", "/default/demo", Some(unsigned), 401, "invalid_token"),
        (
            "HS256 with the public key",
            "/default/demo",
            Some(confused),
            401,
            "invalid_token",
        ),
        (
            "tampered payload",
            "/default/demo",
            Some(tampered),
            401,
            "invalid_token",
        ),
        (
            "unknown kid",
            "/default/demo",
            Some(
                Token {
                    kid: "rotated-away",
                    ..good_ref(&good)
                }
                .sign(),
            ),
            401,
            "invalid_token",
        ),
        (
            "subject not allowed",
            "/default/demo",
            Some(
                Token {
                    sub: "system:serviceaccount:default:app",
                    ..good_ref(&good)
                }
                .sign(),
            ),
            403,
            "forbidden",
        ),
        (
            "subject not allowed for this VM",
            "/default/private",
            Some(valid.clone()),
            403,
            "forbidden",
        ),
        (
            "unauthenticated, unknown VM",
            "/default/nope",
            None,
            401,
            "unauthenticated",
        ),
    ];
    for (name, path, token, status, code) in cases {
        let response = post(&h, path, token.as_deref()).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        if status == 401 {
            let challenge = response.headers()["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{name}: {challenge}");
        }
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"], code, "{name}: {body}");
        assert!(!body["detail"].as_str().unwrap().is_empty(), "{name}");
    }
    assert_eq!(
        h.backend.starts(&support::demo()),
        0,
        "no refused request may start a VM"
    );
    assert_eq!(h.backend.starts(&VmKey::new("default", "private")), 0);
    assert!(h.healthy().await, "the process stays healthy");
    assert_eq!(
        h.metric("vm_activator_rejected_total{namespace=\"default\",reason=\"unauthorized\",vm=\"demo\"}")
            .await,
        1.0,
        "the per-VM 403 is counted; 401s are refused before any VM is looked up"
    );

    // Accepted: RS256 and ES256, and the per-VM list's own subject.
    assert_eq!(post(&h, "/default/demo", Some(&valid)).await.status(), 202);
    let es = Token {
        alg: Algorithm::ES256,
        kid: "ec-1",
        ..good_ref(&good)
    };
    assert_eq!(post(&h, "/default/demo", Some(&es.sign())).await.status(), 202);
    let special = Token {
        sub: "system:serviceaccount:knative-eventing:special",
        ..good_ref(&good)
    };
    assert_eq!(post(&h, "/default/private", Some(&special.sign())).await.status(), 202);
    assert_eq!(h.backend.event_ids(&support::demo()).len(), 2);
}

fn good_ref<'a>(t: &Token<'a>) -> Token<'a> {
    Token {
        alg: t.alg,
        kid: t.kid,
        iss: t.iss,
        aud: t.aud,
        sub: t.sub,
        exp: t.exp,
        nbf: t.nbf,
    }
}

#[tokio::test]
async fn an_unknown_kid_refetches_keys_but_rate_limited_and_rotation_works() {
    let issuer = issuer().await;
    let h = oidc_harness(&issuer).await;
    let good = Token {
        alg: Algorithm::RS256,
        kid: "rsa-1",
        iss: &issuer.url,
        aud: AUDIENCE,
        sub: BROKER,
        exp: now() + 600,
        nbf: now() - 10,
    };
    assert_eq!(post(&h, "/default/demo", Some(&good.sign())).await.status(), 202);
    assert_eq!(
        issuer.fetches.load(Ordering::SeqCst),
        1,
        "keys fetched once, then cached"
    );
    for _ in 0..3 {
        assert_eq!(post(&h, "/default/demo", Some(&good.sign())).await.status(), 202);
    }
    assert_eq!(issuer.fetches.load(Ordering::SeqCst), 1);

    // A flood of unknown kids refetches at most once per jwks_min_refresh (500 ms here).
    let forged = Token {
        kid: "forged",
        ..good_ref(&good)
    }
    .sign();
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..20 {
        assert_eq!(post(&h, "/default/demo", Some(&forged)).await.status(), 401);
    }
    assert_eq!(
        issuer.fetches.load(Ordering::SeqCst),
        2,
        "one refetch for 20 unknown-kid tokens"
    );

    // Key rotation: the issuer publishes a new key; tokens signed with it are accepted.
    issuer
        .keys
        .lock()
        .unwrap()
        .push(jwk("ec-test-key.pem", Algorithm::ES256, "ec-rotated"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rotated = Token {
        alg: Algorithm::ES256,
        kid: "ec-rotated",
        ..good_ref(&good)
    };
    assert_eq!(post(&h, "/default/demo", Some(&rotated.sign())).await.status(), 202);
}

#[tokio::test]
async fn an_unreachable_issuer_means_503_not_401() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = Config::for_tests();
    config.ingress.auth.mode = Some(AuthMode::Oidc);
    config.ingress.auth.oidc.issuer = Some(format!("http://{closed}"));
    config.ingress.auth.oidc.audience = Some(AUDIENCE.into());
    let h = Harness::start_with(vec![(support::demo(), policy())], FakeOptions::default(), config).await;
    let token = Token {
        alg: Algorithm::RS256,
        kid: "rsa-1",
        iss: &format!("http://{closed}"),
        aud: AUDIENCE,
        sub: BROKER,
        exp: now() + 600,
        nbf: now() - 10,
    }
    .sign();
    let response = post(&h, "/default/demo", Some(&token)).await;
    assert_eq!(response.status(), 503, "Knative retries 503; it would drop a 401");
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(response.json::<Value>().await.unwrap()["error"], "auth_unavailable");
    assert_eq!(h.backend.starts(&support::demo()), 0);
}

#[tokio::test]
async fn bearer_tokens_come_from_a_file_that_is_reread_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(
        &file,
        "# tokens for the broker\nfirst-token\n\n  second-token  # rotated 2026-11\n",
    )
    .unwrap();
    let mut config = Config::for_tests();
    config.ingress.auth.mode = Some(AuthMode::Bearer);
    config.ingress.auth.bearer_tokens_file = Some(file.clone());
    let h = Harness::start_with(vec![(support::demo(), policy())], FakeOptions::default(), config).await;

    assert_eq!(post(&h, "/default/demo", None).await.status(), 401);
    let wrong = post(&h, "/default/demo", Some("third-token")).await;
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.json::<Value>().await.unwrap()["error"], "invalid_token");
    assert_eq!(h.backend.starts(&support::demo()), 0);
    assert_eq!(post(&h, "/default/demo", Some("first-token")).await.status(), 202);
    assert_eq!(post(&h, "/default/demo", Some("second-token")).await.status(), 202);

    // Rotate: replace the file; no restart.
    std::fs::write(&file, "third-token\n").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while post(&h, "/default/demo", Some("third-token")).await.status() != 202 {
        assert!(tokio::time::Instant::now() < deadline, "new token never accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        post(&h, "/default/demo", Some("first-token")).await.status(),
        401,
        "old token revoked"
    );
}
