//! Query API: the read side of CQRS over HTTP (API Gateway HTTP API, payload 2.0).
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
//! live next to the models, in [`shared::readmodel::queries`]); events and heads from the event
//! store. This crate maps requests and answers onto them. Every error is JSON `{"error": …}`; a failure of
//! the storage is logged and answered `500 {"error":"internal error"}`, never with its detail.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::Client;
use serde_json::{Value, json};
use shared::auth::{AuthError, Caller};
use shared::config::{ConfigError, Vars, process_env, required};
use shared::domain::{CustomerId, OrderId};
use shared::eventstore::{DynamoEventStore, EventStore, EventStoreConfig, StoreError, StreamId};
use shared::readmodel::queries::{QueryError, stream_lag};
use shared::readmodel::store::{ProjectionError, ReadModelStore};
use shared::readmodel::{OrderView, ViewStatus, order_key};
use shared::text::percent_decode;

pub const DEFAULT_ORDERS_LIMIT: u32 = 20;
pub const MAX_ORDERS_LIMIT: u32 = 100;
pub const DEFAULT_EVENTS_LIMIT: u32 = 100;
pub const MAX_EVENTS_LIMIT: u32 = 1000;

/// The routes, as declared in `template.yaml` (SAM path syntax).
pub const ROUTES: [&str; 4] =
    ["/orders/{id}", "/customers/{id}/orders", "/streams/{stream}/events", "/streams/{stream}/lag"];

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
    MethodNotAllowed(String),
    /// The detail is logged, never returned.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) => 400,
            Self::Unauthenticated(_) => 401,
            Self::Forbidden(_) => 403,
            Self::NotFound(_) => 404,
            Self::MethodNotAllowed(_) => 405,
            Self::Internal(_) => 500,
        }
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

/// A route matched against the request, with its path parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Order(String),
    CustomerOrders(String),
    StreamEvents(String),
    StreamLag(String),
}

impl Route {
    fn from_template(template: &str, param: String) -> Option<Self> {
        Some(match template {
            "/orders/{id}" => Self::Order(param),
            "/customers/{id}/orders" => Self::CustomerOrders(param),
            "/streams/{stream}/events" => Self::StreamEvents(param),
            "/streams/{stream}/lag" => Self::StreamLag(param),
            _ => return None,
        })
    }
}

/// The one path parameter of a template, if `path` matches it segment by segment.
fn match_template(template: &str, path: &str) -> Option<(String, String)> {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('/').collect(), path.split('/').collect());
    if t.len() != p.len() {
        return None;
    }
    let mut param = None;
    for (t, p) in t.iter().zip(&p) {
        match t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            Some(name) if !p.is_empty() => param = Some((name.to_owned(), percent_decode(p, false))),
            Some(_) => return None,
            None if t == p => {}
            None => return None,
        }
    }
    param
}

fn str_at<'a>(event: &'a Value, pointer: &str) -> Option<&'a str> {
    event.pointer(pointer).and_then(Value::as_str)
}

/// The route of a request: API Gateway's `routeKey` and `pathParameters` when it matched one of
/// ours, else the path itself (a direct invocation, a `$default` route).
fn resolve(event: &Value) -> Result<Route, ApiError> {
    let method = str_at(event, "/requestContext/http/method").unwrap_or("GET").to_ascii_uppercase();
    let path = str_at(event, "/rawPath").or_else(|| str_at(event, "/requestContext/http/path")).unwrap_or("/");
    let from_route_key = str_at(event, "/routeKey").and_then(|key| key.split_once(' ')).and_then(|(_, template)| {
        let (name, _) = match_template(template, template)?;
        let value = str_at(event, &format!("/pathParameters/{name}"))?;
        Route::from_template(template, value.to_owned())
    });
    let route = from_route_key.or_else(|| {
        ROUTES.iter().find_map(|t| match_template(t, path).and_then(|(_, value)| Route::from_template(t, value)))
    });
    match route {
        None => Err(ApiError::NotFound(format!("no route for {method} {path}"))),
        Some(_) if method != "GET" => Err(ApiError::MethodNotAllowed(method)),
        Some(route) => Ok(route),
    }
}

/// The query parameters: `queryStringParameters` (API Gateway joins repeated ones with commas),
/// else parsed from `rawQueryString`.
fn query_params(event: &Value) -> BTreeMap<String, String> {
    if let Some(params) = event.get("queryStringParameters").and_then(Value::as_object) {
        return params.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect();
    }
    let mut params = BTreeMap::<String, String>::new();
    for pair in str_at(event, "/rawQueryString").unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k, true), percent_decode(v, true));
        params.entry(k).and_modify(|old| *old = format!("{old},{v}")).or_insert(v);
    }
    params
}

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

/// The path the client called, up to the canonical route (a stage prefix is kept), so links
/// work wherever the API is mounted. Only plain characters are echoed back into a header.
fn base_path(event: &Value, canonical: &str) -> String {
    let raw = str_at(event, "/rawPath").unwrap_or_default();
    match raw.strip_suffix(canonical) {
        Some(prefix) if prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_./~$".contains(c)) => {
            format!("{prefix}{canonical}")
        }
        _ => canonical.to_owned(),
    }
}

fn link_header(links: &[(String, &str)]) -> Option<String> {
    (!links.is_empty())
        .then(|| links.iter().map(|(url, rel)| format!("<{url}>; rel=\"{rel}\"")).collect::<Vec<_>>().join(", "))
}

fn http_response(status: u16, body: &Value, extra: &[(&str, String)]) -> Value {
    let mut headers = json!({ "content-type": "application/json" });
    for (k, v) in extra {
        headers[*k] = json!(v);
    }
    json!({ "statusCode": status, "headers": headers, "body": body.to_string(), "isBase64Encoded": false })
}

/// Whose data a request may see.
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

    /// Answers one HTTP API (payload 2.0) event with the HTTP response.
    pub async fn handle(&self, event: Value) -> Value {
        let result = match resolve(&event) {
            Ok(route) => match self.viewer(&event) {
                Ok(viewer) => self.answer(&route, &viewer, &event).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(reply) => {
                let link = link_header(&reply.links);
                http_response(200, &reply.body, &link.map(|l| vec![("link", l)]).unwrap_or_default())
            }
            Err(e) => {
                let extra = match &e {
                    ApiError::Internal(detail) => {
                        let path = str_at(&event, "/rawPath").unwrap_or_default();
                        tracing::error!(%detail, %path, "query failed");
                        vec![]
                    }
                    ApiError::MethodNotAllowed(_) => vec![("allow", "GET".to_owned())],
                    _ => vec![],
                };
                http_response(e.status(), &json!({ "error": e.to_string() }), &extra)
            }
        }
    }

    fn viewer(&self, event: &Value) -> Result<Viewer, ApiError> {
        let caller = Caller::from_event(event)?;
        Ok(if caller.has_scope(&self.operator_scope) { Viewer::Operator } else { Viewer::Customer(caller.subject) })
    }

    async fn answer(&self, route: &Route, viewer: &Viewer, event: &Value) -> Result<Reply, ApiError> {
        let params = query_params(event);
        match (route, viewer) {
            (Route::Order(id), _) => self.order(id, viewer).await,
            (Route::CustomerOrders(id), _) => self.customer_orders(id, viewer, &params, event).await,
            (Route::StreamEvents(_) | Route::StreamLag(_), Viewer::Customer(_)) => Err(ApiError::Forbidden(format!(
                "this route is for operators: it needs the {} scope",
                self.operator_scope
            ))),
            (Route::StreamEvents(stream), Viewer::Operator) => self.stream_events(stream, &params, event).await,
            (Route::StreamLag(stream), Viewer::Operator) => self.lag(stream).await,
        }
    }

    /// `GET /orders/{id}`: another customer's order is not found, as a missing one.
    async fn order(&self, id: &str, viewer: &Viewer) -> Result<Reply, ApiError> {
        let id = OrderId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let not_found = || ApiError::NotFound(format!("order {id} not found"));
        let Some(view) = self.models.find::<OrderView>(&order_key(id.as_str())).await? else {
            return Err(not_found());
        };
        if !viewer.may_see(&view.customer_id) {
            return Err(not_found());
        }
        Ok(Reply::json(json!(view)))
    }

    /// `GET /customers/{id}/orders`: newest first, optionally one status, paged by cursor.
    async fn customer_orders(
        &self,
        id: &str,
        viewer: &Viewer,
        params: &BTreeMap<String, String>,
        event: &Value,
    ) -> Result<Reply, ApiError> {
        let customer = CustomerId::parse(id).map_err(|e| ApiError::BadRequest(e.to_string()))?;
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
        let limit = whole_number(params, "limit", DEFAULT_ORDERS_LIMIT.into(), (1, MAX_ORDERS_LIMIT.into()))? as usize;
        let cursor = params.get("cursor").map(String::as_str);
        let page = self.models.customer_orders(&customer, status, limit, cursor).await?;
        let cursor = page.next_cursor;
        let mut links = Vec::new();
        if let Some(cursor) = &cursor {
            let base = base_path(event, &format!("/customers/{customer}/orders"));
            let filter = status.map(|s| format!("&status={s}")).unwrap_or_default();
            links.push((format!("{base}?limit={limit}{filter}&cursor={cursor}"), "next"));
        }
        Ok(Reply { body: json!({ "items": page.items, "nextCursor": cursor }), links })
    }

    /// `GET /streams/{stream}/events`: a page after `after`, and where the stream's head is.
    async fn stream_events(
        &self,
        stream: &str,
        params: &BTreeMap<String, String>,
        event: &Value,
    ) -> Result<Reply, ApiError> {
        let stream = StreamId::parse(stream).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let after = whole_number(params, "after", 0, (0, u64::MAX))?;
        let limit = whole_number(params, "limit", DEFAULT_EVENTS_LIMIT.into(), (1, MAX_EVENTS_LIMIT.into()))?;
        let events = self.store.read_page(&stream, after, limit as u32).await?;
        // Read after the page, so the head is never behind what the page returned.
        let head = self.store.head_version(&stream).await?;
        if head == 0 {
            return Err(ApiError::NotFound(format!("stream {stream} has no events")));
        }
        let base = base_path(event, &format!("/streams/{stream}/events"));
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
    async fn lag(&self, stream: &str) -> Result<Reply, ApiError> {
        let stream = StreamId::parse(stream).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let Some(lag) = stream_lag(&self.store, &self.models, &stream).await? else {
            return Err(ApiError::NotFound(format!("no read model follows {} streams", stream.category())));
        };
        if lag.head == 0 {
            return Err(ApiError::NotFound(format!("stream {stream} has no events")));
        }
        Ok(Reply::json(
            json!({ "stream": stream.as_str(), "head": lag.head, "applied": lag.applied, "behind": lag.behind }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(method: &str, path: &str, query: &str) -> Value {
        json!({
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": path,
            "rawQueryString": query,
            "requestContext": { "http": { "method": method, "path": path } },
        })
    }

    #[test]
    fn routes_resolve_from_route_key_or_path() {
        let by_key = json!({
            "routeKey": "GET /orders/{id}",
            "rawPath": "/prod/orders/o-1",
            "pathParameters": { "id": "o-1" },
            "requestContext": { "http": { "method": "GET" } },
        });
        assert_eq!(resolve(&by_key).unwrap(), Route::Order("o-1".into()));
        assert_eq!(resolve(&http("GET", "/customers/c-1/orders", "")).unwrap(), Route::CustomerOrders("c-1".into()));
        assert_eq!(
            resolve(&http("GET", "/streams/Order-a%3A1/events", "")).unwrap(),
            Route::StreamEvents("Order-a:1".into())
        );
        assert_eq!(resolve(&http("GET", "/streams/Order-1/lag", "")).unwrap(), Route::StreamLag("Order-1".into()));
        assert!(matches!(resolve(&http("GET", "/nope", "")), Err(ApiError::NotFound(_))));
        assert!(matches!(resolve(&http("GET", "/orders/", "")), Err(ApiError::NotFound(_))));
        assert!(matches!(resolve(&http("GET", "/orders/a/b", "")), Err(ApiError::NotFound(_))));
        assert!(matches!(resolve(&http("DELETE", "/orders/a", "")), Err(ApiError::MethodNotAllowed(_))));
    }

    #[test]
    fn query_strings_are_decoded() {
        let params = query_params(&http("GET", "/x", "status=Placed&limit=5&a=b%20c&a=d&e+f=g+h"));
        assert_eq!(params["status"], "Placed");
        assert_eq!(params["a"], "b c,d");
        assert_eq!(params["e f"], "g h");
        let given = json!({ "queryStringParameters": { "limit": "7" }, "rawQueryString": "limit=9" });
        assert_eq!(query_params(&given)["limit"], "7");
    }

    #[test]
    fn numbers_are_bounded() {
        let params = BTreeMap::from([("limit".to_owned(), "0".to_owned()), ("after".to_owned(), "-1".to_owned())]);
        assert!(whole_number(&params, "limit", 20, (1, 100)).is_err());
        assert!(whole_number(&params, "after", 0, (0, u64::MAX)).is_err());
        assert_eq!(whole_number(&params, "missing", 20, (1, 100)).unwrap(), 20);
        let params = BTreeMap::from([("limit".to_owned(), "100".to_owned())]);
        assert_eq!(whole_number(&params, "limit", 20, (1, 100)).unwrap(), 100);
    }

    #[test]
    fn links_keep_a_stage_prefix_but_echo_nothing_odd() {
        let event = json!({ "rawPath": "/prod/streams/Order-1/events" });
        assert_eq!(base_path(&event, "/streams/Order-1/events"), "/prod/streams/Order-1/events");
        let event = json!({ "rawPath": "/a>b/streams/Order-1/events" });
        assert_eq!(base_path(&event, "/streams/Order-1/events"), "/streams/Order-1/events");
        let links = vec![("/x?after=3".to_owned(), "next"), ("/x?after=0".to_owned(), "prev")];
        assert_eq!(link_header(&links).unwrap(), r#"</x?after=3>; rel="next", </x?after=0>; rel="prev""#);
    }

    /// Arbitrary requests through the pure half of the API (routing, query strings, numbers; the
    /// cursors: `shared::readmodel::queries`): never a panic, and every refusal a 4xx with a short message.
    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn refusal(e: &ApiError) -> Result<(), TestCaseError> {
            prop_assert!((400..500).contains(&e.status()), "{e:?}");
            prop_assert!(e.to_string().len() <= 1024 + 64, "{} bytes", e.to_string().len());
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_path_and_method_resolve_or_are_refused(
                method in "[A-Za-z]{0,8}",
                path in prop_oneof!["/[a-zA-Z0-9%/{}._-]{0,60}", "/(orders|customers|streams)/.{0,30}(/orders|/events|/lag)?"],
                route_key in proptest::option::of(".{0,40}"),
                parameter in proptest::option::of(".{0,40}"),
            ) {
                let mut event = http(&method, &path, "");
                if let Some(key) = route_key {
                    event["routeKey"] = json!(key);
                }
                if let Some(value) = parameter {
                    event["pathParameters"] = json!({ "id": value, "stream": value });
                }
                if let Err(e) = resolve(&event) {
                    refusal(&e)?;
                }
            }

            #[test]
            fn any_query_string_decodes_and_numbers_are_bounded(query in ".{0,200}") {
                let params = query_params(&http("GET", "/x", &query));
                for name in ["limit", "after", "missing"] {
                    match whole_number(&params, name, 20, (1, 100)) {
                        Ok(n) => prop_assert!((1..=100).contains(&n)),
                        Err(e) => refusal(&e)?,
                    }
                }
            }
        }
    }
}
