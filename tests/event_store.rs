//! The event store on DynamoDB Local: concurrency, idempotency, large streams, snapshots,
//! upcasting and DynamoDB's limits. Every test uses its own streams and keys.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::json;
use shared::adapters::dynamodb::PayloadEncoding;
use shared::aggregate::{CommandContext, Executed, Repository};
use shared::eventstore::{
    AppendError, AppendOutcome, EventMetadata, EventStore, MAX_ITEM_BYTES, NewEvent, Snapshot, StreamId,
};
use shared::retry::RetryPolicy;
use system_tests::tally::{Record, Tally, TallyEvent};
use system_tests::{LocalAws, unique};

fn entry(writer: &str, seq: u32) -> NewEvent {
    NewEvent::new("EntryRecorded", 2, json!({ "writer": writer, "seq": seq, "note": "" }))
}

fn tally_stream(id: &str) -> StreamId {
    StreamId::new("Tally", id).expect("valid stream id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_leave_a_gapless_stream_and_losers_succeed_on_retry() {
    // Given 8 writers that all read the same (empty) head
    let aws = LocalAws::load().await;
    let store = Arc::new(aws.event_store());
    let stream = tally_stream(&unique("race-"));
    let writers = 8u32;
    let per_writer = 15u32;
    let barrier = Arc::new(tokio::sync::Barrier::new(writers as usize));
    let conflicts = Arc::new(AtomicU32::new(0));

    // When each appends at version 0 at the same moment, then keeps appending with retries
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (store, stream, barrier, conflicts) = (store.clone(), stream.clone(), barrier.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            let writer = format!("w{w}");
            let retry = RetryPolicy {
                max_attempts: 200,
                base_delay: Duration::from_millis(2),
                max_delay: Duration::from_millis(50),
            };
            let mut first_round = None;
            barrier.wait().await;
            for seq in 0..per_writer {
                let mut expected = if seq == 0 { 0 } else { store.head_version(&stream).await.expect("head") };
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match store.append(&stream, expected, vec![entry(&writer, seq)], None).await {
                        Ok(AppendOutcome::Appended(c)) => {
                            assert_eq!(c.first_version, expected + 1);
                            break;
                        }
                        Ok(other) => panic!("no key, so no duplicate: {other:?}"),
                        Err(AppendError::Conflict { actual, .. }) => {
                            if seq == 0 && attempt == 1 {
                                first_round = Some(actual);
                            }
                            conflicts.fetch_add(1, Ordering::Relaxed);
                            assert!(retry.allows_another(attempt), "{writer} starved after {attempt} attempts");
                            tokio::time::sleep(retry.delay(attempt - 1)).await;
                            expected = store.head_version(&stream).await.expect("head");
                        }
                        Err(e) => panic!("unexpected append error: {e}"),
                    }
                }
            }
            first_round
        }));
    }
    let first_round: Vec<Option<u64>> = futures::future::try_join_all(tasks).await.expect("writers finish");

    // Then every version 1..=120 is present exactly once and every entry was written once
    let events = store.load(&stream, 0).await.expect("load");
    let total = u64::from(writers * per_writer);
    assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    let entries: BTreeSet<(String, u64)> = events
        .iter()
        .map(|e| {
            (e.payload["writer"].as_str().unwrap_or_default().to_owned(), e.payload["seq"].as_u64().unwrap_or(999))
        })
        .collect();
    assert_eq!(entries.len() as u64, total, "no entry lost or doubled");
    // And in the simultaneous first round exactly one writer won; the other 7 saw a conflict
    let losers = first_round.iter().filter(|r| r.is_some()).count();
    assert_eq!(losers, writers as usize - 1, "first-round conflicts: {first_round:?}");
    assert!(conflicts.load(Ordering::Relaxed) >= writers - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_through_the_repository_all_land_once() {
    // Given a repository that retries conflicts with jittered backoff
    let aws = LocalAws::load().await;
    let retry =
        RetryPolicy { max_attempts: 100, base_delay: Duration::from_millis(2), max_delay: Duration::from_millis(100) };
    let repo = Arc::new(Repository::new(aws.event_store()).with_retry(retry).with_snapshots_every(10));
    let id = unique("repo-");

    // When 8 writers each execute 5 commands of 2 entries concurrently
    let tasks = (0..8).map(|w| {
        let (repo, id) = (repo.clone(), id.clone());
        tokio::spawn(async move {
            let mut attempts = 0;
            for i in 0..5 {
                let cmd = Record { writer: format!("w{w}"), seqs: (i * 2)..(i * 2 + 2), note_bytes: 8 };
                match repo.execute::<Tally>(&id, &cmd, &CommandContext::default()).await.expect("executes") {
                    Executed::Appended { attempts: a, .. } => attempts += a,
                    other => panic!("expected an append: {other:?}"),
                }
            }
            attempts
        })
    });
    let attempts: u32 = futures::future::try_join_all(tasks).await.expect("writers finish").into_iter().sum();

    // Then the stream holds all 80 entries once, and retries were needed to get there
    let loaded = repo.replay::<Tally>(&id).await.expect("replay");
    assert_eq!(loaded.version, 80);
    assert_eq!(loaded.state.entries.iter().collect::<BTreeSet<_>>().len(), 80);
    assert!(attempts > 40, "8 concurrent writers must have conflicted at least once ({attempts} attempts)");
    // And the snapshot path agrees with the replay
    let from_snapshot = repo.load::<Tally>(&id).await.expect("load");
    assert!(from_snapshot.snapshot_version.is_some());
    assert_eq!(from_snapshot.state.entries.len(), loaded.state.entries.len());
    assert_eq!(from_snapshot.version, loaded.version);
}

#[tokio::test]
async fn a_retried_append_with_the_same_idempotency_key_appends_once_and_returns_the_original() {
    // Given a stream with one keyed append
    let aws = LocalAws::load().await;
    let store = aws.event_store();
    let stream = tally_stream(&unique("idem-"));
    let key = unique("cmd-");
    let meta = EventMetadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cause-1".into()),
        trace_header: Some("Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1".into()),
    };
    let events = vec![entry("a", 1).with_metadata(meta.clone()), entry("a", 2).with_metadata(meta)];
    let first = store.append(&stream, 0, events.clone(), Some(&key)).await.expect("first append");
    let AppendOutcome::Appended(original) = first else { panic!("first should append: {first:?}") };

    // When the same command is retried with the same key (at the same or a stale version)
    let again = store.append(&stream, 0, events.clone(), Some(&key)).await.expect("retry");
    let again_later = store.append(&stream, 2, events, Some(&key)).await.expect("retry at head");

    // Then nothing more is appended and the original result comes back
    assert_eq!(again, AppendOutcome::Duplicate(original.clone()));
    assert_eq!(again_later, AppendOutcome::Duplicate(original.clone()));
    assert_eq!(store.head_version(&stream).await.unwrap(), 2);

    // And the items carry the envelope: type, schema, correlation, causation, key, trace, time
    let item = aws
        .dynamodb()
        .get_item()
        .table_name(aws.var("EVENTS_TABLE"))
        .key("streamId", AttributeValue::S(stream.to_string()))
        .key("version", AttributeValue::N("1".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get item")
        .item
        .expect("event item stored");
    let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned().unwrap_or_default();
    assert_eq!(s("eventType"), "EntryRecorded");
    assert_eq!(item.get("schemaVersion"), Some(&AttributeValue::N("2".into())));
    assert_eq!(s("correlationId"), "corr-1");
    assert_eq!(s("causationId"), "cause-1");
    assert_eq!(s("idempotencyKey"), key);
    assert_eq!(s("traceHeader"), "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1");
    assert_eq!(s("eventId"), original.event_ids[0]);
    assert!(s("recordedAt").starts_with("20"), "RFC 3339 time");
    // And the command record is in the commands table, with a TTL in the future
    let record = aws
        .dynamodb()
        .get_item()
        .table_name(aws.var("COMMANDS_TABLE"))
        .key("idempotencyKey", AttributeValue::S(key.clone()))
        .send()
        .await
        .expect("get record")
        .item
        .expect("command record stored");
    let expires: i64 = record["expiresAt"].as_n().expect("expiresAt").parse().expect("number");
    assert!(expires > time_now() + 14 * 24 * 3600);

    // And the same key on another stream is refused, not silently deduplicated
    let other = tally_stream(&unique("idem-other-"));
    let err = store.append(&other, 0, vec![entry("b", 1)], Some(&key)).await.expect_err("reused key");
    assert!(matches!(err, AppendError::IdempotencyKeyReused { .. }), "{err}");
    assert_eq!(store.head_version(&other).await.unwrap(), 0);
}

fn time_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_keyed_command_racing_itself_appends_once() {
    // Given 6 deliveries of one command (same key) arriving at once
    let aws = LocalAws::load().await;
    let store = Arc::new(aws.event_store());
    let stream = tally_stream(&unique("dup-race-"));
    let key = unique("cmd-");
    let tasks = (0..6).map(|_| {
        let (store, stream, key) = (store.clone(), stream.clone(), key.clone());
        tokio::spawn(async move {
            // A delivery that loses the race retries, as a queue redelivery would.
            for attempt in 0..50u32 {
                match store.append(&stream, 0, vec![entry("x", 1)], Some(&key)).await {
                    Ok(outcome) => return outcome,
                    Err(AppendError::Conflict { .. }) => {
                        tokio::time::sleep(RetryPolicy::default().delay(attempt.min(5))).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            panic!("no outcome after 50 attempts")
        })
    });
    let outcomes = futures::future::try_join_all(tasks).await.expect("deliveries finish");

    // Then exactly one appended, the rest got its result
    let appended: Vec<_> = outcomes.iter().filter(|o| matches!(o, AppendOutcome::Appended(_))).collect();
    assert_eq!(appended.len(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o.committed() == appended[0].committed()));
    assert_eq!(store.load(&stream, 0).await.unwrap().len(), 1);
}

#[tokio::test]
async fn the_repository_returns_the_original_result_for_a_repeated_command() {
    let aws = LocalAws::load().await;
    let repo = Repository::new(aws.event_store());
    let id = unique("repo-idem-");
    let ctx = CommandContext { idempotency_key: Some(unique("cmd-")), ..CommandContext::default() };
    let cmd = Record { writer: "r".into(), seqs: 0..3, note_bytes: 0 };

    let first = repo.execute::<Tally>(&id, &cmd, &ctx).await.expect("first");
    let second = repo.execute::<Tally>(&id, &cmd, &ctx).await.expect("second");

    let Executed::Appended { committed, .. } = first else { panic!("{first:?}") };
    assert_eq!(second, Executed::Duplicate { committed });
    assert_eq!(repo.replay::<Tally>(&id).await.unwrap().version, 3);
}

#[tokio::test]
async fn version_conflicts_report_the_actual_head() {
    let aws = LocalAws::load().await;
    let store = aws.event_store();
    let stream = tally_stream(&unique("conflict-"));
    store.append(&stream, 0, vec![entry("a", 1), entry("a", 2)], None).await.expect("seed");

    for expected in [0, 1, 5] {
        let err = store.append(&stream, expected, vec![entry("b", 1)], None).await.expect_err("conflict");
        assert!(
            matches!(err, AppendError::Conflict { expected: e, actual: 2, .. } if e == expected),
            "expected {expected}: {err}"
        );
        assert!(err.is_retryable());
    }
    assert_eq!(store.head_version(&stream).await.unwrap(), 2, "no gap, nothing appended");
}

#[tokio::test]
async fn a_stream_over_1mb_and_1000_events_loads_whole_and_snapshots_agree_with_replay() {
    // Given 1,100 events of ~1.1 KB (over 1 MB), appended through the repository in batches,
    // with a snapshot every 100 events
    let aws = LocalAws::load().await;
    let repo = Repository::new(aws.event_store()).with_snapshots_every(100);
    let id = unique("big-");
    let mut seq = 0;
    while seq < 1100 {
        let n = (1100 - seq).min(95);
        let cmd = Record { writer: "big".into(), seqs: seq..seq + n, note_bytes: 1024 };
        repo.execute::<Tally>(&id, &cmd, &CommandContext::default()).await.expect("append batch");
        seq += n;
    }

    // Then DynamoDB pages the stream (so the load must follow LastEvaluatedKey)...
    let first_page = aws
        .dynamodb()
        .query()
        .table_name(aws.var("EVENTS_TABLE"))
        .key_condition_expression("streamId = :s")
        .expression_attribute_values(":s", AttributeValue::S(format!("Tally-{id}")))
        .consistent_read(true)
        .send()
        .await
        .expect("query");
    assert!(first_page.last_evaluated_key.is_some(), "a >1 MB stream spans several pages");
    assert!(first_page.items().len() < 1100);

    // ...and the store loads all of it, in order
    let events = repo.store().load(&tally_stream(&id), 0).await.expect("load");
    assert_eq!(events.len(), 1100);
    assert!(events.iter().zip(1..).all(|(e, v)| e.version == v));
    assert!(events.iter().map(|e| e.payload["note"].as_str().map_or(0, str::len)).sum::<usize>() > 1024 * 1024);

    // And a load from the latest snapshot equals a full replay
    let replayed = repo.replay::<Tally>(&id).await.expect("replay");
    let from_snapshot = repo.load::<Tally>(&id).await.expect("load from snapshot");
    assert_eq!(replayed.events_replayed, 1100);
    assert_eq!(from_snapshot.snapshot_version, Some(1100));
    assert_eq!(from_snapshot.events_replayed, 0);
    assert_eq!(from_snapshot.state, replayed.state);
    assert_eq!(from_snapshot.version, replayed.version);
}

#[tokio::test]
async fn a_snapshot_that_no_longer_deserializes_falls_back_to_replay() {
    let aws = LocalAws::load().await;
    let repo = Repository::new(aws.event_store());
    let id = unique("badsnap-");
    repo.execute::<Tally>(&id, &Record { writer: "s".into(), seqs: 0..4, note_bytes: 0 }, &CommandContext::default())
        .await
        .expect("seed");
    // Given a stored snapshot whose state no longer matches the aggregate's shape
    let snapshot = Snapshot {
        stream_id: format!("Tally-{id}"),
        version: 3,
        schema_version: 1,
        state: json!({ "entries": "not a list" }),
        taken_at: "2026-01-01T00:00:00Z".into(),
    };
    repo.store().save_snapshot(snapshot).await.expect("save");
    assert!(repo.store().load_snapshot(&tally_stream(&id)).await.unwrap().is_some());

    // When the aggregate loads, Then it replays instead, and gets the right state
    let loaded = repo.load::<Tally>(&id).await.expect("load");
    assert_eq!(loaded.snapshot_version, None);
    assert_eq!(loaded.events_replayed, 4);
    assert_eq!(loaded.state.entries.len(), 4);
}

#[tokio::test]
async fn an_event_stored_with_an_old_schema_is_upcast_on_load() {
    // Given a v1 event (different field names) stored beside a v2 one
    let aws = LocalAws::load().await;
    let repo = Repository::new(aws.event_store());
    let id = unique("upcast-");
    let v1 = NewEvent::new("EntryRecorded", 1, json!({ "who": "old", "n": 7 }));
    repo.store().append(&tally_stream(&id), 0, vec![v1, entry("new", 8)], None).await.expect("append");

    // When it loads, Then both are the current type
    let loaded = repo.load::<Tally>(&id).await.expect("load");
    assert_eq!(loaded.state.entries, vec![("old".to_owned(), 7), ("new".to_owned(), 8)]);
    let stored = repo.store().load(&tally_stream(&id), 0).await.unwrap();
    assert_eq!(stored[0].schema_version, 1, "the stored event is immutable");
    let event: TallyEvent = shared::aggregate::decode_event(&stored[0]).expect("upcast");
    assert_eq!(event, TallyEvent::EntryRecorded { writer: "old".into(), seq: 7, note: String::new() });
}

#[tokio::test]
async fn appends_beyond_dynamodb_limits_get_typed_errors_and_write_nothing() {
    let aws = LocalAws::load().await;
    let store = aws.event_store();
    let stream = tally_stream(&unique("limits-"));
    store.append(&stream, 0, vec![entry("seed", 0)], None).await.expect("seed");
    let key = unique("cmd-");

    // 100 actions per transaction: the version guard and the idempotency record take two
    let many: Vec<_> = (0..99).map(|i| entry("m", i)).collect();
    let err = store.append(&stream, 1, many, Some(&key)).await.expect_err("too many");
    assert!(matches!(err, AppendError::TooManyEvents { count: 99, max: 98 }), "{err}");
    let exactly: Vec<_> = (0..98).map(|i| entry("m", i)).collect();
    store.append(&stream, 1, exactly, Some(&key)).await.expect("98 events fit");

    // 400 KB per item
    let huge =
        NewEvent::new("EntryRecorded", 2, json!({ "writer": "h", "seq": 0, "note": "x".repeat(MAX_ITEM_BYTES) }));
    let err = store.append(&stream, 99, vec![huge], None).await.expect_err("item too large");
    assert!(matches!(err, AppendError::EventTooLarge { index: 0, .. }), "{err}");

    // 4 MB per transaction
    let big = |i| NewEvent::new("EntryRecorded", 2, json!({ "writer": "b", "seq": i, "note": "y".repeat(300_000) }));
    let err = store.append(&stream, 99, (0..15).map(big).collect(), None).await.expect_err("transaction too large");
    assert!(matches!(err, AppendError::TransactionTooLarge { .. }), "{err}");

    // No events
    assert!(matches!(store.append(&stream, 99, vec![], None).await, Err(AppendError::NoEvents)));

    // And none of the refused appends left anything behind
    assert_eq!(store.head_version(&stream).await.unwrap(), 99);
    // While an item just under the limit is accepted by DynamoDB itself
    let near = NewEvent::new("EntryRecorded", 2, json!({ "writer": "n", "seq": 1, "note": "z".repeat(390_000) }));
    store.append(&stream, 99, vec![near], None).await.expect("a 390 KB event fits");
}

#[tokio::test]
async fn an_append_after_a_seen_version_needs_no_guard_and_reports_a_conflict_by_its_lower_bound() {
    let aws = LocalAws::load().await;
    let store = aws.event_store();
    let stream = tally_stream(&unique("seen-"));
    store.append(&stream, 0, vec![entry("a", 1), entry("a", 2)], None).await.expect("seed");

    // A writer behind the head learns the version it collided with (one event: a PutItem; two:
    // a transaction without the guard): the head is at least that
    for (expected, events, at_least) in [(0, 1, 1), (1, 1, 2), (0, 2, 1), (1, 2, 2)] {
        let batch = (0..events).map(|i| entry("b", i)).collect();
        let err = store.append_after_seen(&stream, expected, batch, None).await.expect_err("conflict");
        assert!(
            matches!(err, AppendError::Conflict { expected: e, actual, .. } if e == expected && actual == at_least),
            "expected {expected}, {events} events: {err}"
        );
    }
    assert_eq!(store.head_version(&stream).await.unwrap(), 2, "nothing written by the losers");

    // At the head, one event and then two append after it, gapless
    let one = store.append_after_seen(&stream, 2, vec![entry("b", 3)], None).await.expect("one event");
    assert_eq!((one.committed().first_version, one.committed().last_version), (3, 3));
    let two = store.append_after_seen(&stream, 3, vec![entry("b", 4), entry("b", 5)], None).await.expect("two");
    assert_eq!((two.committed().first_version, two.committed().last_version), (4, 5));
    let versions: Vec<u64> = store.load(&stream, 0).await.unwrap().iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5], "no gap");

    // And a key is still recorded in the same transaction: a repeat is a duplicate
    let key = unique("seen-key-");
    let keyed = store.append_after_seen(&stream, 5, vec![entry("b", 6)], Some(&key)).await.expect("keyed");
    let again = store.append_after_seen(&stream, 5, vec![entry("b", 6)], Some(&key)).await.expect("repeat");
    assert!(matches!(again, AppendOutcome::Duplicate(ref c) if c == keyed.committed()), "{again:?}");

    // A version nobody has seen still goes through `append`, whose guard keeps the stream gapless
    let err = store.append(&stream, 9, vec![entry("c", 1)], None).await.expect_err("behind the guard");
    assert!(matches!(err, AppendError::Conflict { expected: 9, actual: 6, .. }), "{err}");
}

#[tokio::test]
async fn payloads_and_snapshots_load_alike_from_either_encoding() {
    // Given one stream written half as JSON text (the default), half as DynamoDB maps
    let aws = LocalAws::load().await;
    let json_store = aws.event_store();
    assert_eq!(json_store.payload_encoding(), PayloadEncoding::Json);
    let map_store = aws.event_store().with_payload_encoding(PayloadEncoding::Map);
    let id = unique("encodings-");
    let stream = tally_stream(&id);
    let odd = json!({ "writer": "j", "seq": 1, "note": "\"quoted\" é", "big": 12345678901234567890u64, "list": [] });
    json_store.append(&stream, 0, vec![NewEvent::new("EntryRecorded", 2, odd.clone())], None).await.expect("json");
    map_store.append(&stream, 1, vec![entry("m", 2)], None).await.expect("map");

    // Then the items carry the payload as a string or a map
    let item = |version: u64| {
        let request = aws.dynamodb().get_item().table_name(aws.var("EVENTS_TABLE")).consistent_read(true);
        let request = request.key("streamId", AttributeValue::S(stream.to_string()));
        request.key("version", AttributeValue::N(version.to_string())).send()
    };
    let first = item(1).await.expect("get").item.expect("item 1");
    let second = item(2).await.expect("get").item.expect("item 2");
    assert!(first.get("payloadJson").is_some_and(AttributeValue::is_s) && !first.contains_key("payload"));
    assert!(second.get("payload").is_some_and(AttributeValue::is_m) && !second.contains_key("payloadJson"));

    // And both stores load both, the JSON exactly; a stream record's NewImage decodes alike
    for store in [&json_store, &map_store] {
        let events = store.load(&stream, 0).await.expect("load");
        assert_eq!(events[0].payload, odd);
        assert_eq!(events[1].payload, json!({ "writer": "m", "seq": 2, "note": "" }));
    }
    let loaded = json_store.load(&stream, 0).await.expect("load");
    for (image, expected) in [(first, &loaded[0]), (second, &loaded[1])] {
        let decoded: shared::eventstore::RecordedEvent = serde_dynamo::from_item(image).expect("NewImage decodes");
        assert_eq!(&decoded, expected);
    }
    // And its JSON form (what the outbox publishes) has the payload as a value
    assert_eq!(serde_json::to_value(&loaded[0]).expect("json")["payload"], odd);

    // And a snapshot saved in either encoding loads back the same
    for (store, version) in [(&map_store, 1), (&json_store, 2)] {
        let state = json!({ "entries": [["m", version]], "notes_bytes": 0 });
        let snapshot = Snapshot {
            stream_id: stream.to_string(),
            version,
            schema_version: 1,
            state: state.clone(),
            taken_at: "2026-01-01T00:00:00.000000Z".into(),
        };
        store.save_snapshot(snapshot.clone()).await.expect("save");
        assert_eq!(json_store.load_snapshot(&stream).await.unwrap(), Some(snapshot.clone()));
        assert_eq!(map_store.load_snapshot(&stream).await.unwrap(), Some(snapshot));
    }
}
