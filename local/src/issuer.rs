//! The local OpenID Connect issuer: what a Cognito user pool (or any OIDC provider) is to the
//! deployed HTTP API.
//!
//! It makes an RSA key at start and serves what an API Gateway JWT authorizer reads from an
//! issuer: `GET /.well-known/openid-configuration` (naming `jwks_uri`) and
//! `GET /.well-known/jwks.json`. The local HTTP API verifies tokens against these, as API
//! Gateway does; the local run passes this issuer's URL as the template's `JwtIssuer`.
//!
//! Tokens (RS256, `kid` set) come from [`Issuer::token`] in process (the demo, the tests) or from
//! `POST /token` for a developer with curl:
//! `{"sub": "cust-1", "scope": "orders/operator", "aud": "orders-api", "expiresIn": 3600}` (all
//! but `sub` optional) → `{"access_token": …, "token_type": "Bearer", "expires_in": …}`.
//! It signs whatever subject it is asked for: it stands in for a user pool's sign-in, and
//! listens on the loopback interface only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The template's default `JwtAudience`.
pub const DEFAULT_AUDIENCE: &str = "orders-api";
/// The template's default `OperatorScope`.
pub const DEFAULT_OPERATOR_SCOPE: &str = "orders/operator";
/// The longest lifetime `POST /token` grants.
const MAX_LIFETIME_SECONDS: i64 = 24 * 3600;

/// Where `local-env run` serves the issuer (`LOCAL_ISSUER_PORT`), unless set.
pub const DEFAULT_PORT: u16 = 9400;
/// The template parameter naming the issuer the HTTP API trusts.
pub const ISSUER_PARAMETER: &str = "JwtIssuer";

/// `LOCAL_ISSUER_PORT`, else [`DEFAULT_PORT`].
pub fn port() -> anyhow::Result<u16> {
    match std::env::var("LOCAL_ISSUER_PORT") {
        Ok(p) if !p.trim().is_empty() => p.trim().parse().with_context(|| format!("LOCAL_ISSUER_PORT={p}")),
        _ => Ok(DEFAULT_PORT),
    }
}

/// The URL of a local issuer on `port`: what its tokens' `iss` says.
pub fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// Makes the template's HTTP API trust the issuer at `url`, unless the caller named another.
pub fn point_at(template: &crate::Template, url: &str, overrides: &mut std::collections::HashMap<String, String>) {
    if template.parameters.contains_key(ISSUER_PARAMETER) {
        overrides.entry(ISSUER_PARAMETER.to_owned()).or_insert_with(|| url.to_owned());
    }
}

/// Whether one of the stack's HTTP APIs trusts the issuer at `url`.
pub fn trusted_by(stack: &crate::Stack, url: &str) -> bool {
    stack.apis.values().any(|api| {
        api.pointer("/Auth/Authorizers").and_then(Value::as_object).is_some_and(|authorizers| {
            authorizers.values().any(|a| a.pointer("/JwtConfiguration/issuer").and_then(Value::as_str) == Some(url))
        })
    })
}

/// What a token says.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub subject: String,
    /// Space-separated in the token's `scope` claim; none: no claim.
    pub scopes: Vec<String>,
    pub audience: String,
    /// From now; negative for a token that has already expired.
    pub lifetime_seconds: i64,
}

impl TokenRequest {
    /// A customer's token for the default audience, valid for an hour.
    pub fn customer(subject: &str) -> Self {
        Self {
            subject: subject.to_owned(),
            scopes: Vec::new(),
            audience: DEFAULT_AUDIENCE.into(),
            lifetime_seconds: 3600,
        }
    }

    /// An operator's token (the default operator scope), valid for an hour.
    pub fn operator(subject: &str) -> Self {
        Self { scopes: vec![DEFAULT_OPERATOR_SCOPE.into()], ..Self::customer(subject) }
    }
}

/// The signing key and the key set that publishes it.
struct Keys {
    url: String,
    kid: String,
    signing: EncodingKey,
    published: JwkSet,
}

impl Keys {
    fn generate(url: String) -> anyhow::Result<Self> {
        let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| anyhow::anyhow!("generating an RSA key failed"))?;
        let pkcs8 = pair.as_der().map_err(|_| anyhow::anyhow!("encoding the RSA key failed"))?;
        let pem =
            format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", STANDARD.encode(pkcs8.as_ref()));
        let signing = EncodingKey::from_rsa_pem(pem.as_bytes()).context("reading the RSA key")?;
        let kid = format!("local-{:08x}", fastrand::u32(..));
        let mut jwk = Jwk::from_encoding_key(&signing, Algorithm::RS256).context("publishing the RSA key")?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(Self { url, kid, signing, published: JwkSet { keys: vec![jwk] } })
    }

    fn token(&self, request: &TokenRequest) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        let mut claims = json!({
            "iss": self.url,
            "sub": request.subject,
            "aud": request.audience,
            "iat": now.min(now + request.lifetime_seconds),
            "exp": now + request.lifetime_seconds,
            "token_use": "access",
            "jti": uuid::Uuid::new_v4().to_string(),
        });
        if !request.scopes.is_empty() {
            claims["scope"] = json!(request.scopes.join(" "));
        }
        let header = Header { kid: Some(self.kid.clone()), ..Header::new(Algorithm::RS256) };
        jsonwebtoken::encode(&header, &claims, &self.signing).context("signing the token")
    }
}

/// A running local issuer. Dropping it stops it.
pub struct Issuer {
    keys: Arc<Keys>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Issuer {
    /// Makes a key and serves the issuer's discovery document and key set on `addr` (port 0: any).
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the local issuer to {addr}"))?;
        let addr = listener.local_addr()?;
        let keys = Arc::new(Keys::generate(format!("http://{addr}"))?);
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/.well-known/jwks.json", get(key_set))
            .route("/token", post(issue))
            .with_state(keys.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the local issuer stopped");
            }
        });
        tracing::info!(url = %keys.url, "serving the local OpenID Connect issuer");
        Ok(Self { keys, addr, task })
    }

    /// The issuer URL: the tokens' `iss`, and the template's `JwtIssuer`.
    pub fn url(&self) -> &str {
        &self.keys.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A signed token saying what `request` says.
    pub fn token(&self, request: &TokenRequest) -> String {
        // Signing with a key just made cannot fail short of a bug: fail loudly.
        self.keys.token(request).expect("the local issuer signs tokens")
    }

    /// `Bearer <token>` of a customer, for an `Authorization` header.
    pub fn customer_bearer(&self, customer: &str) -> String {
        format!("Bearer {}", self.token(&TokenRequest::customer(customer)))
    }

    /// `Bearer <token>` of an operator.
    pub fn operator_bearer(&self) -> String {
        format!("Bearer {}", self.token(&TokenRequest::operator("operator")))
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn discovery(State(keys): State<Arc<Keys>>) -> Json<Value> {
    Json(json!({
        "issuer": keys.url,
        "jwks_uri": format!("{}/.well-known/jwks.json", keys.url),
        "token_endpoint": format!("{}/token", keys.url),
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn key_set(State(keys): State<Arc<Keys>>) -> Json<JwkSet> {
    Json(keys.published.clone())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Asked {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    aud: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
}

async fn issue(State(keys): State<Arc<Keys>>, asked: Option<Json<Asked>>) -> (StatusCode, Json<Value>) {
    let refuse = |message: &str| (StatusCode::BAD_REQUEST, Json(json!({ "error": message })));
    let Some(Json(asked)) = asked else {
        return refuse(
            "send JSON: {\"sub\": \"<customer id>\", \"scope\": \"…\", \"aud\": \"…\", \"expiresIn\": <seconds>}",
        );
    };
    if asked.sub.is_empty() || asked.sub.len() > 128 {
        return refuse("sub must be 1 to 128 characters");
    }
    let lifetime = asked.expires_in.unwrap_or(3600);
    if !(1..=MAX_LIFETIME_SECONDS).contains(&lifetime) {
        return refuse("expiresIn must be 1 to 86400 seconds");
    }
    let request = TokenRequest {
        subject: asked.sub,
        scopes: asked.scope.unwrap_or_default().split_whitespace().map(str::to_owned).collect(),
        audience: asked.aud.unwrap_or_else(|| DEFAULT_AUDIENCE.into()),
        lifetime_seconds: lifetime,
    };
    match keys.token(&request) {
        Ok(token) => {
            (StatusCode::OK, Json(json!({ "access_token": token, "token_type": "Bearer", "expires_in": lifetime })))
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": format!("{e:#}") }))),
    }
}
