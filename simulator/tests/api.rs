//! The simulator over real HTTP: each test starts its own server on a free port.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use provider_simulator::{Config, Simulator, rules::derived_id, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Client {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
}

impl Client {
    fn new(sim: &Simulator) -> Self {
        Self { http: reqwest::Client::new(), url: sim.url(), api_key: None }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.post_with(&self.http, path, key, body).await.expect("request failed")
    }

    async fn post_with(
        &self,
        http: &reqwest::Client,
        path: &str,
        key: Option<&str>,
        body: Value,
    ) -> reqwest::Result<(StatusCode, Value)> {
        let mut request = http.post(format!("{}{path}", self.url)).json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(api_key) = &self.api_key {
            request = request.bearer_auth(api_key);
        }
        let response = request.send().await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    async fn charge(&self, key: &str, token: &str) -> (StatusCode, Value) {
        let body = json!({"amount": {"amountMinor": 4499, "currency": "EUR"}, "paymentToken": token});
        self.post("/v1/charges", Some(key), body).await
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("control request failed");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn behave(&self, behaviour: Value) -> Value {
        let (status, body) = self.control(reqwest::Method::PUT, "/control/behaviour", Some(behaviour)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn ledger(&self, contains: &str) -> Value {
        let (status, body) =
            self.control(reqwest::Method::GET, &format!("/control/ledger?contains={contains}"), None).await;
        assert_eq!(status, StatusCode::OK);
        body
    }
}

async fn start(config: Config) -> (Simulator, Client) {
    let sim = serve(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await.expect("simulator starts");
    let client = Client::new(&sim);
    (sim, client)
}

fn address(line1: &str, postal_code: &str) -> Value {
    json!({"name": "Ada", "line1": line1, "city": "Berlin", "postalCode": postal_code, "country": "DE"})
}

#[tokio::test]
async fn a_repeated_charge_is_answered_from_the_first_without_a_second_effect() {
    // Given a simulator
    let (sim, client) = start(Config::default()).await;

    // When the same charge is sent twice with one key
    let first = client.charge("order-1:charge", "tok_visa").await;
    let second = client.charge("order-1:charge", "tok_visa").await;

    // Then both get the same answer, with the id derived from the key
    assert_eq!(first.0, StatusCode::CREATED);
    assert_eq!(first.1, json!({"paymentId": derived_id("pay", "order-1:charge"), "status": "charged"}));
    assert_eq!(second, first);
    // And the ledger shows one effect, two calls, one duplicate
    let ledger = client.ledger("order-1").await;
    let entries = ledger["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["service"], "payments");
    assert_eq!(entries[0]["operation"], "charge");
    assert_eq!(entries[0]["idempotencyKey"], "order-1:charge");
    assert_eq!(entries[0]["status"], 201);
    assert_eq!(entries[0]["request"]["paymentToken"], "tok_visa");
    assert_eq!(entries[0]["response"], first.1);
    assert_eq!(ledger["calls"]["charge"], 2);
    assert_eq!(ledger["duplicates"]["charge"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn concurrent_duplicates_take_effect_once() {
    // Given a slow gateway, so that the duplicates overlap
    let (sim, client) = start(Config::default()).await;
    client.behave(json!({"service": "payments", "latencyMs": {"p50": 50, "p99": 60}})).await;

    // When ten calls with one key arrive at once
    let answers = futures::future::join_all((0..10).map(|_| client.charge("race:charge", "tok_visa"))).await;

    // Then all get the one answer, and there was one effect
    assert!(answers.iter().all(|a| *a == answers[0] && a.0 == StatusCode::CREATED), "{answers:?}");
    let ledger = client.ledger("race").await;
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 1);
    assert_eq!(ledger["calls"]["charge"], 10);
    assert_eq!(ledger["duplicates"]["charge"], 9);
    sim.stop().await;
}

#[tokio::test]
async fn a_decline_is_stored_and_repeated() {
    let (sim, client) = start(Config::default()).await;

    // When a declined card is charged twice with one key, and another with low funds
    let first = client.charge("decline:charge", "tok_decline").await;
    let second = client.charge("decline:charge", "tok_decline").await;
    let poor = client.charge("poor:charge", "tok_insufficient_funds").await;

    // Then the decline is answered both times, and recorded once
    assert_eq!(first, (StatusCode::PAYMENT_REQUIRED, json!({"status": "declined", "reason": "card declined"})));
    assert_eq!(second, first);
    assert_eq!(poor, (StatusCode::PAYMENT_REQUIRED, json!({"status": "declined", "reason": "insufficient funds"})));
    let ledger = client.ledger("decline").await;
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 1);
    assert_eq!(ledger["entries"][0]["status"], 402);
    assert_eq!(ledger["duplicates"]["charge"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn a_refund_of_a_refund_fails_charge_is_refused_once_and_for_all() {
    // Given a charge made with the refund-fails token
    let (sim, client) = start(Config::default()).await;
    let (status, charge) = client.charge("rf:charge", "tok_refund_fails").await;
    assert_eq!(status, StatusCode::CREATED);
    let payment_id = charge["paymentId"].as_str().unwrap().to_owned();
    assert_eq!(payment_id, derived_id("payrf", "rf:charge"));

    // When it is refunded, twice with one key
    let refund = json!({"paymentId": payment_id, "amount": {"amountMinor": 4499, "currency": "EUR"}});
    let first = client.post("/v1/refunds", Some("rf:refund"), refund.clone()).await;
    let second = client.post("/v1/refunds", Some("rf:refund"), refund).await;

    // Then both are the same 422 refusal: a business answer, stored for the key like any other
    assert_eq!(first.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(first.1["reason"], format!("refund of {payment_id} refused: the charge is disputed"));
    assert_eq!(second, first);
    let ledger = client.ledger("rf:refund").await;
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 1);
    assert_eq!(ledger["entries"][0]["status"], 422);
    assert_eq!(ledger["calls"]["refund"], 2);
    assert_eq!(ledger["duplicates"]["refund"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn the_other_rules_mirror_the_in_process_simulation() {
    let (sim, client) = start(Config::default()).await;
    let amount = json!({"amountMinor": 4499, "currency": "EUR"});

    let refund = client.post("/v1/refunds", Some("o:refund"), json!({"paymentId": "pay_1", "amount": amount})).await;
    assert_eq!(refund, (StatusCode::CREATED, json!({"refundId": derived_id("ref", "o:refund")})));

    let body = json!({"address": address("Main St 1", "10115"), "items": 3});
    let shipment = client.post("/v1/shipments", Some("o:ship"), body).await;
    let shipment_id = derived_id("shp", "o:ship");
    assert_eq!(shipment, (StatusCode::CREATED, json!({"shipmentId": shipment_id, "carrier": "sim-carrier"})));
    let cancel = client.post(&format!("/v1/shipments/{shipment_id}/cancel"), Some("o:cancel"), json!({})).await;
    assert_eq!(cancel, (StatusCode::OK, json!({"shipmentId": shipment_id, "status": "cancelled"})));

    let body = json!({"address": address("Main St 1", "00000"), "items": 1});
    let rejected = client.post("/v1/shipments", Some("bad:ship"), body).await;
    let reason = "undeliverable address: 00000";
    assert_eq!(rejected, (StatusCode::UNPROCESSABLE_ENTITY, json!({"status": "rejected", "reason": reason})));

    let body = json!({"address": address("CANCEL-FAILS", "10115"), "items": 1});
    let (_, stuck) = client.post("/v1/shipments", Some("cf:ship"), body).await;
    assert_eq!(stuck["shipmentId"], derived_id("shpcf", "cf:ship"));
    let path = format!("/v1/shipments/{}/cancel", stuck["shipmentId"].as_str().unwrap());
    assert_eq!(client.post(&path, Some("cf:cancel"), Value::Null).await.0, StatusCode::SERVICE_UNAVAILABLE);

    let sent = client.post("/v1/messages", Some("o:notify"), json!({"customerId": "c-1", "message": "hi"})).await;
    assert_eq!(sent, (StatusCode::CREATED, json!({"messageId": derived_id("msg", "o:notify")})));
    let body = json!({"customerId": "unreachable-7", "message": "hi"});
    let lost = client.post("/v1/messages", Some("u:notify"), body).await;
    let reason = "no contact channel for unreachable-7";
    assert_eq!(lost, (StatusCode::UNPROCESSABLE_ENTITY, json!({"status": "undeliverable", "reason": reason})));

    // Every answer but the 503 is an effect, in order
    let ledger = client.ledger("").await;
    let operations: Vec<_> = ledger["entries"].as_array().unwrap().iter().map(|e| e["operation"].clone()).collect();
    let expected =
        ["refund", "createShipment", "cancelShipment", "createShipment", "createShipment", "notify", "notify"];
    assert_eq!(operations, expected.map(Value::from));
    assert_eq!(ledger["entries"][2]["request"], json!({"shipmentId": shipment_id}));
    assert_eq!(ledger["entries"][6]["seq"], 7);
    sim.stop().await;
}

#[tokio::test]
async fn a_call_without_an_idempotency_key_is_refused() {
    let (sim, client) = start(Config::default()).await;
    let (status, body) = client.post("/v1/messages", None, json!({"customerId": "c-1", "message": "hi"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("Idempotency-Key"), "{body}");
    let (status, body) = client.post("/v1/messages", Some("k"), json!({"customerId": 7})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].is_string());
    assert_eq!(client.ledger("").await["entries"], json!([]));
    sim.stop().await;
}

#[tokio::test]
async fn an_unavailable_outage_answers_503_until_it_ends() {
    // Given a one-second outage of the carrier
    let (sim, client) = start(Config::default()).await;
    let behaviour = client.behave(json!({"service": "carrier", "outage": {"seconds": 1, "mode": "unavailable"}})).await;
    assert_eq!(behaviour["outage"]["mode"], "unavailable");
    let body = json!({"address": address("Main St 1", "10115"), "items": 1});

    // When a shipment is created during it, then after it
    let started = Instant::now();
    let during = client.post("/v1/shipments", Some("out:ship"), body.clone()).await;
    assert!(started.elapsed() < Duration::from_millis(500), "answered at once");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = client.post("/v1/shipments", Some("out:ship"), body).await;

    // Then the first is refused without effect and the retry succeeds
    assert_eq!(during.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(after.0, StatusCode::CREATED);
    let ledger = client.ledger("out").await;
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 1);
    assert_eq!(ledger["calls"]["createShipment"], 2);
    sim.stop().await;
}

#[tokio::test]
async fn a_timeout_outage_holds_the_request_until_the_caller_gives_up() {
    // Given a notifier that stalls for a while
    let (sim, client) = start(Config::default()).await;
    client.behave(json!({"service": "notifier", "outage": {"seconds": 1, "mode": "timeout"}})).await;

    // When a message is sent with a short client timeout
    let http = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let body = json!({"customerId": "c-1", "message": "hi"});
    let result = client.post_with(&http, "/v1/messages", Some("stall:notify"), body).await;

    // Then the client times out, and nothing was sent
    assert!(result.as_ref().is_err_and(reqwest::Error::is_timeout), "{result:?}");
    assert_eq!(client.ledger("stall").await["entries"], json!([]));
    // And other services are unaffected
    assert_eq!(client.charge("stall:charge", "tok_visa").await.0, StatusCode::CREATED);
    // And the abandoned request has no late effect once the window is over
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ledger = client.ledger("stall:notify").await;
    assert_eq!(ledger["entries"], json!([]));
    assert_eq!(ledger["calls"]["notify"], 1);
    sim.stop().await;
}

#[tokio::test]
async fn stopping_releases_held_requests() {
    // Given a request held by a long timeout outage
    let (sim, client) = start(Config::default()).await;
    client.behave(json!({"service": "payments", "outage": {"seconds": 60, "mode": "timeout"}})).await;
    let held = tokio::spawn(async move { client.charge("held:charge", "tok_visa").await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // When the simulator stops
    let started = Instant::now();
    sim.stop().await;

    // Then it stops at once, the held request answered 503
    assert!(started.elapsed() < Duration::from_secs(2), "stopped in {:?}", started.elapsed());
    assert_eq!(held.await.unwrap().0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn an_error_rate_of_one_fails_every_call_of_the_operation() {
    // Given refunds that always fail, but not charges
    let (sim, client) = start(Config::default()).await;
    client.behave(json!({"service": "payments", "operation": "refund", "errorRate": 1.0})).await;

    // When a charge and a refund are made
    let charge = client.charge("err:charge", "tok_visa").await;
    let body = json!({"paymentId": charge.1["paymentId"], "amount": {"amountMinor": 1, "currency": "EUR"}});
    let refund = client.post("/v1/refunds", Some("err:refund"), body).await;

    // Then only the refund fails, without effect
    assert_eq!(charge.0, StatusCode::CREATED);
    assert_eq!(refund.0, StatusCode::SERVICE_UNAVAILABLE);
    let ledger = client.ledger("err").await;
    assert_eq!(ledger["entries"].as_array().unwrap().len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn latency_is_applied() {
    let (sim, client) = start(Config::default()).await;
    client.behave(json!({"service": "notifier", "latencyMs": {"p50": 100, "p99": 120}})).await;

    let started = Instant::now();
    let (status, _) =
        client.post("/v1/messages", Some("slow:notify"), json!({"customerId": "c", "message": "m"})).await;

    assert_eq!(status, StatusCode::CREATED);
    assert!(started.elapsed() >= Duration::from_millis(50), "took {:?}", started.elapsed());
    sim.stop().await;
}

#[tokio::test]
async fn with_an_api_key_provider_calls_need_it_and_control_calls_do_not() {
    // Given a simulator started with an API key
    let (sim, mut client) = start(Config { api_key: Some("s3cret".into()), ..Config::default() }).await;

    // Then calls without it or with a wrong one are refused, without effect
    assert_eq!(client.charge("auth:1", "tok_visa").await.0, StatusCode::UNAUTHORIZED);
    client.api_key = Some("wrong".into());
    let (status, body) = client.charge("auth:1", "tok_visa").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].is_string());
    // And with it they pass
    client.api_key = Some("s3cret".into());
    assert_eq!(client.charge("auth:1", "tok_visa").await.0, StatusCode::CREATED);
    // And control and health need none
    client.api_key = None;
    assert_eq!(client.ledger("auth").await["entries"].as_array().unwrap().len(), 1);
    assert_eq!(client.control(reqwest::Method::GET, "/health", None).await.0, StatusCode::OK);
    sim.stop().await;
}

#[tokio::test]
async fn control_shows_replaces_and_resets_behaviours() {
    let (sim, client) = start(Config::default()).await;

    // Given per-operation and whole-service behaviours
    client.behave(json!({"service": "payments", "operation": "charge", "errorRate": 1.0})).await;
    client.behave(json!({"service": "carrier", "errorRate": 0.5})).await;
    // When the whole of payments is set, it replaces the charge-only behaviour
    let set = client.behave(json!({"service": "payments", "errorRate": 1.0, "latencyMs": {"p50": 1, "p99": 2}})).await;
    assert_eq!(set, json!({"service": "payments", "errorRate": 1.0, "latencyMs": {"p50": 1.0, "p99": 2.0}}));
    let (_, current) = client.control(reqwest::Method::GET, "/control/behaviour", None).await;
    assert_eq!(current["behaviours"].as_array().unwrap().len(), 2, "{current}");
    assert_eq!(client.charge("reset:1", "tok_visa").await.0, StatusCode::SERVICE_UNAVAILABLE);

    // And invalid behaviours are refused
    let (status, _) = client
        .control(reqwest::Method::PUT, "/control/behaviour", Some(json!({"service": "payments", "errorRate": 2})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let mismatched = json!({"service": "notifier", "operation": "charge", "errorRate": 1});
    let (status, _) = client.control(reqwest::Method::PUT, "/control/behaviour", Some(mismatched)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // When reset, everything is back to normal
    let (status, _) = client.control(reqwest::Method::DELETE, "/control/behaviour", None).await;
    assert_eq!(status, StatusCode::OK);
    let (_, current) = client.control(reqwest::Method::GET, "/control/behaviour", None).await;
    assert_eq!(current["behaviours"], json!([]));
    assert_eq!(client.charge("reset:1", "tok_visa").await.0, StatusCode::CREATED);

    // And clearing the ledger forgets effects, counts and stored answers
    let (status, _) = client.control(reqwest::Method::DELETE, "/control/ledger", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let ledger = client.ledger("").await;
    assert_eq!(ledger["entries"], json!([]));
    assert_eq!(ledger["calls"]["charge"], 0);
    sim.stop().await;
}

#[tokio::test]
async fn a_patient_caller_gets_a_late_answer_after_a_timeout_outage() {
    // Given a short stall of the carrier
    let (sim, client) = start(Config::default()).await;
    client
        .behave(
            json!({"service": "carrier", "operation": "createShipment", "outage": {"seconds": 0.5, "mode": "timeout"}}),
        )
        .await;

    // When a caller without a timeout creates a shipment
    let started = Instant::now();
    let (status, _) = client
        .post("/v1/shipments", Some("late:ship"), json!({"address": address("Main St 1", "10115"), "items": 2}))
        .await;

    // Then it is answered only once the window is over, and the shipment was made
    assert_eq!(status, StatusCode::CREATED);
    assert!(started.elapsed() >= Duration::from_millis(400), "answered after {:?}", started.elapsed());
    assert_eq!(client.ledger("late").await["entries"].as_array().unwrap().len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn a_void_settles_a_charge_key_once_and_for_all() {
    let (sim, client) = start(Config::default()).await;
    // Given one charge made, and one whose request never arrived
    let (status, made) = client.charge("v:made", "tok_visa").await;
    assert_eq!(status, StatusCode::CREATED);

    // When both keys are voided (twice each, as a retried call would)
    let void = |charge_key: &str| json!({"chargeKey": charge_key});
    let made_void = client.post("/v1/charges/void", Some("v:void-made"), void("v:made")).await;
    let lost_void = client.post("/v1/charges/void", Some("v:void-lost"), void("v:lost")).await;
    let lost_again = client.post("/v1/charges/void", Some("v:void-lost"), void("v:lost")).await;

    // Then the charge that was made is answered as made: nothing voided, the caller refunds it
    assert_eq!(made_void, (StatusCode::CREATED, made));
    // And the other is voided, the same answer each time
    assert_eq!(lost_void.0, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(lost_void.1["status"], "voided");
    assert_eq!(lost_again, lost_void);
    // And a charge still on its way with the voided key is never made
    let (status, late) = client.charge("v:lost", "tok_visa").await;
    assert_eq!((status, late), lost_void);
    let ledger = client.ledger("v:lost").await;
    let entries = ledger["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{ledger}");
    assert_eq!((entries[0]["operation"].as_str(), entries[0]["status"].as_u64()), (Some("charge"), Some(422)));
    sim.stop().await;
}

#[tokio::test]
async fn a_rotated_api_key_refuses_the_old_one() {
    // Given a simulator asking for key one
    let config = Config { api_key: Some("key-one".into()), ..Config::default() };
    let (sim, mut client) = start(config).await;
    client.api_key = Some("key-one".into());
    assert_eq!(client.charge("k:1", "tok_visa").await.0, StatusCode::CREATED);

    // When the key is rotated
    let rotate = |key: &str| Some(json!({"apiKey": key}));
    assert_eq!(client.control(reqwest::Method::PUT, "/control/api-key", rotate("")).await.0, StatusCode::BAD_REQUEST);
    let (status, _) = client.control(reqwest::Method::PUT, "/control/api-key", rotate("key-two")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Then the old key is refused, and the new one accepted
    assert_eq!(client.charge("k:2", "tok_visa").await.0, StatusCode::UNAUTHORIZED);
    client.api_key = Some("key-two".into());
    assert_eq!(client.charge("k:2", "tok_visa").await.0, StatusCode::CREATED);
    sim.stop().await;
}
