//! The HTTP API's JWT authorizers, verified as API Gateway verifies them in front of a route.
//!
//! From the API's `Auth.Authorizers` (`JwtConfiguration.issuer` and `audience`,
//! `IdentitySource`) and each route's `Auth` (`Authorizer`, `AuthorizationScopes`; the API's
//! `DefaultAuthorizer` otherwise, `NONE` for none). As API Gateway does:
//! - the token comes from the `Authorization` header, with or without `Bearer `;
//! - its key is found by `kid` in the issuer's JWKS (`{issuer}/.well-known/openid-configuration`
//!   → `jwks_uri`, cached for two hours, fetched again for a key it does not know; at most one
//!   fetch per 10 s, whether it worked or not);
//! - RSA signatures only (RS256/384/512); `iss` must be the issuer; `aud` (or `client_id` when
//!   there is no `aud`) one of the audiences; `exp` in the future; `nbf` and `iat`, if present,
//!   not in the future;
//! - a route with scopes needs a token whose `scope` (or `scp`) holds one of them.
//!
//! A refusal is `401 {"message":"Unauthorized"}` (`403 {"message":"Forbidden"}` for a missing
//! scope), as API Gateway answers, with the reason in `www-authenticate`. The verified claims
//! reach the function as `requestContext.authorizer.jwt` (`claims`, every value a string, and
//! `scopes`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;

/// How long a fetched key set is used (API Gateway caches public keys for two hours).
const KEYS_CACHED_FOR: Duration = Duration::from_secs(2 * 3600);
/// A token naming an unknown key makes the key set be fetched again, at most this often.
const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// `401`: no token, or one that does not verify.
    Unauthorized(String),
    /// `403`: a verified token without the route's scopes.
    Forbidden(String),
}

impl Denied {
    pub fn status(&self) -> u16 {
        match self {
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
        }
    }

    /// API Gateway's body.
    pub fn body(&self) -> Value {
        match self {
            Self::Unauthorized(_) => json!({ "message": "Unauthorized" }),
            Self::Forbidden(_) => json!({ "message": "Forbidden" }),
        }
    }

    /// RFC 6750's challenge, with the reason.
    pub fn challenge(&self) -> String {
        match self {
            Self::Unauthorized(why) => format!("Bearer error=\"invalid_token\", error_description=\"{why}\""),
            Self::Forbidden(why) => format!("Bearer error=\"insufficient_scope\", error_description=\"{why}\""),
        }
    }
}

/// One JWT authorizer of an HTTP API.
pub struct JwtAuthorizer {
    pub name: String,
    issuer: String,
    audiences: Vec<String>,
    client: reqwest::Client,
    keys: Mutex<KeyCache>,
}

/// The issuer's keys as last fetched.
#[derive(Default)]
struct KeyCache {
    /// The key set, and when it was fetched.
    keys: Option<(Instant, JwkSet)>,
    /// When a fetch was last tried, whether it worked or not: a token naming an unknown key, or
    /// an issuer that cannot be reached, makes at most one fetch per [`REFETCH_AT_MOST_EVERY`].
    tried: Option<Instant>,
}

impl std::fmt::Debug for JwtAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthorizer").field("name", &self.name).field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

/// What a route requires.
#[derive(Debug, Clone)]
pub struct RouteAuth {
    pub authorizer: Arc<JwtAuthorizer>,
    pub scopes: Vec<String>,
}

/// The authorizers an API declares.
#[derive(Debug, Default)]
pub struct ApiAuth {
    /// By name.
    pub authorizers: BTreeMap<String, Arc<JwtAuthorizer>>,
    /// `DefaultAuthorizer`: in front of every route that names none.
    pub default: Option<String>,
}

/// The authorizers of an API, from its (resolved) properties.
pub fn api_authorizers(api: &Value) -> anyhow::Result<ApiAuth> {
    let auth = api.get("Auth").unwrap_or(&Value::Null);
    let mut authorizers = BTreeMap::new();
    for (name, spec) in auth.get("Authorizers").and_then(Value::as_object).into_iter().flatten() {
        let Some(jwt) = spec.get("JwtConfiguration") else {
            bail!("authorizer {name}: only JWT authorizers are served locally");
        };
        let issuer = jwt.get("issuer").and_then(Value::as_str).unwrap_or_default().trim_end_matches('/');
        if issuer.is_empty() {
            bail!("authorizer {name} has no issuer: set the JwtIssuer parameter (the local run sets it to its issuer)");
        }
        let audiences: Vec<String> = jwt
            .get("audience")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect();
        if audiences.is_empty() {
            bail!("authorizer {name} has no audience");
        }
        let source = spec.get("IdentitySource").and_then(Value::as_str).unwrap_or("$request.header.Authorization");
        if !source.eq_ignore_ascii_case("$request.header.Authorization") {
            bail!("authorizer {name}: only the Authorization header is served locally as the identity source");
        }
        let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().context("HTTP client")?;
        let authorizer =
            JwtAuthorizer { name: name.clone(), issuer: issuer.to_owned(), audiences, client, keys: Mutex::default() };
        authorizers.insert(name.clone(), Arc::new(authorizer));
    }
    let default = auth.get("DefaultAuthorizer").and_then(Value::as_str).map(str::to_owned);
    if let Some(name) = &default
        && !authorizers.contains_key(name)
    {
        bail!("DefaultAuthorizer {name} is not one of the API's Authorizers");
    }
    Ok(ApiAuth { authorizers, default })
}

impl JwtAuthorizer {
    /// Verifies the request's `Authorization` header for a route needing `scopes` (any one of
    /// them; none: any valid token), and gives `requestContext.authorizer.jwt`.
    pub async fn authorize(&self, authorization: Option<&str>, scopes: &[String]) -> Result<Value, Denied> {
        let unauthorized = |why: &str| Denied::Unauthorized(why.to_owned());
        let raw = authorization.map(str::trim).unwrap_or_default();
        let token = match raw.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ if raw.eq_ignore_ascii_case("bearer") => "",
            _ => raw,
        };
        if token.is_empty() {
            return Err(unauthorized("no token: send Authorization: Bearer <token>"));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| unauthorized("the token is malformed"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512) {
            return Err(unauthorized("the token is not signed with an RSA algorithm"));
        }
        let kid = header.kid.ok_or_else(|| unauthorized("the token names no key (kid)"))?;
        let key = self.key(&kid).await?;

        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_required_spec_claims(&["exp", "iss"]);
        validation.validate_aud = false;
        validation.validate_nbf = true;
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| unauthorized(refusal(e.kind())))?
            .claims;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if claims.get("iat").and_then(Value::as_u64).is_some_and(|iat| iat > now) {
            return Err(unauthorized("the token was issued in the future"));
        }
        let audience = match claims.get("aud") {
            Some(Value::String(one)) => vec![one.as_str()],
            Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
            _ => claims.get("client_id").and_then(Value::as_str).into_iter().collect(),
        };
        if !audience.iter().any(|a| self.audiences.iter().any(|ours| ours == a)) {
            return Err(unauthorized("the token is not for this API's audience"));
        }
        let held: Vec<String> = ["scope", "scp"]
            .iter()
            .filter_map(|c| claims.get(*c))
            .flat_map(|v| match v {
                Value::String(s) => s.split_whitespace().map(str::to_owned).collect::<Vec<_>>(),
                Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                _ => Vec::new(),
            })
            .collect();
        if !scopes.is_empty() && !scopes.iter().any(|s| held.contains(s)) {
            return Err(Denied::Forbidden(format!("this route needs the scope {}", scopes.join(" or "))));
        }
        // As API Gateway passes them: every claim a string.
        let claims: Map<String, Value> = claims.into_iter().map(|(k, v)| (k, json!(claim_text(&v)))).collect();
        Ok(json!({ "claims": claims, "scopes": if scopes.is_empty() { Value::Null } else { json!(held) } }))
    }

    /// The issuer's key `kid`, from the cached key set or a fresh one.
    async fn key(&self, kid: &str) -> Result<DecodingKey, Denied> {
        let unknown = || Denied::Unauthorized("the token's key (kid) is not the issuer's".into());
        let mut cache = self.keys.lock().await;
        let known = cache
            .keys
            .as_ref()
            .filter(|(fetched, _)| fetched.elapsed() < KEYS_CACHED_FOR)
            .and_then(|(_, set)| set.find(kid).cloned());
        let jwk = match known {
            Some(jwk) => jwk,
            None if cache.tried.is_some_and(|tried| tried.elapsed() < REFETCH_AT_MOST_EVERY) => {
                return Err(match cache.keys {
                    Some(_) => unknown(),
                    None => Denied::Unauthorized("the issuer's keys could not be fetched".into()),
                });
            }
            None => {
                cache.tried = Some(Instant::now());
                let set = self.fetch_keys().await.map_err(|e| {
                    tracing::warn!(authorizer = %self.name, error = %format!("{e:#}"), "fetching the issuer's keys failed");
                    Denied::Unauthorized("the issuer's keys could not be fetched".into())
                })?;
                let found = set.find(kid).cloned();
                cache.keys = Some((Instant::now(), set));
                found.ok_or_else(unknown)?
            }
        };
        DecodingKey::from_jwk(&jwk).map_err(|_| Denied::Unauthorized("the issuer's key is not usable".into()))
    }

    async fn fetch_keys(&self) -> anyhow::Result<JwkSet> {
        let discovery = format!("{}/.well-known/openid-configuration", self.issuer);
        let config: Value = self.client.get(&discovery).send().await?.error_for_status()?.json().await?;
        let jwks_uri =
            config.get("jwks_uri").and_then(Value::as_str).with_context(|| format!("{discovery} has no jwks_uri"))?;
        Ok(self.client.get(jwks_uri).send().await?.error_for_status()?.json().await?)
    }
}

fn refusal(kind: &jsonwebtoken::errors::ErrorKind) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet",
        ErrorKind::InvalidIssuer => "the token is from another issuer",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::MissingRequiredClaim(_) => "the token lacks exp or iss",
        _ => "the token is malformed",
    }
}

/// A claim as API Gateway renders it for the function: strings as they are, lists as
/// `[a b]`, anything else as its JSON.
fn claim_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("[{}]", items.iter().map(claim_text).collect::<Vec<_>>().join(" ")),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(authorizer: Value) -> Value {
        json!({ "Auth": { "DefaultAuthorizer": "Jwt", "Authorizers": { "Jwt": authorizer } } })
    }

    #[test]
    fn an_api_s_authorizers_are_read_and_misconfiguration_refused() {
        let good =
            api(json!({ "JwtConfiguration": { "issuer": "http://127.0.0.1:9400/", "audience": ["orders-api"] } }));
        let auth = api_authorizers(&good).expect("a JWT authorizer");
        assert_eq!(auth.default.as_deref(), Some("Jwt"));
        assert_eq!(auth.authorizers["Jwt"].issuer, "http://127.0.0.1:9400", "a trailing slash is not part of iss");
        for (bad, why) in [
            (api(json!({ "JwtConfiguration": { "issuer": "", "audience": ["a"] } })), "no issuer"),
            (api(json!({ "JwtConfiguration": { "issuer": "http://i" } })), "no audience"),
            (api(json!({ "FunctionArn": "arn:aws:lambda:…" })), "only JWT"),
            (
                api(
                    json!({ "IdentitySource": "$request.querystring.t", "JwtConfiguration": { "issuer": "http://i", "audience": ["a"] } }),
                ),
                "Authorization header",
            ),
            (json!({ "Auth": { "DefaultAuthorizer": "Missing" } }), "not one of"),
        ] {
            let error = api_authorizers(&bad).expect_err(why).to_string();
            assert!(error.contains(why), "{error}");
        }
        assert!(api_authorizers(&json!({})).expect("no Auth").authorizers.is_empty());
    }

    #[test]
    fn refusals_are_api_gateway_s_bodies_with_the_reason_in_the_challenge() {
        let expired = Denied::Unauthorized("the token has expired".into());
        assert_eq!((expired.status(), expired.body()), (401, json!({ "message": "Unauthorized" })));
        assert_eq!(expired.challenge(), r#"Bearer error="invalid_token", error_description="the token has expired""#);
        let scope = Denied::Forbidden("this route needs the scope orders/operator".into());
        assert_eq!((scope.status(), scope.body()), (403, json!({ "message": "Forbidden" })));
        assert!(scope.challenge().starts_with(r#"Bearer error="insufficient_scope""#));
    }

    #[test]
    fn claims_reach_the_function_as_strings() {
        assert_eq!(claim_text(&json!("cust-1")), "cust-1");
        assert_eq!(claim_text(&json!(1_795_143_600)), "1795143600");
        assert_eq!(claim_text(&json!(["a", "b"])), "[a b]");
        assert_eq!(claim_text(&json!(true)), "true");
    }

    #[tokio::test]
    async fn an_issuer_that_cannot_be_reached_is_tried_at_most_once_per_interval() {
        // Given an issuer that accepts connections and hangs up on each (counting them)
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        let auth = api_authorizers(&api(json!({ "JwtConfiguration": { "issuer": url, "audience": ["a"] } })))
            .expect("authorizer");
        // {"alg":"RS256","kid":"k1"}: a token whose key must be fetched.
        let token = "Bearer eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.e30.c2ln";
        // When three requests come in a row
        for _ in 0..3 {
            let refused = auth.authorizers["Jwt"].authorize(Some(token), &[]).await;
            // Then each is refused, saying why
            assert_eq!(refused, Err(Denied::Unauthorized("the issuer's keys could not be fetched".into())));
        }
        // And the issuer was asked once
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_without_a_usable_token_is_refused_before_any_key_is_fetched() {
        // An issuer nobody serves: a fetch would fail, so these refusals come before it.
        let auth =
            api_authorizers(&api(json!({ "JwtConfiguration": { "issuer": "http://127.0.0.1:9", "audience": ["a"] } })))
                .expect("authorizer");
        let authorizer = &auth.authorizers["Jwt"];
        for (header, reason) in [
            (None, "no token"),
            (Some("Bearer "), "no token"),
            (Some("Bearer not-a-jwt"), "malformed"),
            // {"alg":"HS256","typ":"JWT"}: a shared-secret token is never accepted.
            (Some("Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.c2ln"), "RSA"),
            // {"alg":"RS256"}: no key named.
            (Some("eyJhbGciOiJSUzI1NiJ9.e30.c2ln"), "kid"),
        ] {
            match authorizer.authorize(header, &[]).await {
                Err(Denied::Unauthorized(why)) => assert!(why.contains(reason), "{header:?}: {why}"),
                other => panic!("{header:?}: {other:?}"),
            }
        }
    }
}

/// Arbitrary `Authorization` headers: always a 401 with a short reason, never a panic, never
/// let through.
#[cfg(test)]
mod properties {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use proptest::prelude::*;

    use super::*;

    fn segment(value: Value) -> String {
        URL_SAFE_NO_PAD.encode(value.to_string())
    }

    /// Tokens shaped like JWTs: a header naming an algorithm and a key, any claims, any signature.
    fn jwt_like() -> impl Strategy<Value = String> {
        let alg = prop::sample::select(vec!["RS256", "RS512", "HS256", "none", "ES256", ""]);
        let claims = prop::collection::btree_map("[a-z]{1,5}", ".{0,20}", 0..5);
        (alg, proptest::option::of(".{0,20}"), claims, "[A-Za-z0-9_-]{0,60}").prop_map(
            |(alg, kid, claims, signature)| {
                let mut header = json!({ "alg": alg, "typ": "JWT" });
                if let Some(kid) = kid {
                    header["kid"] = json!(kid);
                }
                format!("Bearer {}.{}.{signature}", segment(header), segment(json!(claims)))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_authorization_header_is_refused_with_a_short_reason(
            header in prop_oneof![".{0,300}", "Bearer [A-Za-z0-9._-]{0,300}", jwt_like()],
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let issuer = json!({ "JwtConfiguration": { "issuer": "http://127.0.0.1:9", "audience": ["a"] } });
            let auth = api_authorizers(&json!({ "Auth": { "Authorizers": { "Jwt": issuer } } })).expect("authorizer");
            let refused = runtime.block_on(auth.authorizers["Jwt"].authorize(Some(&header), &["s".to_owned()]));
            match refused {
                Err(Denied::Unauthorized(why)) => prop_assert!(!why.is_empty() && why.len() <= 80, "{why}"),
                other => prop_assert!(false, "{header:?} was {other:?}"),
            }
        }
    }
}
