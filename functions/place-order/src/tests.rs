use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use lambda_http::aws_lambda_events::apigw::ApiGatewayV2httpRequestContext;
use lambda_http::request::RequestContext;
use serde_json::{Value, json};
use shared::aggregate::Repository;
use shared::eventstore::{EventStore, InMemoryEventStore, StreamId};
use shared::ratelimit::{FakeClock, InMemoryCounters, Limit, RateLimiter};
use tower::ServiceExt;

use super::{PlaceOrder, router};

/// 2024-01-01T00:00:00Z plus 10 s: 50 s left in the minute's window.
const NOW_MS: u64 = 1_704_067_210_000;

fn order(id: &str, customer: &str) -> Value {
    json!({
        "orderId": id,
        "customerId": customer,
        "currency": "EUR",
        "lines": [{ "sku": "SKU-RED-MUG", "quantity": 2, "unitPriceMinor": 1250 }],
        "paymentToken": "tok_visa",
        "shippingAddress": { "name": "Ada", "line1": "1 Main St", "city": "London", "postalCode": "10115", "country": "GB" }
    })
}

/// `method /orders` as lambda_http hands it over: the payload 2.0 request context in its
/// extensions, with the subject the authorizer verified (none: no authorizer).
fn request(method: &str, subject: Option<&str>, headers: &[(&str, &str)], body: String) -> Request<Body> {
    let mut context = json!({ "requestId": "req-1", "http": { "method": method, "path": "/orders" } });
    if let Some(subject) = subject {
        context["authorizer"] = json!({ "jwt": { "claims": { "sub": subject }, "scopes": null } });
    }
    let context: ApiGatewayV2httpRequestContext = serde_json::from_value(context).expect("a request context");
    let mut request = Request::builder().method(method).uri("/orders").extension(RequestContext::ApiGatewayV2(context));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body)).expect("a request")
}

/// `POST /orders` with the order as JSON, as its customer (the body's `customerId`).
fn http(order: &Value, idempotency_key: Option<&str>) -> Request<Body> {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(idempotency_key.map(|key| ("idempotency-key", key)));
    request("POST", Some(order["customerId"].as_str().unwrap_or("cust-1")), &headers, order.to_string())
}

/// What the router answered.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn answer<S: EventStore + 'static>(deps: Arc<PlaceOrder<S, InMemoryCounters>>, request: Request<Body>) -> Answer {
    let response = router(deps).oneshot(request).await.expect("an answer");
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("a body");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {bytes:?}"));
    Answer { status, headers, body }
}

struct Fixture {
    deps: Arc<PlaceOrder<InMemoryEventStore, InMemoryCounters>>,
}

impl Fixture {
    /// Three orders a minute per customer.
    fn new() -> Self {
        let limit = Limit::per_minute(3).expect("a limit");
        let limiter = RateLimiter::new(InMemoryCounters::new(), limit).with_clock(FakeClock::at_ms(NOW_MS));
        Self { deps: Arc::new(PlaceOrder { repo: Repository::new(InMemoryEventStore::new()), limiter: Some(limiter) }) }
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        answer(self.deps.clone(), request).await
    }

    async fn events(&self, order_id: &str) -> usize {
        let stream = StreamId::new("Order", order_id).expect("stream id");
        self.deps.repo.store().load(&stream, 0).await.expect("load").len()
    }

    fn counted(&self, customer: &str) -> i64 {
        self.deps.limiter.as_ref().expect("a limiter").counters().value(customer, NOW_MS / 1000 / 60 * 60)
    }
}

#[tokio::test]
async fn an_order_over_the_customers_limit_is_refused_with_retry_after_and_not_written() {
    // Given a customer who placed 3 orders this minute, the limit
    let f = Fixture::new();
    for i in 0..3 {
        let answer = f.send(http(&order(&format!("ord-{i}"), "cust-1"), None)).await;
        assert_eq!(answer.status, 201, "{answer:?}");
    }

    // When they place a fourth
    let answer = f.send(http(&order("ord-3", "cust-1"), None)).await;

    // Then it is refused with 429, told when to retry (20 s into the next minute), nothing written
    assert_eq!(answer.status, 429, "{answer:?}");
    assert_eq!(answer.headers["retry-after"], "70");
    let body = answer.body;
    assert_eq!(body["retryAfterSeconds"], 70);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("too many orders")), "{body}");
    assert_eq!(f.events("ord-3").await, 0);
    assert_eq!(f.counted("cust-1"), 3, "a refusal does not count");

    // And another customer's order is accepted
    let answer = f.send(http(&order("ord-other", "cust-2"), None)).await;
    assert_eq!(answer.status, 201, "{answer:?}");
}

#[tokio::test]
async fn a_repeat_is_answered_over_the_limit_and_does_not_count() {
    // Given a customer's first order
    let f = Fixture::new();
    let first = || http(&order("ord-0", "cust-1"), Some("key-0"));
    assert_eq!(f.send(first()).await.status, 201);

    // When the client repeats it (a lost answer), then it is answered, and not counted
    assert_eq!(f.send(first()).await.status, 200);
    assert_eq!(f.counted("cust-1"), 1);

    // And once the customer is at the limit, a repeat is still answered, not refused
    for i in 1..3 {
        assert_eq!(f.send(http(&order(&format!("ord-{i}"), "cust-1"), None)).await.status, 201);
    }
    let answer = f.send(first()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(f.events("ord-0").await, 1);
    assert_eq!(f.counted("cust-1"), 3);
}

#[tokio::test]
async fn orders_are_let_through_when_the_limiter_is_unavailable() {
    // Given the limiter's counters unreachable
    let f = Fixture::new();
    f.deps.limiter.as_ref().expect("a limiter").counters().fail(true);

    // When a customer places more orders than the limit, then every one is placed (fail open)
    for i in 0..4 {
        let answer = f.send(http(&order(&format!("ord-{i}"), "cust-1"), None)).await;
        assert_eq!(answer.status, 201, "{answer:?}");
    }
}

#[tokio::test]
async fn no_limiter_no_limit() {
    // Given no limit configured (ORDERS_PER_CUSTOMER_PER_MINUTE unset or 0)
    let deps = Arc::new(PlaceOrder { repo: Repository::new(InMemoryEventStore::new()), limiter: None });

    // When a customer places many orders, then all are placed
    for i in 0..10 {
        let answer = answer(deps.clone(), http(&order(&format!("ord-{i}"), "cust-1"), None)).await;
        assert_eq!(answer.status, 201, "{answer:?}");
    }
}

#[tokio::test]
async fn an_unusable_idempotency_key_is_a_400_naming_the_limit_and_nothing_is_written() {
    // Given a system taking orders
    let fixture = Fixture::new();
    let long = "k".repeat(600);
    let huge = "k".repeat(10 * 1024);
    for (key, says) in [
        ("", "is empty"),
        ("  ", "is empty"),
        (&long[..], "at most 255"),
        (&huge[..], "at most 255"),
        ("a key", "printable ASCII"),
    ] {
        // When an order comes with that key
        let id = format!("ord-key-{}", key.len());
        let answer = fixture.send(http(&order(&id, "cust-k"), Some(key))).await;

        // Then it is refused with a 400 that says why, as JSON, and nothing is recorded
        assert_eq!(answer.status, 400, "{key:?}: {answer:?}");
        let body = &answer.body;
        assert!(body["error"].as_str().is_some_and(|e| e.starts_with("Idempotency-Key") && e.contains(says)), "{body}");
        assert_eq!(fixture.events(&id).await, 0);
    }
    // And the longest key allowed is used as given
    let at_limit = "k".repeat(255);
    let answer = fixture.send(http(&order("ord-key-ok", "cust-k"), Some(&at_limit))).await;
    assert_eq!(answer.status, 201, "{answer:?}");
}

#[tokio::test]
async fn a_body_that_is_not_json_or_too_large_is_refused_before_it_is_read() {
    let fixture = Fixture::new();
    // Given a valid order sent as text/plain
    let plain = |content_type| {
        request("POST", Some("cust-c"), &[("content-type", content_type)], order("ord-plain", "cust-c").to_string())
    };
    // When it is sent, then it is a 415 saying what to send, and nothing is written
    let answer = fixture.send(plain("text/plain")).await;
    assert_eq!(answer.status, 415, "{answer:?}");
    assert!(answer.body["error"].as_str().is_some_and(|b| b.contains("application/json")), "{answer:?}");
    assert_eq!(fixture.events("ord-plain").await, 0);

    // Given JSON with a charset, or a +json type: accepted
    for (i, content_type) in ["application/json; charset=utf-8", "application/vnd.order+json"].into_iter().enumerate() {
        let typed = order(&format!("ord-typed-{i}"), "cust-c").to_string();
        let typed = request("POST", Some("cust-c"), &[("content-type", content_type)], typed);
        assert_eq!(fixture.send(typed).await.status, 201, "{content_type}");
    }

    // Given a body over 64 KB (an order padded with a long field)
    let mut padded = order("ord-big", "cust-c");
    padded["note"] = json!("x".repeat(super::MAX_BODY_BYTES));
    // Then it is a 413 naming the limit
    let answer = fixture.send(http(&padded, None)).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.body["error"].as_str().is_some_and(|b| b.contains("at most 65536")), "{answer:?}");
    assert_eq!(fixture.events("ord-big").await, 0);
}

#[tokio::test]
async fn an_order_is_placed_as_the_verified_caller_only() {
    let fixture = Fixture::new();
    // Given a request with no verified caller (not behind the authorizer)
    let anonymous = request("POST", None, &[], order("ord-anon", "cust-a").to_string());
    // Then it is a 401 and nothing is written
    let answer = fixture.send(anonymous).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(fixture.events("ord-anon").await, 0);

    // Given cust-a's token and a body naming cust-b
    let impostor = request("POST", Some("cust-a"), &[], order("ord-impostor", "cust-b").to_string());
    // Then it is a 403 saying why, and nothing is written
    let answer = fixture.send(impostor).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(answer.body["error"].as_str().is_some_and(|b| b.contains("your own")), "{answer:?}");
    assert_eq!(fixture.events("ord-impostor").await, 0);
    assert_eq!(fixture.counted("cust-b"), 0, "a refused order does not count against anyone");

    // Given a body without customerId: it is the caller's order
    let mut unnamed = order("ord-unnamed", "cust-a");
    unnamed.as_object_mut().unwrap().remove("customerId");
    let answer = fixture.send(request("POST", Some("cust-a"), &[], unnamed.to_string())).await;
    assert_eq!(answer.status, 201, "{answer:?}");
    assert_eq!(answer.headers["location"], "/orders/ord-unnamed");
    assert_eq!(answer.headers["x-correlation-id"], "req-1", "API Gateway's request id, as none was sent");
    assert_eq!(fixture.counted("cust-a"), 1, "counted against the caller");
    let stream = StreamId::new("Order", "ord-unnamed").expect("stream id");
    let placed = fixture.deps.repo.store().load(&stream, 0).await.expect("load");
    assert_eq!(placed[0].payload["customerId"], "cust-a", "{:?}", placed[0].payload);
}

#[tokio::test]
async fn another_method_is_a_405_naming_post_in_the_callers_flow() {
    let headers = [("x-correlation-id", "corr-1")];
    let answer = Fixture::new().send(request("GET", Some("cust-1"), &headers, String::new())).await;
    assert_eq!(answer.status, 405, "{answer:?}");
    assert_eq!(answer.headers["allow"], "POST");
    assert_eq!(answer.headers["x-correlation-id"], "corr-1");
}

/// Arbitrary requests: never a panic; always a JSON answer with a status the API
/// documents, a short error naming what is wrong, and nothing written for a refusal.
mod properties {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::{Answer, Fixture, http, order, request};

    /// Any JSON, with the order's own field names among the keys so that decoding goes deep.
    fn any_json() -> impl Strategy<Value = Value> {
        const KEYS: &[&str] = &["orderId", "customerId", "currency", "lines", "sku", "quantity", "unitPriceMinor"];
        shared::testing::json_with_keys(KEYS)
    }

    /// A valid order with one field replaced by anything.
    fn damaged_order() -> impl Strategy<Value = Value> {
        let field = prop::sample::select(vec![
            "orderId",
            "customerId",
            "currency",
            "lines",
            "paymentToken",
            "shippingAddress",
            "unknown",
        ]);
        (field, any_json()).prop_map(|(field, value)| {
            let mut order = order("ord-prop", "cust-prop");
            order[field] = value;
            order
        })
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future)
    }

    fn check_http_answer(answer: &Answer) -> Result<(), TestCaseError> {
        let status = answer.status;
        prop_assert!([200, 201, 400, 403, 405, 409, 413, 415].contains(&status), "status {status}: {answer:?}");
        prop_assert_eq!(&answer.headers["content-type"], "application/json");
        if status >= 400 {
            let error = answer.body["error"].as_str().unwrap_or_default();
            prop_assert!(!error.is_empty() && error.len() <= 400, "error {error:?}");
            prop_assert!(error != "internal error", "{answer:?}");
        } else {
            prop_assert!(answer.body["orderId"].is_string(), "{answer:?}");
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_http_body_is_answered_with_json_and_a_documented_status(body in ".{0,300}", key in proptest::option::of(".{0,300}")) {
            let fixture = Fixture::new();
            // Any key a header can carry.
            let key = key.map(|key| key.replace(|c: char| c.is_control(), "?"));
            let mut headers = vec![("content-type", "application/json")];
            headers.extend(key.as_deref().map(|key| ("idempotency-key", key)));
            let answer = block_on(fixture.send(request("POST", Some("cust-1"), &headers, body)));
            check_http_answer(&answer)?;
        }

        #[test]
        fn any_damaged_order_is_placed_or_refused_with_a_reason_and_nothing_written(order in damaged_order()) {
            let fixture = Fixture::new();
            let answer = block_on(fixture.send(http(&order, None)));
            check_http_answer(&answer)?;
            if answer.status >= 400 {
                prop_assert_eq!(block_on(fixture.events("ord-prop")), 0);
            }
        }

        #[test]
        fn any_http_request_shape_is_answered(
            method in "[A-Z]{1,8}",
            headers in prop::collection::btree_map("(content-type|idempotency-key|x-correlation-id|[a-z-]{1,12})", "[ -~]{0,40}", 0..6),
        ) {
            let fixture = Fixture::new();
            let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let body = order("ord-shape", "cust-shape").to_string();
            let answer = block_on(fixture.send(request(&method, Some("cust-shape"), &headers, body)));
            check_http_answer(&answer)?;
        }
    }
}
