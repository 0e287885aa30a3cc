//! CQRS on the emulators: the outbox relay (the store's DynamoDB stream → EventBridge), the
//! projections (EventBridge rules → SQS → projection Lambdas → read models), and the rebuild.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use outbox_relay::{Bus, BusEntry, EventBridgeBus, Relay};
use serde_json::{Value, json};
use shared::adapters::dynamodb::DynamoEventStore;
use shared::adapters::dynamodb::readmodels::ReadModelStore;
use shared::adapters::sqs::SqsDeadLetters;
use shared::aggregate::{CommandContext, Repository};
use shared::deadline::Deadline;
use shared::domain::dead_letter::Status;
use shared::domain::order::{Order, OrderCommand, OrderRequest};
use shared::domain::payment::{Payment, PaymentCommand};
use shared::domain::shipment::{Shipment, ShipmentCommand};
use shared::eventstore::{EventStore, NewEvent, RecordedEvent, StreamId};
use shared::lambda::projections::ProjectionLambda;
use shared::readmodel::OrderView;
use shared::retry::RetryPolicy;
use system_tests::invoke::{Except, Replace};
use system_tests::saga::SagaEnv;
use system_tests::{LocalAws, unique};

/// EventBridge, except that every other entry is refused once (as `ThrottlingException`) the
/// first time it is offered: a partly failed PutEvents.
struct FlakyBus {
    inner: EventBridgeBus,
    refused: Mutex<HashSet<String>>,
    injected: Arc<AtomicU32>,
}

impl Bus for FlakyBus {
    async fn put(&self, entries: &[BusEntry]) -> Result<Vec<Option<String>>, String> {
        let mut forward = Vec::new();
        let mut results: Vec<Option<Option<String>>> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let refuse = i % 2 == 1 && self.refused.lock().expect("lock").insert(entry.detail.clone());
            if refuse {
                self.injected.fetch_add(1, Ordering::SeqCst);
                results.push(Some(Some("ThrottlingException".into())));
            } else {
                forward.push(entry.clone());
                results.push(None);
            }
        }
        let mut forwarded = self.inner.put(&forward).await?.into_iter();
        Ok(results.into_iter().map(|r| r.unwrap_or_else(|| forwarded.next().flatten())).collect())
    }
}

async fn capture_queue(aws: &LocalAws, bus: &str, source: &str) -> String {
    let sqs = aws.sqs();
    let name = unique("capture-");
    let url =
        sqs.create_queue().queue_name(&name).send().await.expect("queue").queue_url().unwrap_or_default().to_owned();
    let arn = format!("arn:aws:sqs:{}:000000000000:{name}", aws.var("AWS_REGION"));
    let events = aws.eventbridge();
    events
        .put_rule()
        .name(&name)
        .event_bus_name(bus)
        .event_pattern(json!({ "source": [source] }).to_string())
        .send()
        .await
        .expect("rule");
    let target = aws_sdk_eventbridge::types::Target::builder().id("capture").arn(arn).build().expect("target");
    events.put_targets().rule(&name).event_bus_name(bus).targets(target).send().await.expect("targets");
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_reaches_the_bus_exactly_once_per_stream_position_despite_partial_failures() {
    // Given the relay publishing through a bus that refuses some entries once
    let injected = Arc::new(AtomicU32::new(0));
    let counter = injected.clone();
    // (the relay's own binary cannot be handed a faulty bus: it runs in this process, over the
    // real EventBridge, fed by the real stream mapping; every other function is its binary)
    let aws = LocalAws::load().await;
    let events_client = aws.eventbridge();
    let dlq_client = aws.sqs();
    let env = SagaEnv::start_with(move |stack, service| {
        let bus_name = stack.outputs["OrderEventsBusName"].clone();
        let inner = EventBridgeBus { client: events_client, bus_name };
        let bus = FlakyBus { inner, refused: Mutex::new(HashSet::new()), injected: counter };
        let retry = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
        };
        let dead_letters = SqsDeadLetters {
            client: dlq_client.into(),
            queue_url: stack.functions["OutboxRelayFunction"]["DEAD_LETTER_QUEUE_URL"].clone(),
        };
        let relay = Arc::new(Relay { bus, retry, dead_letters });
        Arc::new(Replace {
            inner: service,
            function: "OutboxRelayFunction",
            handle: move |event: Value| {
                let relay = relay.clone();
                async move {
                    let event = serde_json::from_value(event).map_err(|e| e.to_string())?;
                    serde_json::to_value(outbox_relay::handle(&relay, event, shared::deadline::Deadline::never()).await)
                        .map_err(|e| e.to_string())
                }
            },
        })
    })
    .await;
    let capture = capture_queue(&env.aws, &env.stack.outputs["OrderEventsBusName"], "order-saga.Tally").await;

    // When 60 events are committed on 6 streams
    let mut expected = BTreeSet::new();
    for s in 0..6 {
        let stream = StreamId::new("Tally", &unique("relay-")).expect("id");
        for batch in 0..2u64 {
            let events: Vec<NewEvent> = (0..5)
                .map(|i| NewEvent::new("EntryRecorded", 2, json!({ "writer": "r", "seq": i, "note": "" })))
                .collect();
            env.repo.store().append(&stream, batch * 5, events, None).await.expect("append");
        }
        expected.extend((1..=10).map(|v| format!("{stream}/{v}")));
        let _ = s;
    }

    // Then each stream position arrives on the bus once: no loss, no duplicate
    let sqs = env.aws.sqs();
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut quiet_since = None;
    while Instant::now() < deadline {
        let got = sqs
            .receive_message()
            .queue_url(&capture)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("rx");
        for m in got.messages() {
            let body: Value = serde_json::from_str(m.body().unwrap_or_default()).expect("event");
            seen.push(body["detail"]["id"].as_str().unwrap_or_default().to_owned());
            sqs.delete_message()
                .queue_url(&capture)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await
                .expect("del");
        }
        if seen.len() >= expected.len() {
            // Keep listening briefly: a duplicate would show up now.
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
    }
    assert!(injected.load(Ordering::SeqCst) >= 10, "failures were injected");
    let distinct: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(distinct, expected, "every position published");
    assert_eq!(seen.len(), expected.len(), "and none twice");
    env.stop().await;
}

async fn create_read_model_table(aws: &LocalAws) -> String {
    let name = unique("rm-");
    let attr = |n: &str| {
        AttributeDefinition::builder().attribute_name(n).attribute_type(ScalarAttributeType::S).build().expect("a")
    };
    let key = |n: &str, t| KeySchemaElement::builder().attribute_name(n).key_type(t).build().expect("k");
    let gsi = GlobalSecondaryIndex::builder()
        .index_name("byCustomer")
        .key_schema(key("gsi1pk", KeyType::Hash))
        .key_schema(key("gsi1sk", KeyType::Range))
        .projection(Projection::builder().projection_type(ProjectionType::All).build())
        .build()
        .expect("gsi");
    aws.dynamodb()
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("pk"))
        .attribute_definitions(attr("sk"))
        .attribute_definitions(attr("gsi1pk"))
        .attribute_definitions(attr("gsi1sk"))
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .global_secondary_indexes(gsi)
        .send()
        .await
        .expect("create table");
    name
}

type Items = BTreeMap<(String, String), HashMap<String, AttributeValue>>;

/// Every read model item of a table, without the write bookkeeping (revision, applied markers).
async fn read_models(aws: &LocalAws, table: &str) -> Items {
    let mut items = Items::new();
    let mut start = None;
    loop {
        let page = aws.dynamodb().scan().table_name(table).set_exclusive_start_key(start).send().await.expect("scan");
        for mut item in page.items.unwrap_or_default() {
            let key = (item["pk"].as_s().cloned().unwrap_or_default(), item["sk"].as_s().cloned().unwrap_or_default());
            if key.1.starts_with("APPLIED#") {
                continue;
            }
            item.remove("revision");
            items.insert(key, item);
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return items;
        }
    }
}

fn assert_same(left: &Items, right: &Items, what: &str) {
    let lk: BTreeSet<_> = left.keys().collect();
    let rk: BTreeSet<_> = right.keys().collect();
    assert_eq!(lk, rk, "{what}: the same items");
    for (key, item) in left {
        assert_eq!(Some(item), right.get(key), "{what}: item {key:?} differs");
    }
}

/// Waits until the read model table stops changing and every order view has caught up with the
/// store's heads for its streams.
async fn wait_for_projections(env: &SagaEnv, orders: &[String]) {
    let models = ReadModelStore::new(env.aws.dynamodb(), env.stack.environment["READ_MODEL_TABLE"].clone());
    let deadline = Instant::now() + Duration::from_secs(180);
    for id in orders {
        loop {
            let mut behind = 0;
            for category in ["Order", "Payment", "Shipment"] {
                let stream = StreamId::new(category, id).expect("id");
                behind +=
                    shared::adapters::dynamodb::readmodels::lag::<OrderView, _>(env.repo.store(), &models, &stream)
                        .await
                        .expect("lag")
                        .behind;
            }
            if behind == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "order view of {id} still {behind} events behind");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The other projections run on their own queues: wait until nothing changes for a while.
    let mut last = read_models(&env.aws, &env.stack.environment["READ_MODEL_TABLE"]).await;
    let mut stable_since = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = read_models(&env.aws, &env.stack.environment["READ_MODEL_TABLE"]).await;
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        assert!(Instant::now() < deadline, "read models never settled");
    }
}

fn order_request(i: usize, customer: &str) -> OrderRequest {
    serde_json::from_value(json!({
        "orderId": unique(&format!("o{i}-")),
        "customerId": customer,
        "currency": "EUR",
        "lines": [{ "sku": "SKU-RED-MUG", "quantity": 1 + (i % 3), "unitPriceMinor": 1000 + i }],
        "paymentToken": "tok_visa",
        "shippingAddress": { "name": "A", "line1": "1 St", "city": "X", "postalCode": "1", "country": "GB" },
    }))
    .expect("request")
}

/// Writes an order's whole history through the aggregates (no saga): placed, paid, shipped and
/// completed, or placed and cancelled.
async fn order_history(repo: &Repository<DynamoEventStore>, i: usize, customer: &str) -> String {
    let placed = order_request(i, customer).validate().expect("valid");
    let id = placed.order_id.to_string();
    let ctx = CommandContext::default();
    repo.execute::<Order>(&id, &OrderCommand::Place(placed.clone()), &ctx).await.expect("place");
    if i.is_multiple_of(3) {
        let cmd = OrderCommand::Cancel {
            reason: "PaymentDeclined: card declined".into(),
            failed_step: "ChargePayment".into(),
        };
        repo.execute::<Order>(&id, &cmd, &ctx).await.expect("cancel");
        return id;
    }
    let oid = placed.order_id.clone();
    repo.execute::<Payment>(&id, &PaymentCommand::Request { order_id: oid.clone(), amount: placed.total }, &ctx)
        .await
        .expect("p1");
    repo.execute::<Payment>(
        &id,
        &PaymentCommand::RecordCharge { order_id: oid.clone(), payment_id: format!("pay_{i}") },
        &ctx,
    )
    .await
    .expect("p2");
    repo.execute::<Shipment>(&id, &ShipmentCommand::Request { order_id: oid.clone() }, &ctx).await.expect("s1");
    let created =
        ShipmentCommand::RecordCreated { order_id: oid, shipment_id: format!("shp_{i}"), carrier: "sim".into() };
    repo.execute::<Shipment>(&id, &created, &ctx).await.expect("s2");
    let cmd = OrderCommand::Complete { payment_id: format!("pay_{i}"), shipment_id: format!("shp_{i}") };
    repo.execute::<Order>(&id, &cmd, &ctx).await.expect("complete");
    id
}

fn as_bus_message(event: &RecordedEvent, n: usize) -> SqsMessage {
    let entry = outbox_relay::entry(event);
    let body = json!({ "detail-type": entry.detail_type, "source": entry.source, "detail": serde_json::from_str::<Value>(&entry.detail).expect("detail") });
    let mut message = SqsMessage::default();
    message.message_id = Some(format!("m{n}"));
    message.body = Some(body.to_string());
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projections_fed_duplicates_out_of_order_and_the_rebuild_all_equal_the_incremental_run() {
    // Given the system without the saga starter (histories are written directly), and a few
    // hundred orders' histories committed to the store
    let env =
        SagaEnv::start_with(|_, service| Arc::new(Except { inner: service, function: "SagaStarterFunction" })).await;
    let customers = ["cust-a", "cust-b", "cust-c", "cust-d"];
    let mut orders = Vec::new();
    for chunk in (0..300).collect::<Vec<usize>>().chunks(25) {
        let written =
            futures::future::join_all(chunk.iter().map(|&i| order_history(&env.repo, i, customers[i % 4]))).await;
        orders.extend(written);
    }

    // When the incremental projections (relay → bus → rules → queues → projections) settle
    wait_for_projections(&env, &orders).await;
    let incremental = read_models(&env.aws, &env.stack.environment["READ_MODEL_TABLE"]).await;
    assert_eq!(incremental.keys().filter(|(_, sk)| sk == "VIEW").count(), 300);
    let sales = incremental.iter().find(|((pk, _), _)| pk.starts_with("STATS#")).expect("sales").1;
    assert_eq!(sales["placed"].as_n().map(String::as_str), Ok("300"));
    assert_eq!(sales["completed"].as_n().map(String::as_str), Ok("200"));
    assert_eq!(sales["cancelled"].as_n().map(String::as_str), Ok("100"));

    // Then a rebuild from the event store gives the same read models
    let rebuilt_table = create_read_model_table(&env.aws).await;
    let target = ReadModelStore::new(env.aws.dynamodb(), rebuilt_table.clone());
    shared::adapters::dynamodb::readmodels::rebuild(
        &env.aws.dynamodb(),
        &env.stack.environment["EVENTS_TABLE"],
        &target,
    )
    .await
    .expect("rebuild");
    let rebuilt = read_models(&env.aws, &rebuilt_table).await;
    assert_same(&rebuilt, &incremental, "rebuild vs incremental");

    // And feeding every projection the same events reversed, each delivered twice, ends identical
    let chaos_table = create_read_model_table(&env.aws).await;
    let mut vars: HashMap<String, String> = env.stack.environment.clone().into_iter().collect();
    vars.insert("READ_MODEL_TABLE".into(), chaos_table.clone());
    vars.insert("DEAD_LETTER_QUEUE_URL".into(), env.queue_url("OrderViewProjectionDlq"));
    let lambda =
        ProjectionLambda::new(env.aws.dynamodb(), env.aws.sqs(), &|n: &str| vars.get(n).cloned()).expect("lambda");
    let mut events: Vec<RecordedEvent> = Vec::new();
    let skus = ["SKU-RED-MUG", "SKU-BLUE-PLATE", "SKU-RARE-VASE"];
    for id in &orders {
        for category in ["Order", "Payment", "Shipment"] {
            events.extend(env.events(category, id).await);
        }
    }
    for sku in skus {
        events.extend(env.events("Inventory", sku).await);
    }
    events.reverse();
    let doubled: Vec<RecordedEvent> = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
    for (n, chunk) in doubled.chunks(10).enumerate() {
        let mut batch = SqsEvent::default();
        batch.records = chunk.iter().enumerate().map(|(i, e)| as_bus_message(e, n * 10 + i)).collect();
        for response in [
            project_order_view::handle(&lambda, batch.clone(), Deadline::never()).await,
            project_customer_orders::handle(&lambda, batch.clone(), Deadline::never()).await,
            project_inventory::handle(&lambda, batch.clone(), Deadline::never()).await,
            project_sales::handle(&lambda, batch.clone(), Deadline::never()).await,
        ] {
            assert!(response.batch_item_failures.is_empty(), "{:?}", response.batch_item_failures);
        }
    }
    let chaos = read_models(&env.aws, &chaos_table).await;
    assert_same(&chaos, &incremental, "duplicated, out-of-order vs incremental");
    env.stop().await;
}

#[tokio::test]
async fn a_gap_is_filled_from_the_store_and_the_late_event_then_changes_nothing() {
    let aws = LocalAws::load().await;
    let store = aws.event_store();
    let repo = Repository::new(store.clone());
    let table = create_read_model_table(&aws).await;
    let models = ReadModelStore::new(aws.dynamodb(), table);
    // Given a completed order (two Order events) in the store
    let id = order_history(&repo, 1, "cust-gap").await;
    let order_events = store.load(&StreamId::new("Order", &id).expect("id"), 0).await.expect("load");
    assert_eq!(order_events.len(), 2);
    // When the newest arrives first
    let first = models.project::<OrderView, _>(&store, &order_events[1]).await.expect("project");
    // Then the missing one is read from the store, and its late arrival changes nothing
    assert_eq!(first, shared::adapters::dynamodb::readmodels::Projected::CaughtUp { events: 2 });
    let late = models.project::<OrderView, _>(&store, &order_events[0]).await.expect("project");
    assert_eq!(late, shared::adapters::dynamodb::readmodels::Projected::AlreadyApplied);
    let (view, _) = models.get::<OrderView>(&shared::readmodel::order_key(&id)).await.expect("get").expect("view");
    assert_eq!(view.status, "Completed");
    assert_eq!(view.versions[&format!("Order-{id}")], 2);
    // And the lag check agrees
    let lag = shared::adapters::dynamodb::readmodels::lag::<OrderView, _>(
        &store,
        &models,
        &StreamId::new("Order", &id).expect("id"),
    )
    .await
    .expect("lag");
    assert_eq!((lag.head, lag.applied, lag.behind), (2, 2, 0));
    let payment = StreamId::new("Payment", &id).expect("id");
    let lag =
        shared::adapters::dynamodb::readmodels::lag::<OrderView, _>(&store, &models, &payment).await.expect("lag");
    assert_eq!((lag.head, lag.behind), (2, 2), "payment events not projected yet: 2 behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_item_that_is_not_an_event_goes_to_the_relays_dlq_and_the_events_behind_it_still_project() {
    // Given the system running (the relay is its own binary, fed by the stream mapping)
    let env = SagaEnv::start().await;

    // When something other than the store writes an item to the events table, and an order
    // is placed right after it
    let foreign = unique("Foreign");
    env.aws
        .dynamodb()
        .put_item()
        .table_name(&env.stack.environment["EVENTS_TABLE"])
        .item("streamId", aws_sdk_dynamodb::types::AttributeValue::S(foreign.clone()))
        .item("version", aws_sdk_dynamodb::types::AttributeValue::N("1".into()))
        .send()
        .await
        .expect("foreign item");
    let id = env.place(env.sample("happy-path")).await;

    // Then the relay parks the foreign item with the reason, and it is recorded as a dead
    // letter waiting for a person
    let parked = env.dead_letters("OutboxRelayDlq", 1, Status::Parked, 30).await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert!(parked[0].body.contains(&foreign), "the record itself is kept: {parked:?}");
    assert!(parked[0].reason.contains("not an event envelope"), "{parked:?}");
    assert_eq!(parked[0].failure, Some(shared::domain::dead_letter::Failure::Poison));
    // And the order's events, behind it on the stream, reach the order view
    assert_eq!(env.finished(&id).await.status, "SUCCEEDED");
    wait_for_projections(&env, std::slice::from_ref(&id)).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_too_large_for_the_bus_reaches_the_read_models_through_its_claim_check() {
    // Given the system without the saga starter, and an OrderPlaced whose envelope is over the
    // bus's limit (an order with a 210 KB note: a real order's fields, copied from one placed)
    let env =
        SagaEnv::start_with(|_, service| Arc::new(Except { inner: service, function: "SagaStarterFunction" })).await;
    let donor = order_history(&env.repo, 1, "cust-claim").await;
    let placed = env.repo.store().load(&StreamId::new("Order", &donor).expect("id"), 0).await.expect("load");
    let id = unique("ord-large-");
    let mut payload = placed[0].payload.clone();
    payload["orderId"] = json!(id);
    payload["note"] = json!("n".repeat(210 * 1024));
    let stream = StreamId::new("Order", &id).expect("id");
    let large = NewEvent::new("OrderPlaced", placed[0].schema_version, payload);
    env.repo.store().append(&stream, 0, vec![large], None).await.expect("append the large event");
    let stored = env.repo.store().load(&stream, 0).await.expect("load");
    let entry = outbox_relay::entry(&stored[0]);
    assert!(entry.detail.contains("\"payloadOmitted\":true"), "the relay publishes a claim check");
    assert!(entry.detail.len() < outbox_relay::MAX_DETAIL_BYTES, "{} bytes", entry.detail.len());

    // When the relay publishes it and the projections consume it
    wait_for_projections(&env, std::slice::from_ref(&id)).await;

    // Then the order view and the customer's listing hold the order, read back from the store
    let models = ReadModelStore::new(env.aws.dynamodb(), env.stack.environment["READ_MODEL_TABLE"].clone());
    let (view, _) = models.get::<OrderView>(&shared::readmodel::order_key(&id)).await.expect("get").expect("view");
    assert_eq!((view.status.as_str(), view.customer_id.as_str()), ("Placed", "cust-claim"));
    assert!(
        view.total.is_some_and(|t| t.amount_minor > 0) && !view.lines.is_empty(),
        "the view is the order's: {view:?}"
    );
    let listed = models.get::<shared::readmodel::CustomerOrder>(&shared::readmodel::customer_order_key(&id)).await;
    assert!(listed.expect("get").is_some(), "the customer's listing has it");
    // And nothing was dead-lettered on the way
    let dead = env.dead_letters("OrderViewProjectionDlq", 0, Status::Parked, 1).await;
    assert!(dead.is_empty(), "{dead:?}");
    env.stop().await;
}
