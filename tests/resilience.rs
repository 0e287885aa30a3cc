//! Resilience against a failing payment provider, end to end on the emulators and the provider
//! simulator: the shared circuit breaker, the parking of orders while the gateway is down, and
//! the provider's ledger as the ground truth of what was charged.

use std::time::{Duration, Instant};

use local_env::lambda::Faults;
use serde_json::{Value, json};
use shared::adapters::dynamodb::DynamoBreakerStore;
use shared::domain::OrderId;
use shared::domain::inventory::{Inventory, Reservation};
use shared::domain::order::{Order, OrderStatus};
use shared::domain::payment::Payment;
use shared::resilience::breaker::{BreakerStore, State};
use system_tests::saga::SagaEnv;

/// A breaker that opens after 3 failures in 10 s and probes after 4 s; parked payments retry
/// every 2 s when no breaker tells them when, and may wait 10 minutes.
const RESILIENT: &[(&str, &str)] = &[
    ("BreakerFailureThreshold", "3"),
    ("BreakerWindowSeconds", "10"),
    ("BreakerRecoverySeconds", "4"),
    ("PaymentRetrySeconds", "2"),
    ("PaymentParkingLimitSeconds", "600"),
];

fn ledger_operations(entries: &[Value], operation: &str) -> usize {
    entries.iter().filter(|e| e["operation"] == operation && e["status"].as_u64().is_some_and(|s| s < 300)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_orders_during_a_payment_outage_completes_after_recovery_charged_once_each() {
    // Given the system with the payment gateway down (503s) for the next 20 seconds
    let env = SagaEnv::start_with_parameters(RESILIENT).await;
    env.provider_behaviour(&json!({ "service": "payments", "outage": { "seconds": 20.0, "mode": "unavailable" } }))
        .await;
    let outage_ends = Instant::now() + Duration::from_secs(20);
    let before = env.repo.load::<Inventory>("SKU-RED-MUG").await.expect("inventory").state;

    // When a burst of orders is placed in it
    let orders = 8;
    let mut ids = Vec::new();
    for _ in 0..orders {
        ids.push(env.place(env.sample("happy-path")).await);
    }

    // Then while the outage lasts the orders wait, parked with their payment pending
    let first = ids[0].clone();
    let mut parked = false;
    while Instant::now() < outage_ends && !parked {
        let payment = env.repo.load::<Payment>(&first).await.expect("payment").state;
        parked = matches!(payment, Payment::Postponed { .. });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(parked, "the first order was not parked during the outage");

    // And after recovery every order completes: none cancelled, none flagged
    let mut finished = Vec::new();
    for id in &ids {
        finished.push(env.finished(id).await);
    }
    let done_after_recovery = outage_ends.elapsed();
    for (id, f) in ids.iter().zip(&finished) {
        assert_eq!(f.status, "SUCCEEDED", "{id}: {f:?}");
        let order = env.repo.load::<Order>(id).await.expect("order").state;
        assert_eq!(order.status, OrderStatus::Completed, "{id}");
    }
    // Parked orders went through the wait state and charged again, once the gateway answered
    let steps = env.steps(&finished[0]).await;
    assert!(steps.iter().filter(|s| *s == "ChargePayment").count() >= 2, "{steps:?}");
    assert!(env.event_types("Payment", &first).await.contains(&"PaymentPostponed".to_owned()));

    // And the provider charged each order exactly once and refunded nothing
    let mut charge_calls = 0;
    for id in &ids {
        let entries = env.provider_ledger(id).await;
        assert_eq!(ledger_operations(&entries, "charge"), 1, "{id}: {entries:?}");
        assert_eq!(ledger_operations(&entries, "refund"), 0, "{id}: {entries:?}");
    }
    let providers = env.providers.as_ref().expect("simulator");
    let ledger = system_tests::http::request(providers.addr(), "GET", "/control/ledger", None)
        .await
        .body_json()
        .expect("ledger JSON");
    charge_calls += ledger["calls"]["charge"].as_u64().unwrap_or(0);

    // And stock is conserved: each order's units committed, nothing else taken
    let after = env.repo.load::<Inventory>("SKU-RED-MUG").await.expect("inventory").state;
    assert_eq!(after.available, before.available - 2 * orders as u64);
    assert_eq!(after.reserved, before.reserved);
    for id in &ids {
        let order_id = OrderId::parse(id).expect("order id");
        assert!(matches!(after.reservation(&order_id), Some(Reservation::Committed(2))), "{id}");
    }

    // And the breaker opened during the outage and closed after it (its history)
    let table = env.stack.environment.get("COMMANDS_TABLE").expect("COMMANDS_TABLE").clone();
    let store = DynamoBreakerStore::new(env.aws.dynamodb(), table);
    let moves = assert_opened_and_closed_again(&store).await;
    println!(
        "outage 20 s, {orders} orders: all completed {:.1} s after recovery; {charge_calls} charge calls reached the \
         provider; breaker transitions {moves:?}",
        done_after_recovery.as_secs_f64()
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_waits_no_longer_than_its_parking_limit_then_is_cancelled_and_never_charged() {
    // Given a gateway that stays down longer than an order may wait for it (5 s)
    let mut parameters = RESILIENT.to_vec();
    parameters.retain(|(name, _)| *name != "PaymentParkingLimitSeconds");
    parameters.push(("PaymentParkingLimitSeconds", "5"));
    let env = SagaEnv::start_with_parameters(&parameters).await;
    env.provider_behaviour(&json!({ "service": "payments", "errorRate": 1.0 })).await;
    let started = Instant::now();

    // When an order is placed
    let id = env.place(env.sample("happy-path")).await;

    // Then it waits, the charge fails for good, and the saga compensates; the refund, unable to
    // settle the charge while the gateway is down (was it made?), waits for the gateway in turn
    let deadline = Instant::now() + Duration::from_secs(60);
    let refund_parked = loop {
        let history = env.events("Payment", &id).await;
        if let Some(parked) = history.into_iter().find(|e| e.event_type == "RefundPostponed") {
            break parked;
        }
        assert!(Instant::now() < deadline, "the refund was not parked");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(refund_parked.payload["retryUntil"].as_str().is_some_and(|t| !t.is_empty()), "{refund_parked:?}");

    // When the gateway comes back
    env.providers_normal().await;

    // Then the refund settled the charge by voiding its key: nothing was charged, so nothing is
    // refunded, and the order is cancelled, with nothing left to a person
    let finished = env.finished(&id).await;
    assert_eq!(finished.status, "SUCCEEDED", "{finished:?}");
    let steps = env.steps(&finished).await;
    assert!(steps.iter().filter(|s| *s == "ChargePayment").count() >= 2, "{steps:?}");
    assert!(steps.iter().filter(|s| *s == "RefundPayment").count() >= 2, "{steps:?}");
    assert_eq!(steps.last().map(String::as_str), Some("CancelOrder"), "{steps:?}");
    let order = env.repo.load::<Order>(&id).await.expect("order").state;
    assert_eq!(order.status, OrderStatus::Cancelled, "{finished:?}");
    let payment = env.repo.load::<Payment>(&id).await.expect("payment").state;
    assert!(matches!(&payment, Payment::Declined { reason } if reason.contains("voided")), "{payment:?}");
    // And the provider's ledger agrees: no charge made, the charge's key voided, no refund
    let ledger = env.provider_ledger(&id).await;
    assert_eq!(ledger_operations(&ledger, "charge"), 0, "{ledger:?}");
    assert_eq!(ledger_operations(&ledger, "refund"), 0, "{ledger:?}");
    let voided = ledger.iter().filter(|e| e["operation"] == "charge" && e["response"]["status"] == "voided");
    assert_eq!(voided.count(), 1, "{ledger:?}");
    // And the stock is back
    let inventory = env.repo.load::<Inventory>("SKU-RED-MUG").await.expect("inventory").state;
    let order_id = OrderId::parse(&id).expect("order id");
    assert!(matches!(inventory.reservation(&order_id), Some(Reservation::Released(2))), "{inventory:?}");
    let history = env.events("Payment", &id).await;
    let postponed = history.iter().find(|e| e.event_type == "PaymentPostponed").expect("parked");
    assert!(postponed.payload["retryUntil"].as_str().is_some_and(|t| !t.is_empty()), "{postponed:?}");
    println!("parked for at most 5 s: the saga ended {:.1} s after the order", started.elapsed().as_secs_f64());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_api_key_rotated_in_ssm_and_at_the_provider_needs_no_redeploy() {
    // Given a system whose functions hold the providers' API key since their first call
    let env = SagaEnv::start().await;
    let first = env.place(env.sample("happy-path")).await;
    assert_eq!(env.finished(&first).await.status, "SUCCEEDED");

    // When the key is rotated: a new one in the parameter store, and the old one refused
    let parameter = local_env::providers::api_key_parameter(&env.stack).expect("the key's parameter");
    let key = format!("rotated-{}", uuid::Uuid::new_v4().simple());
    local_env::providers::put_api_key(&env.aws.ssm(), &parameter, &key).await.expect("the new key in SSM");
    let providers = env.providers.as_ref().expect("simulator");
    let body = json!({ "apiKey": key }).to_string();
    let answer = system_tests::http::request(providers.addr(), "PUT", "/control/api-key", Some(&body)).await;
    assert_eq!(answer.status, 204, "{}", answer.body);

    // Then the next order completes through every provider, each charged once: the warm
    // instances, refused, read the key again and called once more
    let second = env.place(env.sample("happy-path")).await;
    let finished = env.finished(&second).await;
    assert_eq!(finished.status, "SUCCEEDED", "{finished:?}");
    let ledger = env.provider_ledger(&second).await;
    for operation in ["charge", "createShipment", "notify"] {
        assert_eq!(ledger_operations(&ledger, operation), 1, "{operation}: {ledger:?}");
    }
    let refused = env.log_messages("ChargePaymentFunction").await;
    assert!(refused.iter().any(|m| m.contains("refused the API key")), "the charge function read the key again");
    env.stop().await;
}

/// The payment gateway's breaker went from closed to open (in its history) and is closed now;
/// its transitions, oldest first.
async fn assert_opened_and_closed_again(store: &DynamoBreakerStore) -> Vec<(State, State)> {
    let history = store.history("payment-gateway", 50).await.expect("breaker history");
    let moves: Vec<(State, State)> = history.iter().map(|t| (t.from, t.to)).collect();
    assert!(moves.contains(&(State::Closed, State::Open)), "{history:?}");
    assert_eq!(moves.last().map(|m| m.1), Some(State::Closed), "{history:?}");
    assert_eq!(store.read("payment-gateway").await.expect("state").state, State::Closed);
    moves
}

/// The charge calls the provider has received so far (this run of its process).
async fn charge_calls(env: &SagaEnv) -> u64 {
    let providers = env.providers.as_ref().expect("simulator");
    let ledger = system_tests::http::build(providers.addr(), "GET", "/control/ledger", &[], None);
    match system_tests::http::HttpResponse::of(ledger).await {
        Ok(answer) => answer.body_json().map(|l| l["calls"]["charge"].as_u64().unwrap_or(0)).unwrap_or(0),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_in_flight_when_the_provider_process_crashes_complete_after_its_restart_charged_once_each() {
    // Given the system with a breaker that opens after 3 failures, and the charge function's
    // process set to crash (SIGKILL) once, after the provider charged and it answered the saga
    let mut env = SagaEnv::start_with_parameters(RESILIENT).await;
    let started = Instant::now();
    let crash = Faults { kill_after_answer: true, times: Some(1), ..Faults::default() };
    env.service.set_faults("ChargePaymentFunction", crash).expect("faults");
    // And a first order charged by the provider before anything else happens: that charge's
    // invocation crashed, its command came back and was answered from the recorded charge
    let first = env.place(env.sample("happy-path")).await;
    let first_finished = env.finished(&first).await;
    assert_eq!(first_finished.status, "SUCCEEDED", "{first_finished:?}");
    let charged_before = charge_calls(&env).await;
    assert!(charged_before >= 1, "the first order's charge reached the provider");
    // And the gateway stalling on charges from now on, so that the burst's charges are in flight,
    // held at the provider, when its process dies
    env.provider_behaviour(
        &json!({ "service": "payments", "operation": "charge", "outage": { "seconds": 300.0, "mode": "timeout" } }),
    )
    .await;

    // When a burst of orders is placed
    let burst = 5;
    let placing = (0..burst).map(|_| env.place(env.sample("happy-path")));
    let mut ids = futures::future::join_all(placing).await;
    // And the simulator's process is killed (SIGKILL) as soon as their charges reach it
    let in_flight_by = Instant::now() + Duration::from_secs(30);
    while charge_calls(&env).await <= charged_before {
        assert!(Instant::now() < in_flight_by, "no charge of the burst reached the provider");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.kill_providers().await;
    let killed = Instant::now();
    // And it stays down for 15 s (every call refused), then starts again on its journal
    let table = env.stack.environment.get("COMMANDS_TABLE").expect("COMMANDS_TABLE").clone();
    let store = DynamoBreakerStore::new(env.aws.dynamodb(), table);
    let mut opened_while_down = false;
    while killed.elapsed() < Duration::from_secs(15) {
        let breaker = store.read("payment-gateway").await.expect("breaker state");
        opened_while_down |= breaker.state == State::Open;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.restart_providers().await;
    let restarted = Instant::now();

    // Then the payment breaker opened while the provider was down
    assert!(opened_while_down, "the breaker did not open while the provider was down");
    // And every order completed: none cancelled, none flagged
    ids.insert(0, first.clone());
    for id in &ids {
        let finished = env.finished(id).await;
        assert_eq!(finished.status, "SUCCEEDED", "{id}: {finished:?}");
        let order = env.repo.load::<Order>(id).await.expect("order").state;
        assert_eq!(order.status, OrderStatus::Completed, "{id}: {finished:?}");
    }
    let done_after_restart = restarted.elapsed();
    // And the charge function's process did crash once
    let stats = env.service.stats().into_iter().find(|s| s.logical_id == "ChargePaymentFunction").expect("stats");
    assert!(stats.errors >= 1, "{stats:?}");

    // And the provider charged each order exactly once, across its crash and restart: the
    // restarted process's ledger (read back from its journal) shows the charge made before the
    // crash, and the retried ones were answered from it, not charged again
    for id in &ids {
        let entries = env.provider_ledger(id).await;
        assert_eq!(ledger_operations(&entries, "charge"), 1, "{id}: {entries:?}");
        assert_eq!(ledger_operations(&entries, "refund"), 0, "{id}: {entries:?}");
    }
    let journal = std::fs::read_to_string(env.providers.as_ref().expect("simulator").journal()).expect("journal");
    for id in &ids {
        let charges = journal.lines().filter(|l| l.contains("\"operation\":\"charge\"") && l.contains(id.as_str()));
        assert_eq!(charges.count(), 1, "{id} in the journal:\n{journal}");
    }

    // And the breaker went from closed to open, and is closed again
    let moves = assert_opened_and_closed_again(&store).await;
    println!(
        "provider killed with the burst's charges in flight, down 15 s: {} orders completed {:.1} s after its \
         restart, charged once each; breaker transitions {moves:?}; {:.1} s in all",
        ids.len(),
        done_after_restart.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    env.stop().await;
}
