//! Who is calling an HTTP route: the identity the HTTP API's JWT authorizer verified.
//!
//! The token is verified in front of the function (signature, issuer, audience, expiry), by API
//! Gateway on AWS and by the local HTTP API emulation locally, which then passes its claims in
//! the payload 2.0 event's request context (`requestContext.authorizer.jwt`). A function reads
//! them from there (lambda_http's `RequestContext::ApiGatewayV2`) and decides what the caller
//! may see; it never reads the `Authorization` header itself.
//!
//! - A customer is the token's subject (`sub`): orders are placed and read as that customer.
//! - An operator holds the operator scope (`OPERATOR_SCOPE`, in the token's `scope` claim, space
//!   separated, or `scp`): it may read any order and the operator routes (event feed, lag).

use aws_lambda_events::apigw::ApiGatewayV2httpRequestContext;

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
    /// The caller the authorizer verified, from an HTTP API payload 2.0 request context (none:
    /// not an HTTP API request).
    pub fn from_context(context: Option<&ApiGatewayV2httpRequestContext>) -> Result<Self, AuthError> {
        let jwt = context.and_then(|c| c.authorizer.as_ref()?.jwt.as_ref()).ok_or(AuthError::Unauthenticated)?;
        let subject = jwt.claims.get("sub").filter(|s| !s.is_empty()).ok_or(AuthError::Unauthenticated)?.clone();
        // API Gateway lists the token's scopes in `scopes` (for routes with authorization
        // scopes); the claims keep them as a string in any case (a list as `"[a b]"`).
        let mut scopes = jwt.scopes.clone().unwrap_or_default();
        for text in ["scope", "scp"].iter().filter_map(|claim| jwt.claims.get(*claim)) {
            let text = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(text);
            scopes.extend(text.split([' ', ',']).filter(|s| !s.is_empty()).map(str::to_owned));
        }
        scopes.sort();
        scopes.dedup();
        Ok(Self { subject, scopes })
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn caller(context: Value) -> Result<Caller, AuthError> {
        let mut context = context;
        context["http"] = json!({ "method": "GET" });
        Caller::from_context(Some(&serde_json::from_value(context).expect("a request context")))
    }

    fn jwt(jwt: Value) -> Result<Caller, AuthError> {
        caller(json!({ "authorizer": { "jwt": jwt } }))
    }

    #[test]
    fn the_subject_and_scopes_come_from_the_verified_claims() {
        let caller = jwt(json!({ "claims": { "sub": "cust-1", "scope": "orders/operator openid" }, "scopes": null }));
        let caller = caller.unwrap();
        assert_eq!(caller.subject, "cust-1");
        assert!(caller.has_scope("orders/operator") && caller.has_scope("openid"));
        assert!(!caller.has_scope("orders"));

        let listed = jwt(json!({ "claims": { "sub": "c", "scp": "[a b]" }, "scopes": ["c"] }));
        assert_eq!(listed.unwrap().scopes, ["a", "b", "c"]);
    }

    #[test]
    fn no_verified_subject_is_unauthenticated() {
        assert_eq!(Caller::from_context(None), Err(AuthError::Unauthenticated));
        for given in [json!({}), json!({ "authorizer": {} }), json!({ "authorizer": { "jwt": { "claims": {} } } })] {
            assert_eq!(caller(given.clone()), Err(AuthError::Unauthenticated), "{given}");
        }
        assert_eq!(jwt(json!({ "claims": { "sub": "" } })), Err(AuthError::Unauthenticated));
    }
}
