//! Resilience against a failing payment provider, end to end on the emulators and the provider
//! simulator: the shared circuit breaker, the parking of orders while the gateway is down, and
//! the provider's ledger as the ground truth of what was charged.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::domain::OrderId;
use shared::domain::inventory::{Inventory, Reservation};
use shared::domain::order::{Order, OrderStatus};
use shared::domain::payment::Payment;
use shared::resilience::breaker::{BreakerStore, DynamoBreakerStore, State};
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
    let ledger = local_env::http_client::request(providers.addr(), "GET", "/control/ledger", None)
        .await
        .expect("ledger")
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
    let history = store.history("payment-gateway", 50).await.expect("breaker history");
    let moves: Vec<(State, State)> = history.iter().map(|t| (t.from, t.to)).collect();
    assert!(moves.contains(&(State::Closed, State::Open)), "{history:?}");
    assert_eq!(moves.last().map(|m| m.1), Some(State::Closed), "{history:?}");
    assert_eq!(store.read("payment-gateway").await.expect("state").state, State::Closed);
    println!(
        "outage 20 s, {orders} orders: all completed {:.1} s after recovery; {charge_calls} charge calls reached the \
         provider; breaker transitions {moves:?}",
        done_after_recovery.as_secs_f64()
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_waits_no_longer_than_its_parking_limit_then_is_compensated() {
    // Given a gateway that stays down longer than an order may wait for it (5 s)
    let mut parameters = RESILIENT.to_vec();
    parameters.retain(|(name, _)| *name != "PaymentParkingLimitSeconds");
    parameters.push(("PaymentParkingLimitSeconds", "5"));
    let env = SagaEnv::start_with_parameters(&parameters).await;
    env.provider_behaviour(&json!({ "service": "payments", "errorRate": 1.0 })).await;
    let started = Instant::now();

    // When an order is placed
    let id = env.place(env.sample("happy-path")).await;
    let finished = env.finished(&id).await;

    // Then it waited (the charge tried more than once), then the charge failed for good and the
    // saga compensated: the stock is back
    let steps = env.steps(&finished).await;
    assert!(steps.iter().filter(|s| *s == "ChargePayment").count() >= 2, "{steps:?}");
    let payment_failed = steps.iter().position(|s| s == "RefundPayment").expect("compensated");
    assert!(steps[payment_failed..].contains(&"ReleaseInventory".to_owned()), "{steps:?}");
    let inventory = env.repo.load::<Inventory>("SKU-RED-MUG").await.expect("inventory").state;
    let order_id = OrderId::parse(&id).expect("order id");
    assert!(matches!(inventory.reservation(&order_id), Some(Reservation::Released(2))), "{inventory:?}");
    // And nothing was charged; since the gateway cannot confirm that, the refund could not be
    // resolved and the order waits for a person, naming it
    assert_eq!(ledger_operations(&env.provider_ledger(&id).await, "charge"), 0);
    let order = env.repo.load::<Order>(&id).await.expect("order").state;
    assert_eq!(order.status, OrderStatus::NeedsManualAction, "{finished:?}");
    let history = env.events("Payment", &id).await;
    let postponed = history.iter().find(|e| e.event_type == "PaymentPostponed").expect("parked");
    assert!(postponed.payload["retryUntil"].as_str().is_some_and(|t| !t.is_empty()), "{postponed:?}");
    println!("parked for at most 5 s: the saga ended {:.1} s after the order", started.elapsed().as_secs_f64());
    env.stop().await;
}
