//! The order saga end to end on the emulators: Step Functions (LocalStack) drives the step
//! functions' own binaries (in the local Lambda service) through real SQS queues; the saga starts
//! from the event store's DynamoDB stream. Each test has its own stack (tables, queues, state
//! machine).

use std::sync::Arc;
use std::time::Duration;

use local_env::lambda::Faults;
use serde_json::{Value, json};
use shared::domain::dead_letter::{Failure, Status};
use shared::domain::inventory::{Inventory, Reservation};
use shared::domain::order::{Order, OrderEvent, OrderStatus};
use shared::domain::payment::Payment;
use shared::domain::shipment::Shipment;
use system_tests::invoke::Twice;
use system_tests::saga::SagaEnv;
use system_tests::workspace_root;

fn count(types: &[String], name: &str) -> usize {
    types.iter().filter(|t| t.as_str() == name).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_happy_path_completes_the_order_with_every_effect_once() {
    // Given the system running with stock
    let env = SagaEnv::start().await;
    let before = env.repo.load::<Inventory>("SKU-RED-MUG").await.expect("inventory").state;

    // When an order is placed
    let id = env.place(env.sample("happy-path")).await;
    let finished = env.finished(&id).await;

    // Then the saga succeeded through every step and the order is completed
    assert_eq!(finished.status, "SUCCEEDED", "{finished:?}");
    assert_eq!(
        env.steps(&finished).await,
        ["ReserveInventory", "ChargePayment", "CreateShipment", "SendNotification", "CompleteOrder"]
    );
    let order = env.repo.load::<Order>(&id).await.expect("order").state;
    assert_eq!(order.status, OrderStatus::Completed);
    // And stock left the warehouse (2 mugs), nothing stays reserved for it
    let after = env.repo.load::<Inventory>("SKU-RED-MUG").await.expect("inventory").state;
    assert_eq!(after.available, before.available - 2);
    assert_eq!(after.reserved, before.reserved);
    assert!(matches!(
        after.reservation(&order.placed.as_ref().expect("placed").order_id),
        Some(Reservation::Committed(2))
    ));
    // And the payment was captured and the shipment created, once each
    assert!(matches!(env.repo.load::<Payment>(&id).await.unwrap().state, Payment::Charged { .. }));
    assert!(matches!(env.repo.load::<Shipment>(&id).await.unwrap().state, Shipment::Created { .. }));
    assert_eq!(count(&env.event_types("Payment", &id).await, "PaymentCharged"), 1);
    assert_eq!(order.payment_id.as_deref().map(|p| p.starts_with("pay_")), Some(true));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_at_each_step_compensates_exactly_the_completed_steps_in_reverse_order() {
    let env = SagaEnv::start().await;
    let mugs = env.repo.load::<Inventory>("SKU-RED-MUG").await.unwrap().state.available;
    let cases = [
        ("out-of-stock", "InventoryUnavailable", vec!["ReserveInventory", "CancelOrder"]),
        (
            "payment-declined",
            "PaymentDeclined",
            vec!["ReserveInventory", "ChargePayment", "ReleaseInventory", "CancelOrder"],
        ),
        (
            "shipment-failed",
            "ShipmentRejected",
            vec![
                "ReserveInventory",
                "ChargePayment",
                "CreateShipment",
                "RefundPayment",
                "ReleaseInventory",
                "CancelOrder",
            ],
        ),
        (
            "notification-failed",
            "NotificationUndeliverable",
            vec![
                "ReserveInventory",
                "ChargePayment",
                "CreateShipment",
                "SendNotification",
                "CancelShipment",
                "RefundPayment",
                "ReleaseInventory",
                "CancelOrder",
            ],
        ),
    ];
    // Given one order per failing step, placed together
    let mut ids = Vec::new();
    for (sample, _, _) in &cases {
        ids.push(env.place(env.sample(sample)).await);
    }
    for ((sample, error, expected_steps), id) in cases.iter().zip(&ids) {
        // Then each saga ran exactly the compensations of the steps that completed, newest first
        let finished = env.finished(id).await;
        assert_eq!(finished.status, "SUCCEEDED", "{sample}: {finished:?}");
        assert_eq!(env.steps(&finished).await, *expected_steps, "{sample}");
        // And the order is cancelled with the reason
        let order = env.repo.load::<Order>(id).await.unwrap().state;
        assert_eq!(order.status, OrderStatus::Cancelled, "{sample}");
        let reason = order.cancellation_reason.unwrap_or_default();
        assert!(reason.starts_with(error), "{sample}: reason {reason:?}");
        // And whatever was done is undone
        let payment = env.repo.load::<Payment>(id).await.unwrap().state;
        let shipment = env.repo.load::<Shipment>(id).await.unwrap().state;
        match *sample {
            "out-of-stock" => assert_eq!(payment, Payment::None),
            "payment-declined" => assert!(matches!(payment, Payment::Declined { .. })),
            _ => assert!(matches!(payment, Payment::Refunded { .. }), "{sample}: {payment:?}"),
        }
        match *sample {
            "notification-failed" => assert!(matches!(shipment, Shipment::Cancelled { .. })),
            "shipment-failed" => assert!(matches!(shipment, Shipment::Rejected { .. })),
            _ => assert_eq!(shipment, Shipment::None, "{sample}"),
        }
    }
    // And no stock is held or lost: every reservation was released or never made
    let inventory = env.repo.load::<Inventory>("SKU-RED-MUG").await.unwrap().state;
    assert_eq!(inventory.available, mugs);
    assert_eq!(inventory.reserved, 0);
    let vase = env.repo.load::<Inventory>("SKU-RARE-VASE").await.unwrap().state;
    assert_eq!((vase.available, vase.reserved), (2, 0), "the short SKU is untouched");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_delivered_twice_still_has_exactly_one_effect() {
    // Given every command and stream record delivered twice
    let env = SagaEnv::start_with(|_, service| Arc::new(Twice(service))).await;
    let mugs = env.repo.load::<Inventory>("SKU-RED-MUG").await.unwrap().state.available;

    // When a completing order and a compensated one go through
    let happy = env.place(env.sample("happy-path")).await;
    let compensated = env.place(env.sample("notification-failed")).await;
    assert_eq!(env.finished(&happy).await.status, "SUCCEEDED");
    assert_eq!(env.finished(&compensated).await.status, "SUCCEEDED");

    // Then every effect happened once
    for id in [&happy, &compensated] {
        let payments = env.event_types("Payment", id).await;
        assert_eq!(count(&payments, "PaymentRequested"), 1, "{payments:?}");
        assert_eq!(count(&payments, "PaymentCharged"), 1, "{payments:?}");
        let shipments = env.event_types("Shipment", id).await;
        assert_eq!(count(&shipments, "ShipmentCreated"), 1, "{shipments:?}");
        let orders = env.event_types("Order", id).await;
        assert_eq!(count(&orders, "OrderPlaced"), 1);
        assert_eq!(count(&orders, "CustomerNotified") + count(&orders, "OrderCancelled"), 1, "{orders:?}");
    }
    assert_eq!(count(&env.event_types("Payment", &compensated).await, "PaymentRefunded"), 1);
    assert_eq!(count(&env.event_types("Shipment", &compensated).await, "ShipmentCancelled"), 1);
    let inventory = env.events("Inventory", "SKU-RED-MUG").await;
    let for_order =
        |id: &str, kind: &str| inventory.iter().filter(|e| e.event_type == kind && e.payload["orderId"] == id).count();
    assert_eq!(for_order(&happy, "InventoryReserved"), 1);
    assert_eq!(for_order(&happy, "InventoryCommitted"), 1);
    assert_eq!(for_order(&compensated, "InventoryReserved"), 1);
    assert_eq!(for_order(&compensated, "InventoryReleased"), 1);
    let after = env.repo.load::<Inventory>("SKU-RED-MUG").await.unwrap().state;
    assert_eq!(after.available, mugs - 2, "only the completed order's 2 mugs left");
    assert_eq!(after.reserved, 0);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_orders_for_ten_units_complete_exactly_ten() {
    // Given 10 units of one SKU
    let env = SagaEnv::start().await;
    let sku = "SKU-LIMITED-1";
    local_env::demo::restock(&env.repo, &[(sku, 10)]).await.expect("restock");

    // When 50 orders for one unit each arrive at once
    let orders: Vec<Value> = (0..50)
        .map(|_| {
            let mut order = env.sample("happy-path");
            order["lines"] = json!([{ "sku": sku, "quantity": 1, "unitPriceMinor": 500 }]);
            order
        })
        .collect();
    let ids: Vec<String> = futures::future::join_all(orders.into_iter().map(|o| env.place(o))).await;
    let mut completed = 0;
    let mut cancelled = 0;
    for id in &ids {
        assert_eq!(env.finished(id).await.status, "SUCCEEDED");
        match env.repo.load::<Order>(id).await.unwrap().state.status {
            OrderStatus::Completed => completed += 1,
            OrderStatus::Cancelled => cancelled += 1,
            other => panic!("{id} ended {other:?}"),
        }
    }

    // Then exactly 10 completed and 40 were cancelled with nothing held for them
    assert_eq!((completed, cancelled), (10, 40));
    let inventory = env.repo.load::<Inventory>(sku).await.unwrap().state;
    assert_eq!((inventory.available, inventory.reserved), (0, 0));
    let committed = inventory.reservations.values().filter(|r| matches!(r, Reservation::Committed(1))).count();
    assert_eq!(committed, 10);
    // And stock never went negative: replaying the stream, available never drops below zero
    let mut available: i64 = 0;
    for event in env.events("Inventory", sku).await {
        let quantity = event.payload["quantity"].as_i64().unwrap_or(0);
        match event.event_type.as_str() {
            "InventoryRestocked" | "InventoryReleased" => available += quantity,
            "InventoryReserved" => available -= quantity,
            _ => {}
        }
        assert!(available >= 0, "stock went negative at version {}", event.version);
    }
    env.stop().await;
}

/// The function's log file, once every line so far is written.
async fn log_of(env: &SagaEnv, function: &str) -> String {
    env.service.flush_logs().await;
    std::fs::read_to_string(env.service.log_file(function).expect("a log file")).unwrap_or_default()
}

fn stats_of(env: &SagaEnv, function: &str) -> local_env::lambda::FunctionStats {
    env.service.stats().into_iter().find(|s| s.logical_id == function).expect("stats")
}

/// The function's figures once `done` holds (the step answers the saga before its invocation
/// ends, so the saga may finish before the crash or timeout is recorded and redelivered).
async fn stats_once(
    env: &SagaEnv,
    function: &str,
    done: impl Fn(&local_env::lambda::FunctionStats) -> bool,
) -> local_env::lambda::FunctionStats {
    for _ in 0..300 {
        let stats = stats_of(env, function);
        if done(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stats_of(env, function)
}

/// The outcome a crashed or timed-out charge must not change: the saga succeeded, the order is
/// completed, and it was charged exactly once.
async fn completed_and_charged_once(env: &SagaEnv, id: &str, finished: &local_env::observe::Finished) {
    assert_eq!(finished.status, "SUCCEEDED", "{finished:?}");
    assert_eq!(env.repo.load::<Order>(id).await.unwrap().state.status, OrderStatus::Completed);
    assert_eq!(count(&env.event_types("Payment", id).await, "PaymentCharged"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_killed_before_it_tells_the_saga_is_redelivered_and_charged_once() {
    // Given the charge-payment binary killed (SIGKILL) at the moment it calls SendTaskSuccess:
    // the charge is recorded, the saga is not told
    let env = SagaEnv::start().await;
    let kill = Faults { kill_on_call: Some("SendTaskSuccess".into()), times: Some(1), ..Faults::default() };
    env.service.set_faults("ChargePaymentFunction", kill).expect("faults");

    // When an order goes through
    let id = env.place(env.sample("happy-path")).await;
    let finished = env.finished(&id).await;

    // Then the crash failed the first invocation, and the redelivered command answered the saga
    // from the recorded charge
    let stats = stats_once(&env, "ChargePaymentFunction", |s| s.errors >= 1 && s.invocations >= 2).await;
    assert!(stats.errors >= 1 && stats.invocations >= 2 && stats.cold_starts >= 2, "{stats:?}");
    let log = log_of(&env, "ChargePaymentFunction").await;
    assert!(log.contains("Runtime exited with error: signal: killed"), "{log}");
    // And the outcome is unchanged
    completed_and_charged_once(&env, &id, &finished).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_killed_after_its_work_is_redelivered_and_charged_once() {
    // Given the charge-payment binary killed (SIGKILL) once it has charged and answered the
    // saga, before its answer reaches the event source mapping
    let env = SagaEnv::start().await;
    let kill = Faults { kill_after_answer: true, times: Some(1), ..Faults::default() };
    env.service.set_faults("ChargePaymentFunction", kill).expect("faults");

    // When an order goes through
    let id = env.place(env.sample("happy-path")).await;
    let finished = env.finished(&id).await;

    // Then the crash failed that invocation, the command came back and was handled again
    let stats = stats_once(&env, "ChargePaymentFunction", |s| s.errors >= 1 && s.invocations >= 2).await;
    assert!(stats.errors >= 1 && stats.invocations >= 2, "{stats:?}");
    assert!(stats.cold_starts >= 2, "the killed instance was replaced: {stats:?}");
    let log = log_of(&env, "ChargePaymentFunction").await;
    assert!(log.contains("Runtime exited with error: signal: killed"), "{log}");
    assert!(log.contains("Status: error\tError Type: Runtime.ExitError"), "{log}");
    assert!(log.contains("task already closed: a redelivered command, answered again"), "the binary's own log: {log}");
    // And the outcome is unchanged
    completed_and_charged_once(&env, &id, &finished).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_past_its_timeout_is_killed_redelivered_and_charged_once() {
    // Given a charge-payment invocation that does its work but answers 12 s later, past the
    // function's 10 s Timeout
    let env = SagaEnv::start().await;
    let timeout = env.service.spec("ChargePaymentFunction").expect("spec").timeout;
    let slow = Faults { delay: Some(timeout + Duration::from_secs(2)), times: Some(1), ..Faults::default() };
    env.service.set_faults("ChargePaymentFunction", slow).expect("faults");

    // When an order goes through
    let id = env.place(env.sample("happy-path")).await;
    let finished = env.finished(&id).await;

    // Then Lambda's timeout ended that invocation and killed its instance
    let stats = stats_once(&env, "ChargePaymentFunction", |s| s.timeouts >= 1 && s.invocations >= 2).await;
    assert_eq!(stats.timeouts, 1, "{stats:?}");
    let log = log_of(&env, "ChargePaymentFunction").await;
    let seconds = format!("Task timed out after {:.2} seconds", timeout.as_secs_f64());
    assert!(log.contains(&seconds), "{log}");
    assert!(log.contains("Status: timeout"), "{log}");
    // And the command was handled again, with the same outcome
    assert!(stats.invocations >= 2, "{stats:?}");
    completed_and_charged_once(&env, &id, &finished).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_commands_are_parked_as_dead_letters_people_are_told_and_an_operator_discards_one() {
    let env = SagaEnv::start().await;
    let sqs = &env.aws.sqs();
    let queue = env.queue_url("ReserveInventoryQueue");
    let pager = env.pager().await;

    // Given a message that is not JSON and a well-formed one meant for another step (the
    // charge-payment sample), on the reserve-inventory queue
    let sample: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("events/charge-payment/command.json")).expect("sample"),
    )
    .expect("json");
    let wrong_step = sample["Records"][0]["body"].as_str().expect("body").to_owned();
    for body in ["{not json", wrong_step.as_str()] {
        sqs.send_message().queue_url(&queue).message_body(body).send().await.expect("send");
    }
    // And a good order at the same time
    let id = env.place(env.sample("happy-path")).await;

    // Then both are recorded as dead letters, parked for a person with the reason: each was
    // dead-lettered on its first receive, not after the queue's five
    let parked = env.dead_letters("ReserveInventoryDlq", 2, Status::Parked, 30).await;
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(parked.iter().all(|d| d.status == Status::Parked && d.failure == Some(Failure::Poison)), "{parked:?}");
    assert!(parked.iter().all(|d| d.receive_count == 1), "dead-lettered at once: {parked:?}");
    assert!(
        parked
            .iter()
            .all(|d| d.source.as_deref() == Some(&*env.stack.resources["ReserveInventoryQueue"].attributes["Arn"]))
    );
    let reasons: Vec<&str> = parked.iter().map(|d| d.reason.as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("malformed step command")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("does not belong on this queue")), "{reasons:?}");
    assert!(parked.iter().any(|d| d.body == "{not json"), "the body is kept as it came: {parked:?}");
    // And people were told about each, by dead letter id
    let ids: Vec<&str> = parked.iter().map(|d| d.dead_letter_id.as_str()).collect();
    let told = env.told(&pager, &ids, 20).await;
    for id in &ids {
        let about = |(subject, m): &&(String, String)| m.contains(id) && subject.contains("ReserveInventoryDlq");
        assert!(told.iter().any(|t| about(&t)), "{id}: {told:?}");
    }
    // When an operator discards one, saying why
    let operator = env.operator();
    let discarded_id = &parked[0].dead_letter_id;
    let refused = operator.settle_by_operator(discarded_id, "ana", true, "").await;
    assert!(refused.is_err(), "a discard needs a note");
    let discarded =
        operator.settle_by_operator(discarded_id, "ana", true, "malformed by a test").await.expect("discard");
    // Then it is discarded on its stream and in the view, naming who and why
    assert_eq!(discarded.status, Status::Discarded);
    let listed = env.dead_letters("ReserveInventoryDlq", 1, Status::Discarded, 20).await;
    let view = listed.iter().find(|d| &d.dead_letter_id == discarded_id).expect("listed");
    let last = view.history.last().expect("history");
    assert_eq!(
        (last.what.as_str(), last.by.as_deref(), last.detail.as_str()),
        ("discarded", Some("ana"), "malformed by a test")
    );
    // And the good order completed
    assert_eq!(env.finished(&id).await.status, "SUCCEEDED");
    assert_eq!(env.repo.load::<Order>(&id).await.unwrap().state.status, OrderStatus::Completed);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compensation_that_keeps_failing_is_flagged_told_retried_by_an_operator_and_resolved_by_hand() {
    // Given an order whose shipment fails and whose refund the gateway refuses, and people on call
    let env = SagaEnv::start().await;
    let pager = env.pager().await;
    let id = env.place(env.sample("needs-manual-action")).await;

    // Then the saga ends in the distinct NeedsManualAction outcome, after the compensation that
    // follows the refund (the stock release) ran all the same
    let finished = env.finished(&id).await;
    assert_eq!(finished.status, "FAILED");
    assert_eq!(finished.error.as_deref(), Some("NeedsManualAction"));
    let steps = env.steps(&finished).await;
    assert_eq!(
        steps[steps.len() - 4..],
        ["RefundPayment", "ReleaseInventory", "FlagForManualAction", "ReportManualAction"]
    );
    // And it is recorded on the Order stream, naming the refund
    let order = env.repo.load::<Order>(&id).await.unwrap().state;
    assert_eq!(order.status, OrderStatus::NeedsManualAction);
    assert_eq!(failed_steps(&env, &id).await, ["RefundPayment"]);
    // And the manual-action queue's message became the order's case, parked, and people were told
    let case = handle_dead_letters::manual_action_case(&id);
    let cases = env.dead_letters("ManualActionQueue", 1, Status::Parked, 30).await;
    let parked = cases.iter().find(|d| d.dead_letter_id == case).expect("the order's case");
    assert_eq!((parked.status, parked.failure), (Status::Parked, Some(Failure::ManualAction)));
    assert!(
        parked.reason.starts_with(&format!("order {id} needs a person: RefundPayment kept failing (RefundRefused")),
        "{parked:?}"
    );
    let told = env.told(&pager, &[case.as_str()], 20).await;
    assert!(told.iter().any(|(_, m)| m.contains("orders retry-compensations")), "{told:?}");

    // When an operator retries its compensations (the refund is still refused: nothing fixed it)
    let operator = env.operator();
    let execution = operator.retry_compensations(&id, "ana", &env.sfn, env.state_machine()).await.expect("retry");
    // Then a new execution ran the compensations in reverse order, and flagged the order again
    let retried = wait_for_execution(&env, &execution).await;
    assert_eq!(retried.status, "FAILED");
    assert_eq!(retried.error.as_deref(), Some("NeedsManualAction"));
    let steps = env.steps(&retried).await;
    assert_eq!(steps[..2], ["CancelShipment", "RefundPayment"], "{steps:?}");
    // And the case came back to the same dead letter, seen twice, parked again
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let again = loop {
        let cases = env.dead_letters("ManualActionQueue", 1, Status::Parked, 5).await;
        let seen = cases.into_iter().find(|d| d.dead_letter_id == case && d.times_seen == 2);
        if let Some(seen) = seen.filter(|d| d.status == Status::Parked) {
            break seen;
        }
        assert!(std::time::Instant::now() < deadline, "the case did not come back");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(again.history.iter().any(|h| h.what == "redriven" && h.by.as_deref() == Some("ana")), "{again:?}");

    // When the operator settles it by hand, saying how
    assert!(operator.resolve_order(&id, "ana", " ").await.is_err(), "a note is needed");
    operator.resolve_order(&id, "ana", "refunded by bank transfer").await.expect("resolve");
    // Then the order is final, resolved by hand, and so is its case
    assert_eq!(env.repo.load::<Order>(&id).await.unwrap().state.status, OrderStatus::ManuallyResolved);
    let resolved = env.dead_letters("ManualActionQueue", 1, Status::Resolved, 20).await;
    assert!(resolved.iter().any(|d| d.dead_letter_id == case && d.status == Status::Resolved), "{resolved:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_in_a_provider_outage_waits_for_the_provider_and_the_order_is_cancelled_not_flagged() {
    // Given the payment provider failing every refund, and an order whose shipment is rejected
    let env = SagaEnv::start_with_parameters(&[("PaymentRetrySeconds", "1")]).await;
    env.provider_behaviour(&json!({ "service": "payments", "operation": "refund", "errorRate": 1.0 })).await;
    let id = env.place(env.sample("shipment-failed")).await;

    // Then its refund is parked, waiting for the provider, with a deadline
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let parked = loop {
        let history = env.events("Payment", &id).await;
        if let Some(parked) = history.into_iter().find(|e| e.event_type == "RefundPostponed") {
            break parked;
        }
        assert!(std::time::Instant::now() < deadline, "the refund was not parked");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(parked.payload["retryUntil"].as_str().is_some_and(|t| !t.is_empty()), "{parked:?}");
    // And it asks again while the provider is down (the refund calls keep coming)
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env.event_types("Order", &id).await.iter().all(|t| t != "OrderFlaggedForManualAction"));

    // When the provider recovers
    env.providers_normal().await;

    // Then the refund goes through and the order is cancelled: nothing left to a person
    let finished = env.finished(&id).await;
    assert_eq!(finished.status, "SUCCEEDED", "{finished:?}");
    let steps = env.steps(&finished).await;
    let refunds = steps.iter().filter(|s| *s == "RefundPayment").count();
    assert!(refunds >= 2, "the refund was tried again: {steps:?}");
    assert_eq!(steps.last().map(String::as_str), Some("CancelOrder"), "{steps:?}");
    assert_eq!(env.repo.load::<Order>(&id).await.unwrap().state.status, OrderStatus::Cancelled);
    assert!(matches!(env.repo.load::<Payment>(&id).await.unwrap().state, Payment::Refunded { .. }));
    // And the provider charged once and refunded once (its ledger says so)
    let ledger = env.provider_ledger(&id).await;
    let done = |op: &str| {
        ledger.iter().filter(|e| e["operation"] == op && e["status"].as_u64().is_some_and(|s| s < 300)).count()
    };
    assert_eq!((done("charge"), done("refund")), (1, 1), "{ledger:?}");
    // And its stock is back
    assert_released(&env, &id, &["SKU-RED-MUG", "SKU-BLUE-PLATE"]).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_that_outlasted_its_parking_limit_is_retried_by_an_operator_after_recovery_and_the_order_cancelled() {
    // Given refunds that may not wait for the provider at all, the provider failing every refund,
    // and an order whose shipment is rejected
    let env = SagaEnv::start_with_parameters(&[("PaymentParkingLimitSeconds", "0")]).await;
    env.provider_behaviour(&json!({ "service": "payments", "operation": "refund", "errorRate": 1.0 })).await;
    let id = env.place(env.sample("shipment-failed")).await;

    // Then its refund fails for good, and the order is flagged for a person
    let finished = env.finished(&id).await;
    assert_eq!(finished.error.as_deref(), Some("NeedsManualAction"), "{finished:?}");
    let order = env.repo.load::<Order>(&id).await.unwrap().state;
    assert_eq!(order.status, OrderStatus::NeedsManualAction);
    assert!(order.failed_actions[0].error.starts_with("PaymentProviderUnavailable"), "{order:?}");
    let ledger: Vec<Value> = env.provider_ledger(&id).await;
    let payments: Vec<&str> =
        ledger.iter().filter(|e| e["service"] == "payments").filter_map(|e| e["operation"].as_str()).collect();
    assert_eq!(payments, ["charge"], "the provider charged once and refunded nothing: {ledger:?}");

    // When the provider recovers and an operator retries the order's compensations
    env.providers_normal().await;
    let operator = env.operator();
    let execution = operator.retry_compensations(&id, "ana", &env.sfn, env.state_machine()).await.expect("retry");

    // Then the compensations run again and the order is cancelled: final, nothing left to a person
    // (its stock was already released by the first execution: releasing again changes nothing)
    let retried = wait_for_execution(&env, &execution).await;
    assert_eq!(retried.status, "SUCCEEDED", "{retried:?}");
    let steps = env.steps(&retried).await;
    assert_eq!(steps, ["CancelShipment", "RefundPayment", "ReleaseInventory", "CancelOrder"], "{steps:?}");
    assert_eq!(env.repo.load::<Order>(&id).await.unwrap().state.status, OrderStatus::Cancelled);
    // And the provider refunded it exactly once (its ledger, not our events, says so)
    let ledger = env.provider_ledger(&id).await;
    let refunds = ledger.iter().filter(|e| e["operation"] == "refund").count();
    assert_eq!(refunds, 1, "{ledger:?}");
    // And its stock is back
    assert_released(&env, &id, &["SKU-RED-MUG", "SKU-BLUE-PLATE"]).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_refund_no_longer_leaves_the_stock_reserved_and_the_order_names_each_failed_step() {
    // Given stock on hand and two orders whose customer cannot be notified, paid with a card
    // whose refunds the provider refuses: one shipped to an address whose shipment cannot be
    // cancelled either
    let env = SagaEnv::start().await;
    let skus = ["SKU-RED-MUG", "SKU-BLUE-PLATE"];
    let mut stock_before = Vec::new();
    for sku in skus {
        let stock = env.repo.load::<Inventory>(sku).await.unwrap().state;
        stock_before.push((stock.available, stock.reserved));
    }
    let refunds_refused = || {
        let mut order = env.sample("notification-failed");
        order["paymentToken"] = json!("tok_refund_fails");
        order
    };
    let refund_fails = env.place(refunds_refused()).await;
    let mut both = refunds_refused();
    both["shippingAddress"]["line1"] = json!("CANCEL-FAILS");
    let both_fail = env.place(both).await;

    // Then the first saga cancelled the shipment, failed the refund, and still released the stock
    let finished = env.finished(&refund_fails).await;
    assert_eq!(finished.error.as_deref(), Some("NeedsManualAction"), "{finished:?}");
    let steps = env.steps(&finished).await;
    assert_eq!(
        steps,
        [
            "ReserveInventory",
            "ChargePayment",
            "CreateShipment",
            "SendNotification",
            "CancelShipment",
            "RefundPayment",
            "ReleaseInventory",
            "FlagForManualAction",
            "ReportManualAction"
        ],
        "{steps:?}"
    );
    assert!(matches!(env.repo.load::<Shipment>(&refund_fails).await.unwrap().state, Shipment::Cancelled { .. }));
    let payment = env.repo.load::<Payment>(&refund_fails).await.unwrap().state;
    assert!(!matches!(payment, Payment::Refunded { .. }), "{payment:?}");
    // And the history shows the release entered after the refund's failure was recorded
    let release_input = entered_after_failure(&env, &finished, "RefundPayment", "ReleaseInventory").await;
    assert_eq!(release_input["compensationFailures"]["RefundPayment"]["Error"], "RefundRefused");
    // And the stock is back: its reservations released on the inventory streams
    assert_released(&env, &refund_fails, &skus).await;
    // And the order needs a person for exactly the refund, in the aggregate and on its stream
    let order = env.repo.load::<Order>(&refund_fails).await.unwrap().state;
    assert_eq!(order.status, OrderStatus::NeedsManualAction);
    assert_eq!(failed_steps(&env, &refund_fails).await, ["RefundPayment"]);
    let steps_of = |o: &Order| o.failed_actions.iter().map(|f| f.step.clone()).collect::<Vec<_>>();
    assert_eq!(steps_of(&order), ["RefundPayment"]);
    assert!(order.failed_actions[0].error.starts_with("RefundRefused"), "{order:?}");

    // And the second saga went on past both failed compensations and names both, in saga order
    let finished = env.finished(&both_fail).await;
    assert_eq!(finished.error.as_deref(), Some("NeedsManualAction"), "{finished:?}");
    let steps = env.steps(&finished).await;
    assert_eq!(
        steps[steps.len() - 5..],
        ["CancelShipment", "RefundPayment", "ReleaseInventory", "FlagForManualAction", "ReportManualAction"]
    );
    assert_eq!(failed_steps(&env, &both_fail).await, ["CancelShipment", "RefundPayment"]);
    assert_released(&env, &both_fail, &skus).await;
    let order = env.repo.load::<Order>(&both_fail).await.unwrap().state;
    assert_eq!(steps_of(&order), ["CancelShipment", "RefundPayment"]);
    // And no stock is held for either order, none lost
    for (sku, (available, reserved)) in skus.iter().zip(stock_before) {
        let stock = env.repo.load::<Inventory>(sku).await.unwrap().state;
        assert_eq!((stock.available, stock.reserved), (available, reserved), "{sku}");
    }
    env.stop().await;
}

/// Every reservation `id` made of `skus` is released.
async fn assert_released(env: &SagaEnv, id: &str, skus: &[&str]) {
    let order_id = shared::domain::OrderId::parse(id).expect("order id");
    for sku in skus {
        let stock = env.repo.load::<Inventory>(sku).await.unwrap().state;
        let reservation = stock.reservation(&order_id);
        assert!(matches!(reservation, Some(Reservation::Released(_))), "{id} {sku}: {reservation:?}");
    }
}

/// The steps the order's (latest) `OrderFlaggedForManualAction` names, decoded through the domain.
async fn failed_steps(env: &SagaEnv, id: &str) -> Vec<String> {
    let flagged = env
        .events("Order", id)
        .await
        .into_iter()
        .rev()
        .find(|e| e.event_type == "OrderFlaggedForManualAction")
        .expect("a flag event");
    match shared::aggregate::decode_event::<OrderEvent>(&flagged).expect("decodes") {
        OrderEvent::OrderFlaggedForManualAction { failures } => failures.into_iter().map(|f| f.step).collect(),
        other => panic!("{other:?}"),
    }
}

/// The input `next` was entered with, checking in the execution's history that it was entered
/// after `failed` failed (its last attempt's `TaskFailed`) and was caught.
async fn entered_after_failure(
    env: &SagaEnv,
    finished: &local_env::observe::Finished,
    failed: &str,
    next: &str,
) -> Value {
    use aws_sdk_sfn::types::HistoryEventType as T;
    let history = local_env::observe::history(&env.sfn, &finished.execution_arn).await.expect("history");
    let entered = |name: &str| {
        history.iter().position(|e| {
            e.r#type() == &T::TaskStateEntered && e.state_entered_event_details().is_some_and(|d| d.name() == name)
        })
    };
    let (from, to) = (entered(failed).expect("failed step entered"), entered(next).expect("next step entered"));
    assert!(from < to, "{next} entered before {failed}");
    assert!(
        history[from..to].iter().any(|e| e.r#type() == &T::TaskFailed),
        "{failed} did not fail before {next} was entered"
    );
    let input = history[to].state_entered_event_details().and_then(|d| d.input()).expect("input");
    serde_json::from_str(input).expect("JSON input")
}

/// Waits for an execution the test started by hand to end.
async fn wait_for_execution(env: &SagaEnv, arn: &str) -> local_env::observe::Finished {
    let name = arn.rsplit(':').next().expect("an execution ARN");
    local_env::observe::wait_for_saga(&env.sfn, env.state_machine(), name, Duration::from_secs(240))
        .await
        .expect("the execution ended")
}
