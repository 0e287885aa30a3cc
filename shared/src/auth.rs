//! Who is calling an HTTP route: the identity the HTTP API's JWT authorizer verified.
//!
//! The token is verified in front of the function (signature, issuer, audience, expiry), by API
//! Gateway on AWS and by the local HTTP API emulation locally, which then passes its claims in
//! the payload 2.0 event (`requestContext.authorizer.jwt`). A function reads them from there
//! and decides what the caller may see; it never reads the `Authorization` header itself.
//!
//! - A customer is the token's subject (`sub`): orders are placed and read as that customer.
//! - An operator holds the operator scope (`OPERATOR_SCOPE`, in the token's `scope` claim, space
//!   separated, or `scp`): it may read any order and the operator routes (event feed, lag).

use serde_json::Value;

/// The verified caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub` claim.
    pub subject: String,
    pub scopes: Vec<String>,
}

/// Why a request has no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No verified claims: the route is not behind the authorizer, or the event is not from the
    /// HTTP API. Refused rather than served anonymously (fails closed).
    #[error("sign in: the request carries no verified identity")]
    Unauthenticated,
}

impl Caller {
    /// The caller the authorizer verified, from an HTTP API payload 2.0 event.
    pub fn from_event(event: &Value) -> Result<Self, AuthError> {
        let jwt = event.pointer("/requestContext/authorizer/jwt").ok_or(AuthError::Unauthenticated)?;
        let claims = jwt.get("claims").and_then(Value::as_object).ok_or(AuthError::Unauthenticated)?;
        let subject = claims.get("sub").and_then(Value::as_str).filter(|s| !s.is_empty());
        let subject = subject.ok_or(AuthError::Unauthenticated)?.to_owned();
        // API Gateway lists the token's scopes in `scopes` (for routes with authorization
        // scopes); the claims keep them as a string in any case.
        let mut scopes: Vec<String> = match jwt.get("scopes").and_then(Value::as_array) {
            Some(listed) => listed.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            None => Vec::new(),
        };
        for claim in ["scope", "scp"] {
            match claims.get(claim) {
                Some(Value::String(text)) => scopes.extend(scope_words(text)),
                Some(Value::Array(listed)) => scopes.extend(listed.iter().filter_map(Value::as_str).map(str::to_owned)),
                _ => {}
            }
        }
        scopes.sort();
        scopes.dedup();
        Ok(Self { subject, scopes })
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// `"a b"`, or API Gateway's rendering of a list claim, `"[a b]"`.
fn scope_words(text: &str) -> impl Iterator<Item = String> + '_ {
    let text = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
    text.split([' ', ',']).filter(|s| !s.is_empty()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(jwt: Value) -> Value {
        json!({ "requestContext": { "authorizer": { "jwt": jwt } } })
    }

    #[test]
    fn the_subject_and_scopes_come_from_the_verified_claims() {
        let caller = Caller::from_event(&event(json!({
            "claims": { "sub": "cust-1", "scope": "orders/operator openid" },
            "scopes": null,
        })))
        .unwrap();
        assert_eq!(caller.subject, "cust-1");
        assert!(caller.has_scope("orders/operator") && caller.has_scope("openid"));
        assert!(!caller.has_scope("orders"));

        let listed = Caller::from_event(&event(json!({ "claims": { "sub": "c", "scp": "[a b]" }, "scopes": ["c"] })));
        assert_eq!(listed.unwrap().scopes, ["a", "b", "c"]);
    }

    #[test]
    fn no_verified_subject_is_unauthenticated() {
        for given in [
            json!({ "requestContext": {} }),
            json!({ "headers": { "authorization": "Bearer x" } }),
            event(json!({ "claims": {} })),
            event(json!({ "claims": { "sub": "" } })),
            event(json!({ "claims": { "sub": 7 } })),
        ] {
            assert_eq!(Caller::from_event(&given), Err(AuthError::Unauthenticated), "{given}");
        }
    }
}
