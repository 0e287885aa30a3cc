//! Dead letters end to end: the dead-letter handler's own binary consumes the stack's DLQs,
//! records each message in the event store, redrives transient failures and parks the rest.
//! (Poison messages parked, people told and an operator's discard: `tests/saga.rs`; a relay
//! record parked: `tests/cqrs.rs`.)

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use local_env::lambda::Faults;
use shared::adapters::dynamodb::readmodels::ReadModelStore;
use shared::domain::dead_letter::{DeadLetter, Failure, Status};
use shared::domain::order::{Order, OrderStatus};
use shared::readmodel::OrderView;
use system_tests::saga::SagaEnv;

/// Messages visible or in flight on the stack's queue `logical_id`.
async fn depth(env: &SagaEnv, logical_id: &str) -> u64 {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let got = env
        .aws
        .sqs()
        .get_queue_attributes()
        .queue_url(env.queue_url(logical_id))
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(A::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .expect("queue attributes");
    let attributes = got.attributes.unwrap_or_default();
    [A::ApproximateNumberOfMessages, A::ApproximateNumberOfMessagesNotVisible, A::ApproximateNumberOfMessagesDelayed]
        .iter()
        .map(|a| attributes.get(a).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_that_fails_until_it_recovers_is_dead_lettered_redriven_and_completes() {
    // Given the order-view projection crashing on every invocation (its queue redelivers each
    // message five times, then moves it to the DLQ)
    let env = SagaEnv::start().await;
    let crash = Faults { kill_after: Some(Duration::ZERO), ..Faults::default() };
    env.service.set_faults("OrderViewProjectionFunction", crash).expect("faults");

    // When an order goes through the saga
    let id = env.place(env.sample("happy-path")).await;
    assert_eq!(env.finished(&id).await.status, "SUCCEEDED");

    // Then its events reach the projection's DLQ and the handler redrives them automatically
    let redriven = env.dead_letters("OrderViewProjectionDlq", 1, Status::Redriven, 60).await;
    assert!(!redriven.is_empty(), "nothing was dead-lettered");
    let first = redriven.iter().find(|d| d.status == Status::Redriven).expect("one redriven");
    assert!(first.reason.contains("maxReceiveCount"), "{first:?}");
    assert_eq!(first.source.as_deref(), Some(&*env.stack.resources["OrderViewProjectionQueue"].attributes["Arn"]));

    // When the projection recovers
    env.service.set_faults("OrderViewProjectionFunction", Faults::default()).expect("faults cleared");

    // Then every redriven event is projected: the order view completes, the queue and its DLQ
    // drain, and no dead letter is parked (none came back past the bound)
    let models = ReadModelStore::new(env.aws.dynamodb(), &env.stack.environment["READ_MODEL_TABLE"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let view = models.get::<OrderView>(&shared::readmodel::order_key(&id)).await.expect("get").map(|(v, _)| v);
        let drained = depth(&env, "OrderViewProjectionQueue").await + depth(&env, "OrderViewProjectionDlq").await == 0;
        if view.as_ref().is_some_and(|v| v.status == "Completed") && drained {
            break;
        }
        assert!(Instant::now() < deadline, "not projected after the redrive: {view:?}, drained: {drained}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all = env.dead_letters("OrderViewProjectionDlq", usize::MAX, Status::Parked, 1).await;
    assert!(all.iter().all(|d| d.status == Status::Redriven), "{all:?}");
    assert!(all.iter().all(|d| d.history.iter().any(|h| h.what == "redriven" && h.by.as_deref() == Some("automatic"))));
    assert_eq!(env.repo.load::<Order>(&id).await.expect("order").state.status, OrderStatus::Completed);
    env.stop().await;
}

/// The dead letters recorded in the stack's event store (a test's small table: scanned).
async fn dead_letters_in_store(env: &SagaEnv) -> Vec<DeadLetter> {
    let found = env
        .aws
        .dynamodb()
        .scan()
        .table_name(&env.stack.environment["EVENTS_TABLE"])
        .filter_expression("begins_with(streamId, :p) AND version = :one")
        .expression_attribute_values(":p", AttributeValue::S("DeadLetter-".into()))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("scan");
    let mut letters = Vec::new();
    for item in found.items() {
        let stream = item.get("streamId").and_then(|v| v.as_s().ok()).expect("streamId");
        let id = stream.trim_start_matches("DeadLetter-");
        letters.push(env.repo.load::<DeadLetter>(id).await.expect("load").state);
    }
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_batch_the_relay_skipped_is_replayed_from_the_stream_once_the_relay_recovers() {
    // Given the outbox relay crashing on every invocation: after its retries the stream mapping
    // skips the batch and sends a pointer to its positions to the relay's DLQ
    let env = SagaEnv::start().await;
    let crash = Faults { kill_after: Some(Duration::ZERO), ..Faults::default() };
    env.service.set_faults("OutboxRelayFunction", crash).expect("faults");

    // When an order is placed (the saga does not need the relay: it runs to the end)
    let id = env.place(env.sample("happy-path")).await;
    assert_eq!(env.finished(&id).await.status, "SUCCEEDED");

    // Then a skipped batch is recorded as a dead letter, and its replays fail while the relay does
    let deadline = Instant::now() + Duration::from_secs(90);
    let skipped = loop {
        let letters = dead_letters_in_store(&env).await;
        if let Some(d) = letters.into_iter().find(|d| d.failure() == Some(Failure::StreamBatch)) {
            break d;
        }
        assert!(Instant::now() < deadline, "no skipped batch was dead-lettered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reason = &skipped.first.as_ref().expect("arrival").reason;
    assert!(reason.contains("OutboxRelayFunction skipped") && reason.contains("RetryAttemptsExhausted"), "{reason}");

    // When the relay recovers
    env.service.set_faults("OutboxRelayFunction", Faults::default()).expect("faults cleared");

    // Then every skipped batch is replayed from the stream to the relay, which publishes it: each
    // dead letter ends resolved by a replay that handed over at least one record
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let letters = dead_letters_in_store(&env).await;
        let batches: Vec<&DeadLetter> = letters.iter().filter(|d| d.failure() == Some(Failure::StreamBatch)).collect();
        assert!(batches.iter().all(|d| d.status != Status::Parked), "{batches:?}");
        if batches.iter().all(|d| d.status == Status::Resolved) {
            for d in &batches {
                let events = env.event_types("DeadLetter", &d.id).await;
                assert_eq!(events.last().map(String::as_str), Some("DeadLetterReplayed"), "{events:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "not all replayed: {batches:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let replayed = env.events("DeadLetter", &skipped.id).await;
    let records = replayed.last().and_then(|e| e.payload["records"].as_u64()).unwrap_or(0);
    assert!(records >= 1, "{replayed:?}");
    // And the read side has the order, completed
    let models = ReadModelStore::new(env.aws.dynamodb(), &env.stack.environment["READ_MODEL_TABLE"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = models.get::<OrderView>(&shared::readmodel::order_key(&id)).await.expect("get").map(|(v, _)| v);
        if view.as_ref().is_some_and(|v| v.status == "Completed") {
            break;
        }
        assert!(Instant::now() < deadline, "the order view did not heal: {view:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.stop().await;
}
