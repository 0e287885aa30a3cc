//! Rate limiting per customer at `POST /orders`: over the template's `OrdersPerCustomerPerMinute`,
//! an order gets `429` with a `Retry-After` and is not written; other customers, and a repeat of
//! an order already placed, are not affected. The real place-order binary, its counters in the
//! stack's commands table, behind the local HTTP API.

use serde_json::Value;
use system_tests::saga::SagaEnv;
use system_tests::unique;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_over_the_limit_gets_429_with_retry_after_and_nothing_is_written() {
    // Given the system running with a limit of 3 orders per customer a minute, its HTTP API
    // served as API Gateway would
    let env = SagaEnv::start_with_parameters(&[("OrdersPerCustomerPerMinute", "3")]).await;
    let customer = unique("cust-");
    let order_of = |customer: &str| {
        let mut order = env.sample("happy-path");
        order["customerId"] = Value::from(customer);
        order
    };
    let addr = env.api();
    // Each order sent by its customer's client, signed in as them.
    let post = |order: Value, key: String| {
        let bearer = env.customer_bearer(order["customerId"].as_str().unwrap_or_default());
        async move {
            let headers = [("Idempotency-Key", key.as_str()), ("Authorization", bearer.as_str())];
            let body = order.to_string();
            system_tests::http::request_with_headers(addr, "POST", "/orders", &headers, Some(&body)).await
        }
    };

    // When the customer places 3 orders
    let mut placed = Vec::new();
    for _ in 0..3 {
        let order = order_of(&customer);
        let key = unique("key-");
        let response = post(order.clone(), key.clone()).await;
        // Then each is accepted
        assert_eq!(response.status, 201, "{}", response.body);
        placed.push((order, key));
    }

    // When they place a fourth within the minute
    let fourth = order_of(&customer);
    let fourth_id = fourth["orderId"].as_str().expect("orderId").to_owned();
    let response = post(fourth, unique("key-")).await;

    // Then it is refused with 429, a Retry-After in seconds and a JSON error saying the same
    assert_eq!(response.status, 429, "{}", response.body);
    let retry_after: u64 = response.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!((1..=120).contains(&retry_after), "Retry-After: {retry_after}");
    let body = response.body_json().expect("JSON body");
    assert_eq!(body["retryAfterSeconds"], retry_after, "{body}");
    assert!(body["error"].is_string(), "{body}");
    // And nothing was written for it
    assert!(env.events("Order", &fourth_id).await.is_empty(), "the refused order is in the store");

    // And a repeat of an order already placed (same Idempotency-Key) is answered, not refused
    let (first, key) = placed.swap_remove(0);
    let response = post(first, key).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.body_json().expect("JSON body")["duplicate"], true);

    // And another customer is still accepted
    let response = post(order_of(&unique("cust-")), unique("key-")).await;
    assert_eq!(response.status, 201, "{}", response.body);

    env.stop().await;
}
