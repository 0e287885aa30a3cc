//! Query API: the read side of CQRS over HTTP (API Gateway HTTP API, payload 2.0): an axum
//! [`router`], run by lambda_http.
//!
//! | Route | Answer |
//! | --- | --- |
//! | `GET /orders/{id}` | the order's [`OrderView`] |
//! | `GET /customers/{id}/orders?status=&cursor=&limit=` | the customer's orders, newest first ([`shared::readmodel::CustomerOrder`]) |
//! | `GET /streams/{stream}/events?after=&limit=` | a page of a stream's events, for clients that poll and catch up |
//! | `GET /streams/{stream}/lag` | how far each read model of the stream is behind the event store |
//!
//! Every route answers only what the caller may see ([`shared::auth`]: the identity the API's
//! JWT authorizer verified; none is `401`). A customer (the token's subject) sees their own
//! orders: another customer's order, or listing, is a `404` like a missing one, so ids cannot be
//! probed. The operator scope (`OPERATOR_SCOPE`) may read any order, and only it may read the
//! event feed and lag (else `403`; the HTTP API requires the scope on those routes too).
//!
//! Read models come from the read model table (`READ_MODEL_TABLE`; the listing and lag queries
//! live next to the models, in [`shared::adapters::dynamodb::queries`]); events and heads from the event
//! store. This crate maps requests and answers onto them. Every error is JSON `{"error": …}` (an
//! unknown path `404`, another method `405` with `Allow`); a failure of the storage is logged and
//! answered `500 {"error":"internal error"}`, never with its detail.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{Method, StatusCode, Uri, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lambda_http::RequestExt;
use lambda_http::request::RequestContext;
use serde_json::{Value, json};
use shared::adapters::dynamodb::queries::{QueryError, stream_lag};
use shared::adapters::dynamodb::readmodels::{ProjectionError, ReadModelStore};
use shared::adapters::dynamodb::{DynamoEventStore, EventStoreConfig};
use shared::auth::{AuthError, Caller};
use shared::config::{ConfigError, Vars, process_env, required};
use shared::domain::{CustomerId, OrderId};
use shared::eventstore::{EventStore, StoreError, StreamId};
use shared::readmodel::{OrderView, ViewStatus, order_key};

pub const DEFAULT_ORDERS_LIMIT: u32 = 20;
pub const MAX_ORDERS_LIMIT: u32 = 100;
pub const DEFAULT_EVENTS_LIMIT: u32 = 100;
pub const MAX_EVENTS_LIMIT: u32 = 1000;

#[derive(Debug, Clone)]
pub struct Config {
    pub event_store: EventStoreConfig,
    pub read_model_table: String,
    /// The scope that makes a caller an operator.
    pub operator_scope: String,
}

impl Config {
    /// `EVENTS_TABLE`, `COMMANDS_TABLE`, `SNAPSHOTS_TABLE`, `READ_MODEL_TABLE` and `OPERATOR_SCOPE`.
    pub fn from_vars(vars: Vars<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            event_store: EventStoreConfig::from_vars(vars)?,
            read_model_table: required(vars, "READ_MODEL_TABLE")?,
            operator_scope: required(vars, "OPERATOR_SCOPE")?,
        })
    }

    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&process_env)
    }
}

/// What went wrong, as the caller sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(#[from] AuthError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {0} is not allowed here; use GET")]
    MethodNotAllowed(Method),
    /// The detail is logged, never returned.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "query failed");
        }
        let allow = matches!(self, Self::MethodNotAllowed(_)).then_some([(header::ALLOW, "GET")]);
        (self.status(), allow, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<ProjectionError> for ApiError {
    fn from(e: ProjectionError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::InvalidCursor => Self::BadRequest(e.to_string()),
            QueryError::Store(e) => e.into(),
        }
    }
}

/// A path parameter that is not UTF-8 once decoded.
impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::BadRequest(e.body_text())
    }
}

/// A successful answer: the JSON body and, for a paged answer, its `Link` header.
#[derive(Debug)]
struct Reply {
    body: Value,
    links: Vec<(String, &'static str)>,
}

impl Reply {
    fn json(body: Value) -> Self {
        Self { body, links: Vec::new() }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        (link_header(&self.links).map(|link| [(header::LINK, link)]), Json(self.body)).into_response()
    }
}

type Params = Query<BTreeMap<String, String>>;

fn whole_number(
    params: &BTreeMap<String, String>,
    name: &str,
    default: u64,
    range: (u64, u64),
) -> Result<u64, ApiError> {
    let Some(raw) = params.get(name) else { return Ok(default) };
    match raw.trim().parse::<u64>() {
        Ok(n) if (range.0..=range.1).contains(&n) => Ok(n),
        _ if range.1 == u64::MAX => Err(ApiError::BadRequest(format!("{name} must be a whole number"))),
        _ => Err(ApiError::BadRequest(format!("{name} must be a whole number from {} to {}", range.0, range.1))),
    }
}

fn link_header(links: &[(String, &str)]) -> Option<String> {
    (!links.is_empty())
        .then(|| links.iter().map(|(url, rel)| format!("<{url}>; rel=\"{rel}\"")).collect::<Vec<_>>().join(", "))
}

/// Whose data a request may see: extracted from the caller the authorizer verified (in the
/// request context lambda_http puts in the request's extensions; none is `401`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Viewer {
    /// Their own orders only.
    Customer(String),
    /// Everything, and the operator routes.
    Operator,
}

impl Viewer {
    fn may_see(&self, customer_id: &str) -> bool {
        match self {
            Self::Customer(subject) => subject == customer_id,
            Self::Operator => true,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<Arc<QueryApi<S>>> for Viewer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<QueryApi<S>>) -> Result<Self, ApiError> {
        let context = match parts.extensions.request_context_ref() {
            Some(RequestContext::ApiGatewayV2(context)) => Some(context),
            _ => None,
        };
        let caller = Caller::from_context(context)?;
        Ok(if caller.has_scope(&api.operator_scope) { Self::Operator } else { Self::Customer(caller.subject) })
    }
}

/// The query API over an event store and the read model table.
pub struct QueryApi<S> {
    store: S,
    models: ReadModelStore,
    operator_scope: String,
}

impl QueryApi<DynamoEventStore> {
    pub fn new(dynamodb: Client, config: Config) -> Self {
        let store = DynamoEventStore::new(dynamodb.clone(), config.event_store);
        Self::with_store(store, ReadModelStore::new(dynamodb, config.read_model_table), config.operator_scope)
    }
}

impl<S: EventStore> QueryApi<S> {
    pub fn with_store(store: S, models: ReadModelStore, operator_scope: String) -> Self {
        Self { store, models, operator_scope }
    }
}

/// The HTTP API's routes (as `template.yaml` declares them) over `api`.
pub fn router<S: EventStore + 'static>(api: QueryApi<S>) -> Router {
    Router::new()
        .route("/orders/{id}", get(order::<S>))
        .route("/customers/{id}/orders", get(customer_orders::<S>))
        .route("/streams/{stream}/events", get(stream_events::<S>))
        .route("/streams/{stream}/lag", get(lag::<S>))
        .method_not_allowed_fallback(|method: Method| async { ApiError::MethodNotAllowed(method) })
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::NotFound(format!("no route for {method} {}", uri.path()))
        })
        .with_state(Arc::new(api))
}

type Api<S> = State<Arc<QueryApi<S>>>;

/// `GET /orders/{id}`: another customer's order is not found, as a missing one.
async fn order<S: EventStore>(
    State(api): Api<S>,
    viewer: Viewer,
    id: Result<Path<String>, PathRejection>,
) -> Result<Reply, ApiError> {
    let id = OrderId::parse(&id?.0).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let not_found = || ApiError::NotFound(format!("order {id} not found"));
    let Some(view) = api.models.find::<OrderView>(&order_key(id.as_str())).await? else {
        return Err(not_found());
    };
    if !viewer.may_see(&view.customer_id) {
        return Err(not_found());
    }
    Ok(Reply::json(json!(view)))
}

/// `GET /customers/{id}/orders`: newest first, optionally one status, paged by cursor.
async fn customer_orders<S: EventStore>(
    State(api): Api<S>,
    viewer: Viewer,
    id: Result<Path<String>, PathRejection>,
    Query(params): Params,
) -> Result<Reply, ApiError> {
    let customer = CustomerId::parse(&id?.0).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    if !viewer.may_see(customer.as_str()) {
        return Err(ApiError::NotFound(format!("customer {customer} not found")));
    }
    let status = match params.get("status") {
        None => None,
        Some(s) => Some(ViewStatus::listed(s).ok_or_else(|| {
            let known: Vec<&str> = ViewStatus::LISTED.iter().map(|s| s.as_str()).collect();
            ApiError::BadRequest(format!("status must be one of {}", known.join(", ")))
        })?),
    };
    let limit = whole_number(&params, "limit", DEFAULT_ORDERS_LIMIT.into(), (1, MAX_ORDERS_LIMIT.into()))? as usize;
    let cursor = params.get("cursor").map(String::as_str);
    let page = api.models.customer_orders(&customer, status, limit, cursor).await?;
    let cursor = page.next_cursor;
    let mut links = Vec::new();
    if let Some(cursor) = &cursor {
        let filter = status.map(|s| format!("&status={s}")).unwrap_or_default();
        links.push((format!("/customers/{customer}/orders?limit={limit}{filter}&cursor={cursor}"), "next"));
    }
    Ok(Reply { body: json!({ "items": page.items, "nextCursor": cursor }), links })
}

/// The stream of an operator route: customers are refused (`403`).
fn operator_stream<S>(
    api: &QueryApi<S>,
    viewer: &Viewer,
    stream: Result<Path<String>, PathRejection>,
) -> Result<StreamId, ApiError> {
    if let Viewer::Customer(_) = viewer {
        let needs = &api.operator_scope;
        return Err(ApiError::Forbidden(format!("this route is for operators: it needs the {needs} scope")));
    }
    StreamId::parse(&stream?.0).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// `GET /streams/{stream}/events`: a page after `after`, and where the stream's head is.
async fn stream_events<S: EventStore>(
    State(api): Api<S>,
    viewer: Viewer,
    stream: Result<Path<String>, PathRejection>,
    Query(params): Params,
) -> Result<Reply, ApiError> {
    let stream = operator_stream(&api, &viewer, stream)?;
    let after = whole_number(&params, "after", 0, (0, u64::MAX))?;
    let limit = whole_number(&params, "limit", DEFAULT_EVENTS_LIMIT.into(), (1, MAX_EVENTS_LIMIT.into()))?;
    let events = api.store.read_page(&stream, after, limit as u32).await?;
    // Read after the page, so the head is never behind what the page returned.
    let head = api.store.head_version(&stream).await?;
    if head == 0 {
        return Err(ApiError::NotFound(format!("stream {stream} has no events")));
    }
    let base = format!("/streams/{stream}/events");
    let mut links = Vec::new();
    if let Some(last) = events.last().map(|e| e.version).filter(|last| *last < head) {
        links.push((format!("{base}?after={last}&limit={limit}"), "next"));
    }
    if after > 0 {
        links.push((format!("{base}?after={}&limit={limit}", after.saturating_sub(limit)), "prev"));
    }
    Ok(Reply { body: json!({ "stream": stream.as_str(), "events": events, "head": head }), links })
}

/// `GET /streams/{stream}/lag`: the head against the version each read model applied.
async fn lag<S: EventStore>(
    State(api): Api<S>,
    viewer: Viewer,
    stream: Result<Path<String>, PathRejection>,
) -> Result<Reply, ApiError> {
    let stream = operator_stream(&api, &viewer, stream)?;
    let Some(lag) = stream_lag(&api.store, &api.models, &stream).await? else {
        return Err(ApiError::NotFound(format!("no read model follows {} streams", stream.category())));
    };
    if lag.head == 0 {
        return Err(ApiError::NotFound(format!("stream {stream} has no events")));
    }
    Ok(Reply::json(
        json!({ "stream": stream.as_str(), "head": lag.head, "applied": lag.applied, "behind": lag.behind }),
    ))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpRequestContext;
    use shared::eventstore::{InMemoryEventStore, NewEvent};
    use tower::ServiceExt;

    use super::*;

    const OPERATOR: &str = "orders/operator";

    /// The API over an in-memory store; its read model table is never reached by these tests.
    fn api() -> QueryApi<InMemoryEventStore> {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .build();
        let models = ReadModelStore::new(Client::from_conf(config), "read-models");
        QueryApi::with_store(InMemoryEventStore::new(), models, OPERATOR.into())
    }

    /// A request as lambda_http hands it over: the payload 2.0 request context in its extensions,
    /// with the claims the authorizer verified (`sub`, `scope`), if any.
    fn request(method: &str, uri: &str, claims: Option<(&str, &str)>) -> Request<Body> {
        let mut context = json!({ "http": { "method": method }, "stage": "$default" });
        if let Some((sub, scope)) = claims {
            context["authorizer"] = json!({ "jwt": { "claims": { "sub": sub, "scope": scope }, "scopes": null } });
        }
        let context: ApiGatewayV2httpRequestContext = serde_json::from_value(context).expect("a request context");
        let request = Request::builder().method(method).uri(uri).extension(RequestContext::ApiGatewayV2(context));
        request.body(Body::empty()).expect("a request")
    }

    async fn send(api: QueryApi<InMemoryEventStore>, request: Request<Body>) -> (StatusCode, Option<String>, Value) {
        let response = router(api).oneshot(request).await.expect("an answer");
        let (status, headers) = (response.status(), response.headers().clone());
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("a body");
        let link = headers.get(header::LINK).map(|l| l.to_str().expect("text").to_owned());
        (status, link.or(headers.get(header::ALLOW).map(|a| a.to_str().expect("text").to_owned())), {
            serde_json::from_slice(&body).expect("JSON")
        })
    }

    #[tokio::test]
    async fn unknown_paths_other_methods_and_anonymous_callers_are_refused_as_json() {
        let customer = Some(("cust-1", ""));
        for path in ["/nope", "/orders/", "/orders/a/b"] {
            let (status, _, body) = send(api(), request("GET", path, customer)).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
            assert_eq!(body["error"], format!("no route for GET {path}"));
        }
        let (status, allow, body) = send(api(), request("DELETE", "/orders/a", customer)).await;
        assert_eq!((status, allow.as_deref()), (StatusCode::METHOD_NOT_ALLOWED, Some("GET")), "{body}");
        assert_eq!(body["error"], "method DELETE is not allowed here; use GET");
        let (status, _, body) = send(api(), request("GET", "/orders/a", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.starts_with("sign in")), "{body}");
    }

    #[tokio::test]
    async fn operator_routes_need_the_scope_and_inputs_are_bounded() {
        let (status, _, body) = send(api(), request("GET", "/streams/Order-1/lag", Some(("cust-1", "openid")))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains(OPERATOR)), "{body}");
        let customer = Some(("cust-1", ""));
        for uri in ["/customers/cust-1/orders?limit=0", "/customers/cust-1/orders?status=Nope", "/orders/a%20b"] {
            let (status, _, body) = send(api(), request("GET", uri, customer)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        }
        // Another customer's listing is not found, before anything is read
        let (status, _, _) = send(api(), request("GET", "/customers/cust-2/orders", customer)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn the_event_feed_pages_with_link_headers() {
        let api = api();
        let stream = StreamId::parse("Order-a:1").expect("stream");
        let events = (0..5).map(|i| NewEvent::new("Noted", 1, json!({ "i": i }))).collect();
        api.store.append(&stream, 0, events, None).await.expect("append");
        let operator = Some(("ops-1", OPERATOR));

        let (status, link, body) =
            send(api, request("GET", "/streams/Order-a%3A1/events?after=2&limit=2", operator)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!((body["stream"].as_str(), body["head"].as_u64()), (Some("Order-a:1"), Some(5)));
        assert_eq!(body["events"].as_array().map(Vec::len), Some(2));
        let next_and_prev = r#"</streams/Order-a:1/events?after=4&limit=2>; rel="next", </streams/Order-a:1/events?after=0&limit=2>; rel="prev""#;
        assert_eq!(link.as_deref(), Some(next_and_prev));

        let (status, _, body) = send(self::api(), request("GET", "/streams/Order-9/events", operator)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }

    #[test]
    fn numbers_are_bounded() {
        let params = BTreeMap::from([("limit".to_owned(), "0".to_owned()), ("after".to_owned(), "-1".to_owned())]);
        assert!(whole_number(&params, "limit", 20, (1, 100)).is_err());
        assert!(whole_number(&params, "after", 0, (0, u64::MAX)).is_err());
        assert_eq!(whole_number(&params, "missing", 20, (1, 100)).unwrap(), 20);
        let params = BTreeMap::from([("limit".to_owned(), "100".to_owned())]);
        assert_eq!(whole_number(&params, "limit", 20, (1, 100)).unwrap(), 100);
        let links = vec![("/x?after=3".to_owned(), "next"), ("/x?after=0".to_owned(), "prev")];
        assert_eq!(link_header(&links).unwrap(), r#"</x?after=3>; rel="next", </x?after=0>; rel="prev""#);
    }

    /// Arbitrary requests through the router and the query strings (the cursors:
    /// `shared::adapters::dynamodb::queries`): never a panic, and every refusal a 4xx with a short message.
    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn refusal(status: StatusCode, error: &str) -> Result<(), TestCaseError> {
            prop_assert!(status.is_client_error(), "{status}: {error}");
            prop_assert!(error.len() <= 1024 + 64, "{} bytes", error.len());
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_path_and_method_is_routed_or_refused(
                method in "[A-Z]{1,8}",
                path in prop_oneof!["/[a-zA-Z0-9%/{}._-]{0,60}", "/(orders|customers|streams)/[^?#]{0,30}(/orders|/events|/lag)?"],
            ) {
                let encoded: String = path.chars().map(|c| if c.is_ascii_graphic() { c.to_string() } else { format!("%{:02X}", c as u32 & 0xff) }).collect();
                prop_assume!(encoded.parse::<Uri>().is_ok());
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                // No verified caller: every route refuses before reading anything.
                let (status, _, body) = runtime.block_on(send(api(), request(&method, &encoded, None)));
                refusal(status, body["error"].as_str().unwrap_or_default())?;
            }

            #[test]
            fn any_query_string_decodes_and_numbers_are_bounded(query in ".{0,200}") {
                let query: String = query
                    .bytes()
                    .map(|b| if b.is_ascii_alphanumeric() || b"=&+%-._".contains(&b) { char::from(b).to_string() } else { format!("%{b:02X}") })
                    .collect();
                let uri = format!("/x?{query}");
                let Query(params) = Params::try_from_uri(&uri.parse().expect("uri")).expect("any query decodes");
                for name in ["limit", "after", "missing"] {
                    match whole_number(&params, name, 20, (1, 100)) {
                        Ok(n) => prop_assert!((1..=100).contains(&n)),
                        Err(e) => refusal(e.status(), &e.to_string())?,
                    }
                }
            }
        }
    }
}
