//! Authorization on the HTTP API, end to end: the template's JWT authorizer served by the local
//! HTTP API against a local OIDC issuer (its JWKS fetched over HTTP, as API Gateway does), the
//! real place-order and query-api binaries behind it. Every route is called with no token, an
//! expired one, one from another issuer, one for another audience, a forged one, another
//! customer's, a customer's on the operator routes, and the right one.

use std::collections::BTreeMap;

use local_env::issuer::{Issuer, TokenRequest};
use serde_json::{Value, json};
use shared::domain::{Currency, Money};
use shared::eventstore::{EventStore, NewEvent, StreamId};
use shared::readmodel::{CustomerOrder, OrderView, TimelineEntry, ViewStatus, customer_order_key, order_key};
use system_tests::http::{ApiEnv, HttpResponse, Json, issuer, request_as};
use system_tests::unique;

/// An order of `customer`'s, as the projections would have written its views, and a stream with
/// events for the operator routes.
struct Seeded {
    customer: String,
    order_id: String,
    stream: String,
}

async fn seed(env: &ApiEnv) -> Seeded {
    let customer = unique("cust-auth-");
    let order_id = unique("ord-auth-");
    let view = OrderView {
        order_id: order_id.clone(),
        customer_id: customer.clone(),
        status: ViewStatus::Placed,
        lines: serde_json::from_value(json!([{ "sku": "SKU-RED-MUG", "quantity": 1, "unitPriceMinor": 1250 }]))
            .expect("lines"),
        total: Some(Money::new(1250, Currency::EUR)),
        payment_id: None,
        refund_id: None,
        shipment_id: None,
        carrier: None,
        cancellation_reason: None,
        failed_step: None,
        failed_actions: vec![],
        payment_pending_until: None,
        refund_pending_until: None,
        placed_at: "2026-11-23T10:00:00Z".into(),
        updated_at: "2026-11-23T10:00:00Z".into(),
        timeline: vec![TimelineEntry {
            at: "2026-11-23T10:00:00Z".into(),
            event: "OrderPlaced".into(),
            stream: format!("Order-{order_id}"),
            version: 1,
        }],
        versions: BTreeMap::from([(format!("Order-{order_id}"), 1)]),
    };
    env.put_model(order_key(&order_id), &view).await;
    let listed = CustomerOrder {
        order_id: order_id.clone(),
        customer_id: customer.clone(),
        status: ViewStatus::Placed,
        total: Some(Money::new(1250, Currency::EUR)),
        placed_at: "2026-11-23T10:00:00Z".into(),
        gsi1pk: Some(format!("CUSTOMER#{customer}")),
        gsi1sk: Some(format!("2026-11-23T10:00:00Z#{order_id}")),
        versions: BTreeMap::from([(format!("Order-{order_id}"), 1)]),
    };
    env.put_model(customer_order_key(&order_id), &listed).await;
    let stream = StreamId::new("Order", &order_id).expect("stream id");
    let placed = NewEvent::new("TestHappened", 1, json!({ "note": "seeded by the authorization test" }));
    env.store.append(&stream, 0, vec![placed], None).await.expect("append");
    Seeded { customer, order_id, stream: stream.to_string() }
}

/// A token of this binary's issuer saying `request`.
fn bearer(request: &TokenRequest) -> String {
    format!("Bearer {}", issuer().token(request))
}

/// A 401 or 403 as API Gateway answers it: `{"message": …}`, the reason in `www-authenticate`.
fn assert_refused(response: &HttpResponse, status: u16, reason: &str, what: &str) {
    assert_eq!(response.status, status, "{what}: {}", response.body);
    let message = if status == 401 { "Unauthorized" } else { "Forbidden" };
    assert_eq!(response.json(), json!({ "message": message }), "{what}");
    let challenge = response.header("www-authenticate").unwrap_or_default();
    assert!(challenge.contains(reason), "{what}: www-authenticate {challenge:?} should say {reason:?}");
}

fn order_body(order_id: &str, customer: Option<&str>) -> String {
    let mut order = json!({
        "orderId": order_id,
        "currency": "EUR",
        "lines": [{ "sku": "SKU-RED-MUG", "quantity": 1, "unitPriceMinor": 1250 }],
        "paymentToken": "tok_visa",
        "shippingAddress": { "name": "Ada", "line1": "1 Main St", "city": "London", "postalCode": "10115", "country": "GB" },
    });
    if let Some(customer) = customer {
        order["customerId"] = json!(customer);
    }
    order.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_do_not_verify_are_refused_on_every_route_before_any_function_runs() {
    // Given the API, an order of a customer's, and tokens that are each wrong in one way
    let env = ApiEnv::start().await;
    let seeded = seed(&env).await;
    let other_issuer = Issuer::start(([127, 0, 0, 1], 0).into()).await.expect("another issuer");
    let right = TokenRequest::operator(&seeded.customer);
    let expired = bearer(&TokenRequest { lifetime_seconds: -60, ..right.clone() });
    let foreign = format!("Bearer {}", other_issuer.token(&right));
    let elsewhere = bearer(&TokenRequest { audience: "another-api".into(), ..right.clone() });
    let valid = bearer(&right);
    let (head, rest) = valid.split_once('.').expect("a JWT");
    let (claims, _) = rest.split_once('.').expect("a JWT");
    let forged = format!("{head}.{claims}.c2lnbmF0dXJl");
    let cases: [(Option<&str>, &str, &str); 6] = [
        (None, "no token", "no token"),
        (Some("Bearer not.a.jwt"), "garbage", "malformed"),
        (Some(expired.as_str()), "expired", "expired"),
        (Some(foreign.as_str()), "another issuer's", "not the issuer's"),
        (Some(elsewhere.as_str()), "for another audience", "audience"),
        (Some(forged.as_str()), "forged", "signature"),
    ];
    let order_id = unique("ord-refused-");
    let routes = [
        ("POST", "/orders".to_owned(), Some(order_body(&order_id, Some(&seeded.customer)))),
        ("GET", format!("/orders/{}", seeded.order_id), None),
        ("GET", format!("/customers/{}/orders", seeded.customer), None),
        ("GET", format!("/streams/{}/events", seeded.stream), None),
        ("GET", format!("/streams/{}/lag", seeded.stream), None),
    ];
    let invocations = || env.service.stats().iter().map(|s| s.invocations).sum::<u64>();
    let before = invocations();

    for (method, target, body) in &routes {
        for (token, what, reason) in cases {
            // When the route is called with it
            let response = request_as(env.addr(), method, target, token, body.as_deref()).await;
            // Then it is a 401 saying why
            assert_refused(&response, 401, reason, &format!("{method} {target} with {what} token"));
        }
    }

    // And no function ran for any of them, and nothing was written
    assert_eq!(invocations(), before);
    let stream = StreamId::new("Order", &order_id).expect("stream id");
    assert_eq!(env.store.head_version(&stream).await.expect("head"), 0, "a refused order was written");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_act_only_as_themselves_and_operators_routes_need_the_scope() {
    // Given the API and an order of a customer's
    let env = ApiEnv::start().await;
    let seeded = seed(&env).await;
    let mine = issuer().customer_bearer(&seeded.customer);
    let someone = unique("cust-other-");
    let theirs = issuer().customer_bearer(&someone);
    let operator = issuer().operator_bearer();

    // Then the customer reads their order and their listing
    let view = env.get_as(&format!("/orders/{}", seeded.order_id), Some(&mine)).await;
    assert_eq!(view.status, 200, "{}", view.body);
    assert_eq!(view.json()["customerId"], seeded.customer.as_str());
    let listing = env.get_as(&format!("/customers/{}/orders", seeded.customer), Some(&mine)).await;
    assert_eq!(listing.status, 200, "{}", listing.body);
    assert_eq!(listing.json()["items"][0]["orderId"], seeded.order_id.as_str());

    // And another customer finds neither: 404 as for what does not exist, so ids cannot be probed
    let probed = env.get_as(&format!("/orders/{}", seeded.order_id), Some(&theirs)).await;
    let missing = env.get_as(&format!("/orders/{}", unique("ord-none-")), Some(&theirs)).await;
    assert_eq!(probed.status, 404, "{}", probed.body);
    assert_eq!(missing.status, 404, "{}", missing.body);
    assert!(!probed.body.contains(&seeded.customer), "the 404 names the owner: {}", probed.body);
    let listed = env.get_as(&format!("/customers/{}/orders", seeded.customer), Some(&theirs)).await;
    assert_eq!(listed.status, 404, "{}", listed.body);

    // And a customer's token on the operator routes is a 403 from the authorizer
    for route in ["events", "lag"] {
        let target = format!("/streams/{}/{route}", seeded.stream);
        let refused = env.get_as(&target, Some(&mine)).await;
        assert_refused(&refused, 403, "scope", &format!("a customer's token on {target}"));
        // While the operator reads them, and any customer's order
        let read = env.get_as(&target, Some(&operator)).await;
        assert_eq!(read.status, 200, "{target}: {}", read.body);
    }
    assert_eq!(env.get_as(&format!("/orders/{}", seeded.order_id), Some(&operator)).await.status, 200);

    // When a customer places an order naming another customer
    let impostor = unique("ord-impostor-");
    let body = order_body(&impostor, Some(&seeded.customer));
    let refused = request_as(env.addr(), "POST", "/orders", Some(&theirs), Some(&body)).await;
    // Then it is a 403 saying why, and nothing is written
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.json()["error"].as_str().is_some_and(|e| e.contains("your own")), "{}", refused.body);
    let stream = StreamId::new("Order", &impostor).expect("stream id");
    assert_eq!(env.store.head_version(&stream).await.expect("head"), 0);

    // When they place one without naming anyone, or naming themselves
    for (named, order_id) in [(None, unique("ord-own-")), (Some(someone.as_str()), unique("ord-named-"))] {
        let body = order_body(&order_id, named);
        let placed = request_as(env.addr(), "POST", "/orders", Some(&theirs), Some(&body)).await;
        // Then it is placed as theirs
        assert_eq!(placed.status, 201, "{}", placed.body);
        let stream = StreamId::new("Order", &order_id).expect("stream id");
        let events = env.store.load(&stream, 0).await.expect("load");
        assert_eq!(events[0].payload["customerId"], Value::from(someone.as_str()), "{:?}", events[0].payload);
    }
    env.stop().await;
}
