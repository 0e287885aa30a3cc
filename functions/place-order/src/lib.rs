//! Place order: validates an order and appends `OrderPlaced`, idempotently (the client's
//! `Idempotency-Key`, else the order id). It does not start the saga: the saga starter reads
//! the committed event from the store's stream, so there is no dual write.
//!
//! The way in is the HTTP API (payload 2.0, `POST /orders`): an axum [`router`], run by
//! lambda_http. Clients, the local demo and the system tests alike place orders there.
//!
//! Each customer may place at most `ORDERS_PER_CUSTOMER_PER_MINUTE` orders over a sliding minute
//! (`shared::ratelimit`; unset or 0: no limit): over it, the order is refused with `429` and a
//! `Retry-After` before anything is written. Only new orders count, and a repeat of an order
//! already placed is answered whatever the limit. The HTTP API's stage throttling stays the
//! global limit, in front of this one.
//!
//! What a request may be (each violation a JSON error naming the limit, nothing written): a body
//! of at most [`MAX_BODY_BYTES`] (`413`), sent as JSON (`Content-Type: application/json` or
//! `…+json`, else `415`); an `Idempotency-Key` of 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] printable
//! ASCII characters (`400`: an empty key would be one key shared by every client). The order's
//! own limits (lines, ids, amounts) are the domain's validation (`400`, per field).
//!
//! Over HTTP the order is placed as the caller the API's JWT authorizer verified
//! ([`shared::auth`]): the customer is the token's subject. A body may leave `customerId` out
//! or name that customer; naming another is `403`; a request with no verified caller is `401`.
//!
//! The order's flow is correlated from here: the caller's `X-Correlation-Id` (else the API's
//! request id, else the invocation's) and the invocation's X-Ray trace go on `OrderPlaced`, and
//! from there on every event and log line of the saga. The answer repeats the correlation id.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::{HeaderName, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use lambda_http::RequestExt;
use lambda_http::request::RequestContext;
use serde::Serialize;
use serde_json::{Value, json};
use shared::aggregate::{CommandContext, ExecuteError, Executed, Repository};
use shared::auth::{AuthError, Caller};
use shared::domain::FieldError;
use shared::domain::order::{Order, OrderCommand, OrderError, OrderRequest};
use shared::eventstore::{AppendError, EventStore};
use shared::ratelimit::{Admission, RateLimiter, Slot, WindowCounters};

/// The answer to a placed order (`201`, or `200` for a repeat).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Placed {
    pub order_id: String,
    pub status: &'static str,
    pub version: u64,
    /// The request repeated an earlier one (same idempotency key): nothing new was written.
    pub duplicate: bool,
    /// What ties this request to the saga's events and log lines.
    pub correlation_id: String,
}

/// The largest body `POST /orders` reads: an order of the most lines with the longest fields
/// fits many times over.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The longest `Idempotency-Key` (it becomes part of a DynamoDB key).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    #[error("the body is not an order: {0}")]
    Malformed(String),
    /// Not sent as JSON.
    #[error("send the order as application/json, not {0:?}")]
    UnsupportedMediaType(String),
    #[error("the body is {0} bytes: at most {MAX_BODY_BYTES}")]
    TooLarge(usize),
    /// The request itself is unusable (its idempotency key, say): the reason names the limit.
    #[error("{0}")]
    BadRequest(String),
    #[error("the order is invalid")]
    Invalid(Vec<FieldError>),
    /// No verified caller: the route is not behind the HTTP API's authorizer.
    #[error("{0}")]
    Unauthenticated(#[from] AuthError),
    /// The caller may not do this (place an order in another customer's name).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("too many orders from this customer: retry in {retry_after_seconds} s")]
    RateLimited { retry_after_seconds: u64 },
    #[error("the store is unavailable; retry")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl PlaceError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) | Self::Invalid(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body: field errors for invalid input; no internal detail ever.
    pub fn body(&self) -> Value {
        match self {
            Self::Invalid(errors) => json!({
                "error": "validation failed",
                "details": errors.iter().map(|e| json!({ "field": e.field, "message": e.message })).collect::<Vec<_>>(),
            }),
            Self::Internal(_) => json!({ "error": "internal error" }),
            Self::RateLimited { retry_after_seconds } => {
                json!({ "error": self.to_string(), "retryAfterSeconds": retry_after_seconds })
            }
            other => json!({ "error": other.to_string() }),
        }
    }
}

/// Where an order's flow is correlated and traced from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    pub correlation_id: String,
    pub trace_header: Option<String>,
}

/// The caller's `X-Correlation-Id` if it is usable, else API Gateway's request id, else the
/// invocation's; the invocation's X-Ray trace (`Lambda-Runtime-Trace-Id`), else the request's.
impl<T: Sync> FromRequestParts<T> for Flow {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &T) -> Result<Self, Infallible> {
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let invocation = parts.extensions.lambda_context_ref();
        let request_id = match parts.extensions.request_context_ref() {
            Some(RequestContext::ApiGatewayV2(context)) => context.request_id.clone(),
            _ => None,
        };
        let correlation_id = header("x-correlation-id").filter(|id| acceptable_correlation_id(id));
        let correlation_id = correlation_id.or(request_id).or_else(|| invocation.map(|i| i.request_id.clone()));
        let trace_header = invocation.and_then(|i| i.xray_trace_id.clone()).or_else(|| header("x-amzn-trace-id"));
        Ok(Self { correlation_id: correlation_id.unwrap_or_default(), trace_header })
    }
}

/// A correlation id a caller may choose: short, and safe in a header, a log line and a query.
fn acceptable_correlation_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
}

/// A decoding error for the caller, cut short: serde quotes the offending value, which may be
/// most of a 64 KB body.
fn malformed(e: serde_json::Error) -> PlaceError {
    // 200 bytes, not characters: a value quoted in serde's message may be 4-byte characters.
    PlaceError::Malformed(shared::text::bounded(&e.to_string(), 200))
}

/// `Idempotency-Key` as given, if usable: none, or 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] printable
/// ASCII characters.
fn checked_idempotency_key(key: Option<&str>) -> Result<Option<&str>, PlaceError> {
    let Some(key) = key else { return Ok(None) };
    let refuse = |why: String| Err(PlaceError::BadRequest(format!("Idempotency-Key {why}")));
    if key.trim().is_empty() {
        return refuse("is empty: send a key unique to this order, or none".into());
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return refuse(format!("is {} bytes long: at most {MAX_IDEMPOTENCY_KEY_BYTES}", key.len()));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return refuse("may hold printable ASCII characters only, no spaces".into());
    }
    Ok(Some(key))
}

/// Validates and records the order, within its customer's limit if there is one.
pub async fn place<S: EventStore, C: WindowCounters>(
    repo: &Repository<S>,
    limiter: Option<&RateLimiter<C>>,
    request: &OrderRequest,
    idempotency_key: Option<&str>,
    flow: &Flow,
) -> Result<Placed, PlaceError> {
    use tracing::Instrument;
    let span = shared::telemetry::record_span(shared::telemetry::About {
        order_id: Some(request.order_id.as_str()),
        correlation_id: Some(&flow.correlation_id),
        trace_header: flow.trace_header.as_deref(),
    });
    let idempotency_key = checked_idempotency_key(idempotency_key)?;
    record(repo, limiter, request, idempotency_key, flow).instrument(span).await
}

async fn record<S: EventStore, C: WindowCounters>(
    repo: &Repository<S>,
    limiter: Option<&RateLimiter<C>>,
    request: &OrderRequest,
    idempotency_key: Option<&str>,
    flow: &Flow,
) -> Result<Placed, PlaceError> {
    let order = request.validate().map_err(|errors| {
        tracing::info!(errors = errors.len(), "order rejected as invalid");
        PlaceError::Invalid(errors)
    })?;
    let order_id = order.order_id.to_string();
    let key = format!("PlaceOrder:{}", idempotency_key.unwrap_or(&order_id));
    let correlation_id = flow.correlation_id.clone();
    // The customer's limit, before anything is written.
    let slot = match limiter {
        Some(limiter) => admit(limiter, repo, order.customer_id.as_str(), &key).await?,
        None => None,
    };
    let ctx = CommandContext {
        idempotency_key: Some(key),
        correlation_id: Some(correlation_id.clone()),
        causation_id: Some("PlaceOrder".into()),
        trace_header: flow.trace_header.clone(),
    };
    let executed = repo.execute::<Order>(&order_id, &OrderCommand::Place(order), &ctx).await;
    // Only new orders count: a repeat, a conflict or a failure gives its slot back.
    if let (Some(limiter), Some(slot)) = (limiter, slot)
        && !matches!(executed, Ok(Executed::Appended { .. }))
    {
        limiter.release(slot).await;
    }
    match executed {
        Ok(Executed::Appended { committed, .. }) => {
            tracing::info!("order placed");
            shared::metrics::order_placed();
            Ok(Placed { order_id, status: "Placed", version: committed.last_version, duplicate: false, correlation_id })
        }
        Ok(Executed::Duplicate { committed }) => {
            tracing::info!("order placed before under this key: answered again");
            Ok(Placed { order_id, status: "Placed", version: committed.last_version, duplicate: true, correlation_id })
        }
        // The same order placed again under another key: already there, nothing to do.
        Ok(Executed::Unchanged { version }) => {
            Ok(Placed { order_id, status: "Placed", version, duplicate: true, correlation_id })
        }
        Err(ExecuteError::Rejected(e @ OrderError::AlreadyPlacedDifferently(_))) => {
            Err(PlaceError::Conflict(e.to_string()))
        }
        Err(ExecuteError::Append(AppendError::IdempotencyKeyReused { key, .. })) => {
            Err(PlaceError::Conflict(format!("idempotency key {key:?} was used for another order")))
        }
        Err(e) if e.is_retryable() => Err(PlaceError::Unavailable(e.to_string())),
        Err(e) => Err(PlaceError::Internal(e.to_string())),
    }
}

/// Counts the order against its customer's limit: `Some(slot)` counted, `None` let through
/// uncounted, `Err` refused.
async fn admit<S: EventStore, C: WindowCounters>(
    limiter: &RateLimiter<C>,
    repo: &Repository<S>,
    customer_id: &str,
    idempotency_key: &str,
) -> Result<Option<Slot>, PlaceError> {
    match limiter.acquire(customer_id).await {
        Ok(Admission::Admitted(slot)) => Ok(Some(slot)),
        Ok(Admission::Refused { retry_after }) => {
            // A repeat of an order placed under this key writes nothing and is answered with the
            // original result: a client retrying a lost answer is not refused. Looked up only
            // here, so an order within the limit costs no extra read.
            if let Ok(Some(_)) = repo.store().find_committed(idempotency_key).await {
                tracing::info!("over the customer's rate limit, but a repeat: answered");
                return Ok(None);
            }
            let retry_after_seconds = retry_after.as_secs();
            tracing::info!(retry_after_seconds, "order refused: the customer is over its rate limit");
            shared::metrics::order_rate_limited();
            Err(PlaceError::RateLimited { retry_after_seconds })
        }
        // Fail open. The per-customer limit is fairness between customers, not the system's
        // protection: the HTTP API's stage throttling bounds the total whatever happens here.
        // Refusing every order because the counters cannot be reached (or are slow: the limiter
        // gives up after a second) would turn a fault in an auxiliary check into an outage of
        // the one write that takes orders; letting them through uncounted meanwhile lets a
        // customer exceed their share at worst. And if DynamoDB itself is down, the append
        // that follows fails and answers 503 anyway.
        Err(e) => {
            tracing::warn!(error = %e, "rate limit not checked (counters unavailable): order let through");
            Ok(None)
        }
    }
}

/// What the function works with: the event store, and the orders-per-customer limit if any.
pub struct PlaceOrder<S, C> {
    pub repo: Repository<S>,
    pub limiter: Option<RateLimiter<C>>,
}

const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");

/// `POST /orders` (another method: `405` with `Allow`); every answer JSON, with the flow's
/// `X-Correlation-Id`.
pub fn router<S: EventStore + 'static, C: WindowCounters + 'static>(deps: Arc<PlaceOrder<S, C>>) -> Router {
    let not_allowed = |flow: Flow| async move {
        let headers = [(header::ALLOW, "POST".to_owned()), (CORRELATION_ID, flow.correlation_id)];
        (StatusCode::METHOD_NOT_ALLOWED, headers, Json(json!({ "error": "use POST /orders" })))
    };
    Router::new()
        .route("/orders", post(place_order::<S, C>))
        .method_not_allowed_fallback(not_allowed)
        // The body's limit is checked, and answered, by the handler.
        .layer(DefaultBodyLimit::disable())
        .with_state(deps)
}

async fn place_order<S: EventStore + 'static, C: WindowCounters + 'static>(
    State(deps): State<Arc<PlaceOrder<S, C>>>,
    flow: Flow,
    parts: Parts,
    body: Bytes,
) -> Response {
    let correlated = [(CORRELATION_ID, flow.correlation_id.clone())];
    let accepted = accept(&deps, &flow, &parts, &body).await;
    match accepted {
        Ok(placed) => {
            let status = if placed.duplicate { StatusCode::OK } else { StatusCode::CREATED };
            let location = [(header::LOCATION, format!("/orders/{}", placed.order_id))];
            (status, location, correlated, Json(placed)).into_response()
        }
        Err(e) => (correlated, e).into_response(),
    }
}

/// The request checked (media type, size, caller) and its order placed.
async fn accept<S: EventStore, C: WindowCounters>(
    deps: &PlaceOrder<S, C>,
    flow: &Flow,
    parts: &Parts,
    body: &[u8],
) -> Result<Placed, PlaceError> {
    let header = |name: HeaderName| parts.headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    // A JSON body, or no stated type at all; anything else is not read as an order.
    if let Some(content_type) = header(header::CONTENT_TYPE) {
        let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if media != "application/json" && !(media.starts_with("application/") && media.ends_with("+json")) {
            return Err(PlaceError::UnsupportedMediaType(media));
        }
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(PlaceError::TooLarge(body.len()));
    }
    if body.is_empty() {
        return Err(PlaceError::BadRequest("the body is empty".into()));
    }
    let context = match parts.extensions.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(context)) => Some(context),
        _ => None,
    };
    let order = as_caller(body, &Caller::from_context(context)?)?;
    let key = header(HeaderName::from_static("idempotency-key"));
    place(&deps.repo, deps.limiter.as_ref(), &order, key.as_deref(), flow).await
}

/// The order in the body, placed as the caller: a body without `customerId` is the caller's
/// order; one naming another customer is refused (`403`), so nobody orders in someone else's name.
fn as_caller(body: &[u8], caller: &Caller) -> Result<OrderRequest, PlaceError> {
    let mut order: Value = serde_json::from_slice(body).map_err(malformed)?;
    if let Some(fields) = order.as_object_mut() {
        match fields.get("customerId") {
            None | Some(Value::Null) => {
                fields.insert("customerId".into(), Value::String(caller.subject.clone()));
            }
            Some(Value::String(named)) if *named == caller.subject => {}
            Some(_) => {
                return Err(PlaceError::Forbidden(
                    "customerId must be your own (the token's subject), or left out".into(),
                ));
            }
        }
    }
    serde_json::from_value(order).map_err(malformed)
}

/// The error's status and JSON body (with `Retry-After` when the customer is over its limit);
/// an internal failure is logged, never answered with its detail.
impl IntoResponse for PlaceError {
    fn into_response(self) -> Response {
        if let PlaceError::Internal(detail) | PlaceError::Unavailable(detail) = &self {
            tracing::error!(%detail, "place order failed");
        }
        let retry_after = match self {
            Self::RateLimited { retry_after_seconds } => Some([(header::RETRY_AFTER, retry_after_seconds.to_string())]),
            _ => None,
        };
        (self.status(), retry_after, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests;
