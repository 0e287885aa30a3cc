use serde_json::{Value, json};
use shared::aggregate::Repository;
use shared::eventstore::{EventStore, InMemoryEventStore, StreamId};
use shared::ratelimit::{FakeClock, InMemoryCounters, Limit, RateLimiter};

use super::{Invocation, handle};

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

fn http(order: &Value, idempotency_key: Option<&str>) -> Value {
    let mut headers = json!({ "content-type": "application/json" });
    if let Some(key) = idempotency_key {
        headers["idempotency-key"] = json!(key);
    }
    json!({
        "version": "2.0",
        "headers": headers,
        "requestContext": {
            "requestId": "req-1",
            "http": { "method": "POST", "path": "/orders" },
            "authorizer": { "jwt": { "claims": { "sub": order["customerId"].as_str().unwrap_or("cust-1") }, "scopes": null } },
        },
        "body": order.to_string(),
        "isBase64Encoded": false,
    })
}

struct Fixture {
    repo: Repository<InMemoryEventStore>,
    limiter: RateLimiter<InMemoryCounters>,
}

impl Fixture {
    /// Three orders a minute per customer.
    fn new() -> Self {
        let limit = Limit::per_minute(3).expect("a limit");
        let limiter = RateLimiter::new(InMemoryCounters::new(), limit).with_clock(FakeClock::at_ms(NOW_MS));
        Self { repo: Repository::new(InMemoryEventStore::new()), limiter }
    }

    async fn send(&self, event: Value) -> Value {
        handle(&self.repo, Some(&self.limiter), event, &Invocation::default()).await
    }

    async fn events(&self, order_id: &str) -> usize {
        let stream = StreamId::new("Order", order_id).expect("stream id");
        self.repo.store().load(&stream, 0).await.expect("load").len()
    }

    fn counted(&self, customer: &str) -> i64 {
        self.limiter.counters().value(customer, NOW_MS / 1000 / 60 * 60)
    }
}

#[tokio::test]
async fn an_order_over_the_customers_limit_is_refused_with_retry_after_and_not_written() {
    // Given a customer who placed 3 orders this minute, the limit
    let f = Fixture::new();
    for i in 0..3 {
        let answer = f.send(http(&order(&format!("ord-{i}"), "cust-1"), None)).await;
        assert_eq!(answer["statusCode"], 201, "{answer}");
    }

    // When they place a fourth
    let answer = f.send(http(&order("ord-3", "cust-1"), None)).await;

    // Then it is refused with 429, told when to retry (20 s into the next minute), nothing written
    assert_eq!(answer["statusCode"], 429, "{answer}");
    assert_eq!(answer["headers"]["retry-after"], "70");
    let body: Value = serde_json::from_str(answer["body"].as_str().expect("body")).expect("JSON body");
    assert_eq!(body["retryAfterSeconds"], 70);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("too many orders")), "{body}");
    assert_eq!(f.events("ord-3").await, 0);
    assert_eq!(f.counted("cust-1"), 3, "a refusal does not count");

    // And another customer's order is accepted
    let answer = f.send(http(&order("ord-other", "cust-2"), None)).await;
    assert_eq!(answer["statusCode"], 201, "{answer}");
}

#[tokio::test]
async fn a_repeat_is_answered_over_the_limit_and_does_not_count() {
    // Given a customer's first order
    let f = Fixture::new();
    let first = http(&order("ord-0", "cust-1"), Some("key-0"));
    assert_eq!(f.send(first.clone()).await["statusCode"], 201);

    // When the client repeats it (a lost answer), then it is answered, and not counted
    assert_eq!(f.send(first.clone()).await["statusCode"], 200);
    assert_eq!(f.counted("cust-1"), 1);

    // And once the customer is at the limit, a repeat is still answered, not refused
    for i in 1..3 {
        assert_eq!(f.send(http(&order(&format!("ord-{i}"), "cust-1"), None)).await["statusCode"], 201);
    }
    let answer = f.send(first).await;
    assert_eq!(answer["statusCode"], 200, "{answer}");
    assert_eq!(f.events("ord-0").await, 1);
    assert_eq!(f.counted("cust-1"), 3);
}

#[tokio::test]
async fn a_direct_invocation_over_the_limit_gets_an_error_with_retry_after_seconds() {
    // Given a customer at the limit
    let f = Fixture::new();
    for i in 0..3 {
        let answer = f.send(order(&format!("ord-{i}"), "cust-1")).await;
        assert_eq!(answer["status"], "Placed", "{answer}");
    }

    // When another order is invoked directly, then the answer says when to retry
    let answer = f.send(json!({ "order": order("ord-3", "cust-1"), "idempotencyKey": "k-3" })).await;
    assert_eq!(answer["retryAfterSeconds"], 70, "{answer}");
    assert!(answer["error"].is_string(), "{answer}");
    assert_eq!(f.events("ord-3").await, 0);
}

#[tokio::test]
async fn orders_are_let_through_when_the_limiter_is_unavailable() {
    // Given the limiter's counters unreachable
    let f = Fixture::new();
    f.limiter.counters().fail(true);

    // When a customer places more orders than the limit, then every one is placed (fail open)
    for i in 0..4 {
        let answer = f.send(http(&order(&format!("ord-{i}"), "cust-1"), None)).await;
        assert_eq!(answer["statusCode"], 201, "{answer}");
    }
}

#[tokio::test]
async fn no_limiter_no_limit() {
    // Given no limit configured (ORDERS_PER_CUSTOMER_PER_MINUTE unset or 0)
    let repo = Repository::new(InMemoryEventStore::new());
    let none: Option<&RateLimiter<InMemoryCounters>> = None;

    // When a customer places many orders, then all are placed
    for i in 0..10 {
        let event = http(&order(&format!("ord-{i}"), "cust-1"), None);
        let answer = handle(&repo, none, event, &Invocation::default()).await;
        assert_eq!(answer["statusCode"], 201, "{answer}");
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
        assert_eq!(answer["statusCode"], 400, "{key:?}: {answer}");
        let body: Value = serde_json::from_str(answer["body"].as_str().expect("body")).expect("a JSON body");
        assert!(body["error"].as_str().is_some_and(|e| e.starts_with("Idempotency-Key") && e.contains(says)), "{body}");
        assert_eq!(fixture.events(&id).await, 0);
    }
    // And the longest key allowed is used as given
    let at_limit = "k".repeat(255);
    let answer = fixture.send(http(&order("ord-key-ok", "cust-k"), Some(&at_limit))).await;
    assert_eq!(answer["statusCode"], 201, "{answer}");
    // And a direct invocation is held to the same rule
    let direct = json!({ "order": order("ord-key-direct", "cust-k"), "idempotencyKey": "" });
    let answer = fixture.send(direct).await;
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("is empty")), "{answer}");
    assert_eq!(fixture.events("ord-key-direct").await, 0);
}

#[tokio::test]
async fn a_body_that_is_not_json_or_too_large_is_refused_before_it_is_read() {
    let fixture = Fixture::new();
    // Given a valid order sent as text/plain
    let mut plain = http(&order("ord-plain", "cust-c"), None);
    plain["headers"]["content-type"] = json!("text/plain");
    // When it is sent, then it is a 415 saying what to send, and nothing is written
    let answer = fixture.send(plain).await;
    assert_eq!(answer["statusCode"], 415, "{answer}");
    assert!(answer["body"].as_str().is_some_and(|b| b.contains("application/json")), "{answer}");
    assert_eq!(fixture.events("ord-plain").await, 0);

    // Given JSON with a charset, or a +json type: accepted
    for (i, content_type) in ["application/json; charset=utf-8", "application/vnd.order+json"].into_iter().enumerate() {
        let mut typed = http(&order(&format!("ord-typed-{i}"), "cust-c"), None);
        typed["headers"]["content-type"] = json!(content_type);
        assert_eq!(fixture.send(typed).await["statusCode"], 201, "{content_type}");
    }

    // Given a body over 64 KB (an order padded with a long field)
    let mut padded = order("ord-big", "cust-c");
    padded["note"] = json!("x".repeat(super::MAX_BODY_BYTES));
    // Then it is a 413 naming the limit
    let answer = fixture.send(http(&padded, None)).await;
    assert_eq!(answer["statusCode"], 413, "{answer}");
    assert!(answer["body"].as_str().is_some_and(|b| b.contains("at most 65536")), "{answer}");
    assert_eq!(fixture.events("ord-big").await, 0);
}

#[tokio::test]
async fn an_order_is_placed_as_the_verified_caller_only() {
    let fixture = Fixture::new();
    // Given a request with no verified caller (not behind the authorizer)
    let mut anonymous = http(&order("ord-anon", "cust-a"), None);
    anonymous["requestContext"].as_object_mut().unwrap().remove("authorizer");
    // Then it is a 401 and nothing is written
    let answer = fixture.send(anonymous).await;
    assert_eq!(answer["statusCode"], 401, "{answer}");
    assert_eq!(fixture.events("ord-anon").await, 0);

    // Given cust-a's token and a body naming cust-b
    let mut impostor = http(&order("ord-impostor", "cust-b"), None);
    impostor["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = json!("cust-a");
    // Then it is a 403 saying why, and nothing is written
    let answer = fixture.send(impostor).await;
    assert_eq!(answer["statusCode"], 403, "{answer}");
    assert!(answer["body"].as_str().is_some_and(|b| b.contains("your own")), "{answer}");
    assert_eq!(fixture.events("ord-impostor").await, 0);
    assert_eq!(fixture.counted("cust-b"), 0, "a refused order does not count against anyone");

    // Given a body without customerId: it is the caller's order
    let mut unnamed = order("ord-unnamed", "cust-a");
    unnamed.as_object_mut().unwrap().remove("customerId");
    let mut request = http(&unnamed, None);
    request["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = json!("cust-a");
    let answer = fixture.send(request).await;
    assert_eq!(answer["statusCode"], 201, "{answer}");
    assert_eq!(fixture.counted("cust-a"), 1, "counted against the caller");
    let stream = StreamId::new("Order", "ord-unnamed").expect("stream id");
    let placed = fixture.repo.store().load(&stream, 0).await.expect("load");
    assert_eq!(placed[0].payload["customerId"], "cust-a", "{:?}", placed[0].payload);
}

/// Arbitrary input at both ways in: never a panic; always a JSON answer with a status the API
/// documents, a short error naming what is wrong, and nothing written for a refusal.
mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::{Fixture, http, order};

    /// Any JSON, with the order's own field names among the keys so that decoding goes deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            ".{0,40}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 48, 6, |inner| {
            let key = prop_oneof![
                Just("orderId".to_owned()),
                Just("customerId".to_owned()),
                Just("currency".to_owned()),
                Just("lines".to_owned()),
                Just("sku".to_owned()),
                Just("quantity".to_owned()),
                Just("unitPriceMinor".to_owned()),
                Just("order".to_owned()),
                Just("idempotencyKey".to_owned()),
                "[a-zA-Z]{0,10}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
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

    fn check_http_answer(answer: &Value) -> Result<(), TestCaseError> {
        let status = answer["statusCode"].as_u64().unwrap_or_default();
        prop_assert!([200, 201, 400, 403, 405, 409, 413, 415].contains(&status), "status {status}: {answer}");
        prop_assert_eq!(&answer["headers"]["content-type"], "application/json");
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap_or_default())
            .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {answer}")))?;
        if status >= 400 {
            let error = body["error"].as_str().unwrap_or_default();
            prop_assert!(!error.is_empty() && error.len() <= 400, "error {error:?}");
            prop_assert!(error != "internal error", "{answer}");
        } else {
            prop_assert!(body["orderId"].is_string(), "{body}");
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_http_body_is_answered_with_json_and_a_documented_status(body in ".{0,300}", key in proptest::option::of(".{0,300}")) {
            let fixture = Fixture::new();
            let mut event = http(&json!(null), key.as_deref());
            event["body"] = json!(body);
            let answer = block_on(fixture.send(event));
            check_http_answer(&answer)?;
        }

        #[test]
        fn any_damaged_order_is_placed_or_refused_with_a_reason_and_nothing_written(order in damaged_order()) {
            let fixture = Fixture::new();
            let answer = block_on(fixture.send(http(&order, None)));
            check_http_answer(&answer)?;
            if answer["statusCode"].as_u64().unwrap_or_default() >= 400 {
                prop_assert_eq!(block_on(fixture.events("ord-prop")), 0);
            }
        }

        #[test]
        fn any_http_request_shape_is_answered(method in "[A-Z]{0,8}", headers in any_json(), base64 in any::<bool>()) {
            let fixture = Fixture::new();
            let mut event = http(&order("ord-shape", "cust-shape"), None);
            event["requestContext"]["http"]["method"] = json!(method);
            event["headers"] = headers;
            event["isBase64Encoded"] = json!(base64);
            let answer = block_on(fixture.send(event));
            check_http_answer(&answer)?;
        }

        #[test]
        fn any_direct_invocation_gets_an_order_or_an_error(event in any_json()) {
            prop_assume!(event.get("requestContext").is_none());
            let fixture = Fixture::new();
            let answer = block_on(fixture.send(event));
            let error = answer["error"].as_str();
            prop_assert!(answer["orderId"].is_string() || error.is_some_and(|e| !e.is_empty() && e.len() <= 400), "{answer}");
        }
    }
}
