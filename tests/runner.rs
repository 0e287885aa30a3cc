//! The local runner: event source mappings from the template's `Events`, checked through their
//! effects on the emulators (what was handled, what is left on the queue, what reached the DLQ).
//! The functions here are scripted doubles behind the runner's `Invoke` seam, so each test
//! decides what a function answers; the Lambda service's own behaviour (timeouts, crashes) is
//! tested with the real binaries in `tests/lambda.rs` and `tests/saga.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lambda_events::event::dynamodb::Event as DynamoDbEvent;
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::QueueAttributeName;
use local_env::runner::{BoxFuture, Invoke, Runner, RunnerClients};
use local_env::{Options, Stack, Template};
use serde::Serialize;
use serde::de::DeserializeOwned;
use system_tests::{LocalAws, unique, workspace_root};

async fn provision(aws: &LocalAws) -> Stack {
    let template = Template::load(&workspace_root().join("tests/fixtures/runner.yaml")).expect("fixture loads");
    let options = Options {
        stack_name: unique("r"),
        region: aws.var("AWS_REGION"),
        account_id: "000000000000".into(),
        parameter_overrides: Default::default(),
    };
    let stack = local_env::provision(&template, &options, &aws.provisioning_clients()).await.expect("provisions");
    assert!(stack.failed().is_empty(), "{}", local_env::report(&stack));
    stack
}

fn clients(aws: &LocalAws) -> RunnerClients {
    RunnerClients { sqs: aws.sqs(), streams: aws.dynamodb_streams() }
}

/// Polls `done` until it holds or the time is up.
async fn eventually(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

async fn send(sqs: &aws_sdk_sqs::Client, url: &str, bodies: &[&str]) {
    for body in bodies {
        sqs.send_message().queue_url(url).message_body(*body).send().await.expect("send");
    }
}

/// Visible plus in-flight messages.
async fn messages_on(sqs: &aws_sdk_sqs::Client, url: &str) -> u64 {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("attributes");
    let attrs = attrs.attributes().expect("attributes");
    let count = |name: QueueAttributeName| attrs.get(&name).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    count(QueueAttributeName::ApproximateNumberOfMessages)
        + count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
}

/// Receives (and deletes) whatever arrives within `within`, until `expected` messages.
async fn drain(sqs: &aws_sdk_sqs::Client, url: &str, expected: usize, within: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut bodies = Vec::new();
    while bodies.len() < expected && start.elapsed() < within {
        let got = sqs.receive_message().queue_url(url).max_number_of_messages(10).wait_time_seconds(1).send().await;
        for m in got.expect("receive").messages.unwrap_or_default() {
            bodies.push(m.body.clone().unwrap_or_default());
            sqs.delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle.unwrap_or_default())
                .send()
                .await
                .expect("delete");
        }
    }
    bodies.sort();
    bodies
}

type Scripted = Arc<dyn Fn(Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> + Send + Sync>;

/// Functions by logical id, each answering as its closure says.
struct Functions(HashMap<String, Scripted>);

impl Invoke for Functions {
    fn serves(&self, function: &str) -> bool {
        self.0.contains_key(function)
    }

    fn invoke(&self, function: &str, payload: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        match self.0.get(function) {
            Some(f) => f(payload),
            None => Box::pin(async move { Err("not served".to_owned()) }),
        }
    }
}

/// A function taking Lambda's event `E` and answering `R` (or a function error).
fn function<E, R, F, Fut>(id: &str, f: F) -> Arc<dyn Invoke>
where
    E: DeserializeOwned + Send + 'static,
    R: Serialize + Send + 'static,
    F: Fn(E) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, String>> + Send + 'static,
{
    let f = Arc::new(f);
    let scripted: Scripted = Arc::new(move |payload: Vec<u8>| {
        let f = f.clone();
        Box::pin(async move {
            let event: E = serde_json::from_slice(&payload).map_err(|e| format!("not Lambda's event: {e}"))?;
            let response = f(event).await?;
            serde_json::to_vec(&response).map_err(|e| e.to_string())
        })
    });
    Arc::new(Functions(HashMap::from([(id.to_owned(), scripted)])))
}

fn sqs_handler<F, Fut>(f: F) -> Arc<dyn Invoke>
where
    F: Fn(SqsEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<SqsBatchResponse, String>> + Send + 'static,
{
    function("Worker", f)
}

fn stream_handler<F, Fut>(f: F) -> Arc<dyn Invoke>
where
    F: Fn(DynamoDbEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<DynamoDbEventResponse, String>> + Send + 'static,
{
    function("Projector", f)
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
struct Item {
    pk: String,
    kind: String,
    n: u32,
}

async fn put_item(aws: &LocalAws, table: &str, pk: &str, kind: &str, n: u32) {
    aws.dynamodb()
        .put_item()
        .table_name(table)
        .item("pk", AttributeValue::S(pk.to_owned()))
        .item("kind", AttributeValue::S(kind.to_owned()))
        .item("n", AttributeValue::N(n.to_string()))
        .send()
        .await
        .expect("put");
}

/// The items of a delivered batch, decoded from their NewImage.
fn items(event: &DynamoDbEvent) -> Vec<(Item, String)> {
    event
        .records
        .iter()
        .map(|r| {
            let item: Item = serde_dynamo::from_item(r.change.new_image.clone()).expect("NewImage decodes");
            (item, r.change.sequence_number.clone().unwrap_or_default())
        })
        .collect()
}

#[tokio::test]
async fn sqs_batch_item_failures_delete_the_rest_and_poison_ends_in_the_dlq() {
    // Given the fixture, and a Worker handler that fails the poison messages item by item
    let aws = LocalAws::load().await;
    let stack = provision(&aws).await;
    let work_url = stack.resources["WorkQueue"].reference.clone();
    let dlq_url = stack.resources["WorkDlq"].reference.clone();
    let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let events: Arc<Mutex<Vec<SqsEvent>>> = Arc::default();
    let (h, e) = (handled.clone(), events.clone());
    let handlers = sqs_handler(move |event: SqsEvent| {
        let (handled, events) = (h.clone(), e.clone());
        async move {
            let mut response = SqsBatchResponse::default();
            for record in &event.records {
                let body = record.body.clone().unwrap_or_default();
                *handled.lock().unwrap().entry(body.clone()).or_default() += 1;
                if body.contains("poison") {
                    response.add_failure(record.message_id.clone().unwrap_or_default());
                }
            }
            events.lock().unwrap().push(event);
            Ok(response)
        }
    });
    let runner = Runner::new(&stack, clients(&aws), handlers).expect("runner");
    let mappings = runner.mappings();
    assert_eq!(mappings.len(), 1, "{mappings:?}");
    assert!(mappings[0].starts_with("Worker.Work: SQS arn:aws:sqs:"), "{mappings:?}");
    assert!(mappings[0].contains("BatchSize 5") && mappings[0].contains("ReportBatchItemFailures"), "{mappings:?}");
    let skipped = runner.skipped().join("\n");
    assert!(skipped.contains("Worker.Http (HttpApi)"), "{skipped}");
    assert!(skipped.contains("Projector.Items (DynamoDB): Projector is not served"), "{skipped}");
    let running = runner.start();

    // When 6 messages arrive, 2 of them poison
    let sqs = aws.sqs();
    send(&sqs, &work_url, &["good-1", "poison-1", "good-2", "good-3", "poison-2", "good-4"]).await;

    // Then the poison ones reach the DLQ after maxReceiveCount (2) receives
    let dead = drain(&sqs, &dlq_url, 2, Duration::from_secs(15)).await;
    assert_eq!(dead, ["poison-1", "poison-2"]);
    // (a little longer than the visibility timeout: anything not deleted would show up again)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.stop().await;

    // And the good ones were handled exactly once each and are gone; the poison ones twice
    let handled = handled.lock().unwrap().clone();
    for good in ["good-1", "good-2", "good-3", "good-4"] {
        assert_eq!(handled.get(good), Some(&1), "{good}: {handled:?}");
    }
    for poison in ["poison-1", "poison-2"] {
        assert_eq!(handled.get(poison), Some(&2), "{poison}: {handled:?}");
    }
    assert_eq!(messages_on(&sqs, &work_url).await, 0, "the work queue is empty");
    assert!(drain(&sqs, &dlq_url, 1, Duration::from_secs(1)).await.is_empty(), "only the poison was dead-lettered");

    // And the events had Lambda's shape
    let events = events.lock().unwrap();
    assert!(events.iter().all(|e| (1..=5).contains(&e.records.len())), "BatchSize 5");
    let record = &events[0].records[0];
    assert_eq!(record.event_source.as_deref(), Some("aws:sqs"));
    assert_eq!(record.event_source_arn.as_ref(), Some(&stack.resources["WorkQueue"].attributes["Arn"]));
    assert_eq!(record.aws_region.as_deref(), Some(aws.var("AWS_REGION").as_str()));
    assert!(record.receipt_handle.is_some() && record.md5_of_body.is_some());
    assert!(record.attributes.contains_key("SentTimestamp"), "{:?}", record.attributes);
    assert!(record.attributes.contains_key("ApproximateReceiveCount"), "{:?}", record.attributes);
}

#[tokio::test]
async fn a_function_error_deletes_nothing_and_the_batch_comes_back() {
    // Given a Worker handler that fails every batch holding a message it has not seen before
    let aws = LocalAws::load().await;
    let stack = provision(&aws).await;
    let work_url = stack.resources["WorkQueue"].reference.clone();
    let dlq_url = stack.resources["WorkDlq"].reference.clone();
    let sqs = aws.sqs();
    // (sent before the runner starts, so that every first delivery fails in the same round)
    send(&sqs, &work_url, &["a", "b", "c"]).await;
    // body -> the ApproximateReceiveCount of each delivery
    let deliveries: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let d = deliveries.clone();
    let handlers = sqs_handler(move |event: SqsEvent| {
        let deliveries = d.clone();
        async move {
            let mut deliveries = deliveries.lock().unwrap();
            let mut first_seen = false;
            for record in &event.records {
                let seen = deliveries.entry(record.body.clone().unwrap_or_default()).or_default();
                first_seen |= seen.is_empty();
                seen.push(record.attributes.get("ApproximateReceiveCount").cloned().unwrap_or_default());
            }
            if first_seen { Err("boom".to_owned()) } else { Ok(SqsBatchResponse::default()) }
        }
    });
    let running = Runner::new(&stack, clients(&aws), handlers).expect("runner").start();

    // When the first delivery fails, Then every message comes back once and is then deleted
    let d = deliveries.clone();
    let redelivered = eventually(Duration::from_secs(15), || {
        let d = d.lock().unwrap();
        d.len() == 3 && d.values().all(|v| v.len() >= 2)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.stop().await;
    let deliveries = deliveries.lock().unwrap().clone();
    assert!(redelivered, "{deliveries:?}");
    for body in ["a", "b", "c"] {
        assert_eq!(deliveries[body], ["1", "2"], "{body}: received twice, then deleted");
    }
    assert_eq!(messages_on(&sqs, &work_url).await, 0, "the work queue is empty");
    assert!(drain(&sqs, &dlq_url, 1, Duration::from_secs(1)).await.is_empty(), "nothing was dead-lettered");
}

#[tokio::test]
async fn a_stream_delivers_only_what_the_filter_matches_in_order() {
    // Given a Projector handler recording what it sees, the runner started first
    let aws = LocalAws::load().await;
    let stack = provision(&aws).await;
    let table = stack.resources["Items"].reference.clone();
    let seen: Arc<Mutex<Vec<(Item, String)>>> = Arc::default();
    let events: Arc<Mutex<Vec<DynamoDbEvent>>> = Arc::default();
    let (s, e) = (seen.clone(), events.clone());
    let handlers = stream_handler(move |event: DynamoDbEvent| {
        let (seen, events) = (s.clone(), e.clone());
        async move {
            seen.lock().unwrap().extend(items(&event));
            events.lock().unwrap().push(event);
            Ok(DynamoDbEventResponse::default())
        }
    });
    let runner = Runner::new(&stack, clients(&aws), handlers).expect("runner");
    let mappings = runner.mappings();
    assert_eq!(mappings.len(), 1, "{mappings:?}");
    assert!(mappings[0].starts_with("Projector.Items: DynamoDB arn:aws:dynamodb:"), "{mappings:?}");
    assert!(mappings[0].contains("TRIM_HORIZON") && mappings[0].contains("1 filter"), "{mappings:?}");
    let running = runner.start();

    // When 3 wanted and 2 other items are written, interleaved, and one wanted item is modified
    let id = unique("i");
    let kinds = ["wanted", "other", "wanted", "other", "wanted"];
    for (n, kind) in kinds.iter().enumerate() {
        put_item(&aws, &table, &format!("{id}-{n}"), kind, n as u32).await;
    }
    put_item(&aws, &table, &format!("{id}-0"), "wanted", 10).await;

    // Then the handler sees exactly the 3 wanted inserts, in order, their NewImage decoded
    let s = seen.clone();
    eventually(Duration::from_secs(15), || s.lock().unwrap().len() >= 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.stop().await;
    let seen = seen.lock().unwrap().clone();
    let got: Vec<Item> = seen.iter().map(|(item, _)| item.clone()).collect();
    let expected: Vec<Item> =
        [0, 2, 4].iter().map(|&n| Item { pk: format!("{id}-{n}"), kind: "wanted".into(), n }).collect();
    assert_eq!(got, expected);
    let sequences: Vec<u128> = seen.iter().map(|(_, s)| s.parse().expect("numeric sequence number")).collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "in stream order: {sequences:?}");
    let events = events.lock().unwrap();
    let record = &events[0].records[0];
    assert_eq!(record.event_name, "INSERT");
    assert_eq!(record.event_source.as_deref(), Some("aws:dynamodb"));
    assert_eq!(record.event_source_arn.as_ref(), Some(&stack.resources["Items"].attributes["StreamArn"]));
    assert!(record.change.keys.contains_key("pk"));
}

#[tokio::test]
async fn a_batch_item_failure_redelivers_from_that_record_on() {
    // Given 3 wanted items already in the stream (so they come in one batch)
    let aws = LocalAws::load().await;
    let stack = provision(&aws).await;
    let table = stack.resources["Items"].reference.clone();
    let id = unique("i");
    for n in 1..=3 {
        put_item(&aws, &table, &format!("{id}-{n}"), "wanted", n).await;
    }
    // And a handler that fails record #2 the first time it sees it
    let batches: Arc<Mutex<Vec<Vec<u32>>>> = Arc::default();
    let b = batches.clone();
    let handlers = stream_handler(move |event: DynamoDbEvent| {
        let batches = b.clone();
        async move {
            let mut batches = batches.lock().unwrap();
            let first_time = !batches.iter().flatten().any(|&n| n == 2);
            let items = items(&event);
            batches.push(items.iter().map(|(item, _)| item.n).collect());
            let mut response = DynamoDbEventResponse::default();
            if let Some((_, sequence)) = items.iter().find(|(item, _)| item.n == 2 && first_time) {
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = Some(sequence.clone());
                response.batch_item_failures.push(failure);
            }
            Ok(response)
        }
    });
    let running = Runner::new(&stack, clients(&aws), handlers).expect("runner").start();

    // When it runs, Then #2 and #3 are redelivered, #1 is not, and everything ends up handled
    let b = batches.clone();
    eventually(Duration::from_secs(15), || b.lock().unwrap().len() >= 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.stop().await;
    assert_eq!(*batches.lock().unwrap(), [vec![1, 2, 3], vec![2, 3]]);
}

/// The `n` and sequence number of each item of a delivered batch.
type Batch = Vec<(u32, String)>;

#[tokio::test]
async fn retries_exhausted_skip_the_batch_record_it_on_failure_and_move_on() {
    // Given an Auditor (MaximumRetryAttempts: 1, OnFailure: a queue) that always fails item 1
    let aws = LocalAws::load().await;
    let stack = provision(&aws).await;
    let table = stack.resources["Items"].reference.clone();
    let failures_url = stack.resources["AuditFailures"].reference.clone();
    let id = unique("i");
    put_item(&aws, &table, &format!("{id}-1"), "other", 1).await;
    let calls: Arc<Mutex<Vec<Batch>>> = Arc::default();
    let c = calls.clone();
    let handlers = function("Auditor", move |event: DynamoDbEvent| {
        let calls = c.clone();
        async move {
            let items: Batch = items(&event).into_iter().map(|(item, seq)| (item.n, seq)).collect();
            let fails = items.iter().any(|(n, _)| *n == 1);
            calls.lock().unwrap().push(items);
            if fails { Err("always fails".to_owned()) } else { Ok(DynamoDbEventResponse::default()) }
        }
    });
    let runner = Runner::new(&stack, clients(&aws), handlers).expect("runner");
    let mappings = runner.mappings();
    assert!(
        mappings[0].contains("MaximumRetryAttempts 1") && mappings[0].contains("OnFailure arn:aws:sqs:"),
        "{mappings:?}"
    );
    let running = runner.start();

    // When its retries are exhausted, Then the batch is recorded on the failure queue
    let sqs = aws.sqs();
    let recorded = drain(&sqs, &failures_url, 1, Duration::from_secs(10)).await;
    // And the shard moves on to what comes next
    put_item(&aws, &table, &format!("{id}-2"), "other", 2).await;
    let c = calls.clone();
    let moved_on =
        eventually(Duration::from_secs(10), || c.lock().unwrap().iter().flatten().any(|(n, _)| *n == 2)).await;
    running.stop().await;

    let calls = calls.lock().unwrap().clone();
    assert!(moved_on, "{calls:?}");
    let first: Vec<u32> = calls.iter().map(|batch| batch[0].0).collect();
    assert_eq!(first, [1, 1, 2], "invoked, retried once, skipped; then the next record");
    assert_eq!(recorded.len(), 1, "one failure record");
    let record: serde_json::Value = serde_json::from_str(&recorded[0]).expect("json");
    let info = &record["DDBStreamBatchInfo"];
    assert_eq!(record["requestContext"]["condition"], "RetryAttemptsExhausted");
    assert_eq!(record["requestContext"]["approximateInvokeCount"], 2);
    assert_eq!(record["requestContext"]["functionArn"], stack.resources["Auditor"].attributes["Arn"]);
    assert_eq!(info["startSequenceNumber"], calls[0][0].1);
    assert_eq!(info["endSequenceNumber"], calls[0][0].1);
    assert_eq!(info["batchSize"], 1);
    assert_eq!(info["streamArn"], stack.resources["Items"].attributes["StreamArn"]);
}

#[tokio::test]
async fn a_new_runner_resumes_the_stream_where_the_last_one_stopped() {
    // Given a runner keeping its positions in a file, which handled two wanted items
    let aws = LocalAws::load().await;
    let stack = provision(&aws).await;
    let table = stack.resources["Items"].reference.clone();
    let file = std::env::temp_dir().join(format!("{}.json", unique("positions-")));
    let id = unique("i");
    let recording = |seen: Arc<Mutex<Vec<u32>>>| {
        stream_handler(move |event: DynamoDbEvent| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().extend(items(&event).into_iter().map(|(item, _)| item.n));
                Ok(DynamoDbEventResponse::default())
            }
        })
    };
    let first: Arc<Mutex<Vec<u32>>> = Arc::default();
    let running = Runner::new(&stack, clients(&aws), recording(first.clone())).expect("runner").with_checkpoints(&file);
    let running = running.start();
    for n in 1..=2 {
        put_item(&aws, &table, &format!("{id}-{n}"), "wanted", n).await;
    }
    let f = first.clone();
    assert!(eventually(Duration::from_secs(15), || f.lock().unwrap().len() >= 2).await);
    running.stop().await;
    assert!(file.exists(), "the positions are saved when the runner stops");

    // When a new runner starts with the same file and one more item is written
    let second: Arc<Mutex<Vec<u32>>> = Arc::default();
    let running =
        Runner::new(&stack, clients(&aws), recording(second.clone())).expect("runner").with_checkpoints(&file).start();
    put_item(&aws, &table, &format!("{id}-3"), "wanted", 3).await;
    let s = second.clone();
    assert!(eventually(Duration::from_secs(15), || !s.lock().unwrap().is_empty()).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    running.stop().await;

    // Then it delivers only the new item, while a runner without positions replays them all
    assert_eq!(*second.lock().unwrap(), [3]);
    let replay: Arc<Mutex<Vec<u32>>> = Arc::default();
    let running = Runner::new(&stack, clients(&aws), recording(replay.clone())).expect("runner").start();
    let r = replay.clone();
    assert!(eventually(Duration::from_secs(15), || r.lock().unwrap().len() >= 3).await);
    running.stop().await;
    assert_eq!(*replay.lock().unwrap(), [1, 2, 3]);
    let _ = std::fs::remove_file(&file);
}

#[tokio::test]
async fn with_a_parallelization_factor_batches_run_at_once_and_each_key_keeps_its_order() {
    // Given 8 keys with 5 versions each, written interleaved, already in the stream
    let aws = LocalAws::load().await;
    let stack = provision(&aws).await;
    let table = stack.resources["Versions"].reference.clone();
    let id = unique("v");
    for n in 1..=5 {
        for k in 0..8 {
            put_item(&aws, &table, &format!("{id}-{k}"), "version", n).await;
        }
    }
    // And a Fanout handler (BatchSize 5, ParallelizationFactor 4) that takes a while per batch,
    // noting which keys are in flight
    #[derive(Default)]
    struct Seen {
        in_flight: Vec<String>,
        most_batches_at_once: usize,
        batches_at_once: usize,
        shared_keys: Vec<String>,
        versions: HashMap<String, Vec<u32>>,
        batch_sizes: Vec<usize>,
    }
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s = seen.clone();
    let handlers = function("Fanout", move |event: DynamoDbEvent| {
        let seen = s.clone();
        async move {
            let items: Vec<Item> = items(&event).into_iter().map(|(item, _)| item).collect();
            {
                let mut seen = seen.lock().unwrap();
                seen.batches_at_once += 1;
                seen.most_batches_at_once = seen.most_batches_at_once.max(seen.batches_at_once);
                seen.batch_sizes.push(items.len());
                for item in &items {
                    if seen.in_flight.contains(&item.pk) {
                        seen.shared_keys.push(item.pk.clone());
                    }
                    seen.versions.entry(item.pk.clone()).or_default().push(item.n);
                }
                let keys: Vec<String> = items.iter().map(|i| i.pk.clone()).collect();
                seen.in_flight.extend(keys);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut seen = seen.lock().unwrap();
            seen.batches_at_once -= 1;
            for item in &items {
                if let Some(at) = seen.in_flight.iter().position(|k| *k == item.pk) {
                    seen.in_flight.remove(at);
                }
            }
            Ok::<_, String>(DynamoDbEventResponse::default())
        }
    });
    let runner = Runner::new(&stack, clients(&aws), handlers).expect("runner");
    assert!(runner.mappings().iter().any(|m| m.contains("ParallelizationFactor 4")), "{:?}", runner.mappings());
    let running = runner.start();

    // When the runner has delivered all 40 records
    let s = seen.clone();
    let all =
        eventually(Duration::from_secs(30), || s.lock().unwrap().versions.values().map(Vec::len).sum::<usize>() >= 40)
            .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;

    // Then each key's versions came once each, in order; no key was in two batches at once;
    // batches kept to BatchSize; and more than one batch was in flight at a time
    assert!(all, "not every record was delivered");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.versions.len(), 8);
    for (key, versions) in &seen.versions {
        assert_eq!(*versions, [1, 2, 3, 4, 5], "{key}");
    }
    assert!(seen.shared_keys.is_empty(), "keys in two batches at once: {:?}", seen.shared_keys);
    assert!(seen.batch_sizes.iter().all(|&n| (1..=5).contains(&n)), "{:?}", seen.batch_sizes);
    assert!(seen.most_batches_at_once >= 2, "at most {} batch at once", seen.most_batches_at_once);
    assert!(seen.most_batches_at_once <= 4, "{} batches at once", seen.most_batches_at_once);
}
