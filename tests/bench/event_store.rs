//! Event store benchmark: this store side by side with `dynamo-es` (cqrs-es), on the same
//! DynamoDB Local, in one run. Prints throughput, conflict rate, load times and the DynamoDB
//! requests each operation costs (counted by an SDK interceptor on each client).
//!
//!     scripts/env.sh up && cargo bench -p system-tests --bench event_store
//!
//! Under `cargo test` (no `--bench` argument) it runs at smoke size, so the code stays working.
//! Figures are from an emulator on a shared 2-core machine: compare the columns, not the
//! absolute numbers with AWS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::types::{AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType};
use cqrs_es::persist::{PersistedEventRepository, PersistedEventStore, SerializedEvent};
use cqrs_es::{AggregateError, CqrsFramework, EventStore as _};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::aggregate::{CommandContext, Executed, Repository};
use shared::eventstore::{DynamoEventStore, EventStore, NewEvent, StreamId};
use shared::retry::RetryPolicy;
use system_tests::tally::{Record, Tally};
use system_tests::{LocalAws, unique};

// ---------------------------------------------------------------------------------------------
// Request counting

#[derive(Debug, Clone, Default)]
struct Requests(Arc<AtomicU64>);

impl Requests {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Intercept for Requests {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    // Per attempt, so SDK-level retries are counted as the requests they are.
    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The same aggregate for cqrs-es: one entry event per recorded seq, the same payload shape.

#[derive(Debug, Default, Serialize, Deserialize)]
struct EsTally {
    entries: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum EsEvent {
    EntryRecorded { writer: String, seq: u32, note: String },
}

impl cqrs_es::DomainEvent for EsEvent {
    fn event_type(&self) -> String {
        "EntryRecorded".into()
    }
    fn event_version(&self) -> String {
        "2".into()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("nothing to record")]
struct EsEmpty;

struct EsRecord {
    writer: String,
    seqs: std::ops::Range<u32>,
    note_bytes: usize,
}

impl cqrs_es::Aggregate for EsTally {
    const TYPE: &'static str = "EsTally";
    type Command = EsRecord;
    type Event = EsEvent;
    type Error = EsEmpty;
    type Services = ();

    async fn handle(
        &mut self,
        c: EsRecord,
        _: &(),
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), EsEmpty> {
        if c.seqs.is_empty() {
            return Err(EsEmpty);
        }
        for seq in c.seqs {
            sink.write(EsEvent::EntryRecorded { writer: c.writer.clone(), seq, note: "n".repeat(c.note_bytes) }, self)
                .await;
        }
        Ok(())
    }

    fn apply(&mut self, _event: EsEvent) {
        self.entries += 1;
    }
}

type EsCqrs = CqrsFramework<EsTally, PersistedEventStore<dynamo_es::DynamoEventRepository, EsTally>>;

// ---------------------------------------------------------------------------------------------

struct Sizes {
    appends: u32,
    commands: u32,
    writers: u32,
    per_writer: u32,
    stream: u32,
    loads: usize,
}

const NOTE: usize = 64;

struct Row {
    label: &'static str,
    ours: String,
    theirs: String,
}

fn rate(n: u32, d: Duration) -> String {
    format!("{:.0}", f64::from(n) / d.as_secs_f64())
}

fn per(requests: u64, ops: u32) -> String {
    format!("{:.2}", requests as f64 / f64::from(ops))
}

fn median_ms(mut v: Vec<Duration>) -> String {
    v.sort();
    format!("{:.1}", v[v.len() / 2].as_secs_f64() * 1000.0)
}

async fn create_es_tables(client: &aws_sdk_dynamodb::Client, prefix: &str) -> (String, String) {
    let attr = |n: &str, t| AttributeDefinition::builder().attribute_name(n).attribute_type(t).build().expect("attr");
    let key = |n: &str, t| KeySchemaElement::builder().attribute_name(n).key_type(t).build().expect("key");
    let events = format!("{prefix}-es-events");
    let snapshots = format!("{prefix}-es-snapshots");
    // dynamo-es's own schema (its db/create_tables.sh): not part of this project's template.
    client
        .create_table()
        .table_name(&events)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("AggregateTypeAndId", ScalarAttributeType::S))
        .attribute_definitions(attr("AggregateIdSequence", ScalarAttributeType::N))
        .key_schema(key("AggregateTypeAndId", KeyType::Hash))
        .key_schema(key("AggregateIdSequence", KeyType::Range))
        .send()
        .await
        .expect("create dynamo-es events table");
    client
        .create_table()
        .table_name(&snapshots)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("AggregateTypeAndId", ScalarAttributeType::S))
        .key_schema(key("AggregateTypeAndId", KeyType::Hash))
        .send()
        .await
        .expect("create dynamo-es snapshots table");
    (events, snapshots)
}

fn entry(seq: u32) -> NewEvent {
    NewEvent::new("EntryRecorded", 2, json!({ "writer": "solo", "seq": seq, "note": "n".repeat(NOTE) }))
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full {
        Sizes { appends: 300, commands: 200, writers: 8, per_writer: 25, stream: 1000, loads: 7 }
    } else {
        Sizes { appends: 10, commands: 10, writers: 8, per_writer: 2, stream: 100, loads: 1 }
    };
    let aws = LocalAws::load().await;
    let ours_requests = Requests::default();
    let theirs_requests = Requests::default();
    let ours_client =
        aws_sdk_dynamodb::Client::from_conf(aws.dynamodb_config().interceptor(ours_requests.clone()).build());
    let theirs_client =
        aws_sdk_dynamodb::Client::from_conf(aws.dynamodb_config().interceptor(theirs_requests.clone()).build());
    let run = unique("bench");
    let (es_events, es_snapshots) = create_es_tables(&aws.dynamodb(), &run).await;
    let es_repo =
        || dynamo_es::DynamoEventRepository::new(theirs_client.clone()).with_tables(&es_events, &es_snapshots);
    let store = DynamoEventStore::new(ours_client.clone(), aws.event_store_config());
    let retry =
        RetryPolicy { max_attempts: 200, base_delay: Duration::from_millis(2), max_delay: Duration::from_millis(100) };
    let mut rows = Vec::new();

    // 1. One writer, raw appends of one event at a known version (one transaction each).
    let stream = StreamId::new("Tally", &format!("{run}-raw")).expect("id");
    let (r0, t0) = (ours_requests.get(), Instant::now());
    for v in 0..sizes.appends {
        store.append(&stream, u64::from(v), vec![entry(v)], None).await.expect("append");
    }
    let (ours_t, ours_r) = (t0.elapsed(), ours_requests.get() - r0);
    let repo = es_repo();
    let id = format!("{run}-raw");
    let (r0, t0) = (theirs_requests.get(), Instant::now());
    for v in 0..sizes.appends {
        let event = SerializedEvent {
            aggregate_id: id.clone(),
            sequence: v as usize + 1,
            aggregate_type: "EsTally".into(),
            event_type: "EntryRecorded".into(),
            event_version: "2".into(),
            payload: json!({ "EntryRecorded": { "writer": "solo", "seq": v, "note": "n".repeat(NOTE) } }),
            metadata: json!({}),
        };
        repo.persist::<EsTally>(&[event], None).await.expect("persist");
    }
    let (theirs_t, theirs_r) = (t0.elapsed(), theirs_requests.get() - r0);
    rows.push(Row {
        label: "1 writer: appends/s (1 event, known version)",
        ours: rate(sizes.appends, ours_t),
        theirs: rate(sizes.appends, theirs_t),
    });
    rows.push(Row {
        label: "  DynamoDB requests per append",
        ours: per(ours_r, sizes.appends),
        theirs: per(theirs_r, sizes.appends),
    });

    // 2. One writer, commands (load, decide, append), snapshots every 100 events on both sides.
    let repository = Repository::new(store.clone()).with_snapshots_every(100).with_retry(retry);
    let id = format!("{run}-cmd");
    let (r0, t0) = (ours_requests.get(), Instant::now());
    for i in 0..sizes.commands {
        let cmd = Record { writer: "solo".into(), seqs: i..i + 1, note_bytes: NOTE };
        repository.execute::<Tally>(&id, &cmd, &CommandContext::default()).await.expect("execute");
    }
    let (ours_t, ours_r) = (t0.elapsed(), ours_requests.get() - r0);
    let cqrs: EsCqrs = CqrsFramework::new(PersistedEventStore::new_snapshot_store(es_repo(), 100), vec![], ());
    let (r0, t0) = (theirs_requests.get(), Instant::now());
    for i in 0..sizes.commands {
        cqrs.execute(&id, EsRecord { writer: "solo".into(), seqs: i..i + 1, note_bytes: NOTE }).await.expect("execute");
    }
    let (theirs_t, theirs_r) = (t0.elapsed(), theirs_requests.get() - r0);
    rows.push(Row {
        label: "1 writer: commands/s (load+decide+append)",
        ours: rate(sizes.commands, ours_t),
        theirs: rate(sizes.commands, theirs_t),
    });
    rows.push(Row {
        label: "  DynamoDB requests per command",
        ours: per(ours_r, sizes.commands),
        theirs: per(theirs_r, sizes.commands),
    });

    // 3. Eight writers on one stream, each retrying conflicts with the same jittered backoff.
    let total = sizes.writers * sizes.per_writer;
    let repository = Arc::new(Repository::new(store.clone()).with_snapshots_every(100).with_retry(retry));
    let id = format!("{run}-race");
    let (r0, t0) = (ours_requests.get(), Instant::now());
    let tasks = (0..sizes.writers).map(|w| {
        let (repository, id) = (repository.clone(), id.clone());
        tokio::spawn(async move {
            let mut attempts = 0u32;
            for i in 0..sizes.per_writer {
                let cmd = Record { writer: format!("w{w}"), seqs: i..i + 1, note_bytes: NOTE };
                match repository.execute::<Tally>(&id, &cmd, &CommandContext::default()).await.expect("execute") {
                    Executed::Appended { attempts: a, .. } => attempts += a,
                    other => panic!("{other:?}"),
                }
            }
            attempts
        })
    });
    let ours_attempts: u32 = futures::future::try_join_all(tasks).await.expect("writers").into_iter().sum();
    let (ours_t, ours_r) = (t0.elapsed(), ours_requests.get() - r0);
    let cqrs = Arc::new(CqrsFramework::new(PersistedEventStore::new_snapshot_store(es_repo(), 100), vec![], ()));
    let (r0, t0) = (theirs_requests.get(), Instant::now());
    let tasks = (0..sizes.writers).map(|w| {
        let (cqrs, id): (Arc<EsCqrs>, String) = (cqrs.clone(), id.clone());
        tokio::spawn(async move {
            let mut attempts = 0u32;
            for i in 0..sizes.per_writer {
                let mut tries = 0;
                loop {
                    tries += 1;
                    let cmd = EsRecord { writer: format!("w{w}"), seqs: i..i + 1, note_bytes: NOTE };
                    match cqrs.execute(&id, cmd).await {
                        Ok(()) => break,
                        Err(AggregateError::AggregateConflict) if retry.allows_another(tries) => {
                            tokio::time::sleep(retry.delay(tries - 1)).await
                        }
                        Err(e) => panic!("dynamo-es: {e}"),
                    }
                }
                attempts += tries;
            }
            attempts
        })
    });
    let theirs_attempts: u32 = futures::future::try_join_all(tasks).await.expect("writers").into_iter().sum();
    let (theirs_t, theirs_r) = (t0.elapsed(), theirs_requests.get() - r0);
    let conflict_rate = |attempts: u32| format!("{:.0}%", 100.0 * f64::from(attempts - total) / f64::from(attempts));
    rows.push(Row {
        label: "8 writers, 1 stream: commands/s",
        ours: rate(total, ours_t),
        theirs: rate(total, theirs_t),
    });
    rows.push(Row {
        label: "  conflict rate (conflicts / attempts)",
        ours: conflict_rate(ours_attempts),
        theirs: conflict_rate(theirs_attempts),
    });
    rows.push(Row { label: "  DynamoDB requests per command", ours: per(ours_r, total), theirs: per(theirs_r, total) });
    // Check both ended with every command applied once, so the figures compare equal work.
    assert_eq!(repository.replay::<Tally>(&id).await.expect("replay").version, u64::from(total));
    let es_loaded = PersistedEventStore::<_, EsTally>::new_event_store(es_repo()).load_events(&id).await.expect("load");
    assert_eq!(es_loaded.len(), total as usize);

    // 4. Loading a long stream: full replay vs from a snapshot at the head.
    let id = format!("{run}-long");
    let batch = 20; // dynamo-es puts a command's events in one transaction of at most 25 items
    let repository = Repository::new(store.clone()).with_snapshots_every(u64::from(sizes.stream)).with_retry(retry);
    let cqrs: EsCqrs =
        CqrsFramework::new(PersistedEventStore::new_snapshot_store(es_repo(), sizes.stream as usize), vec![], ());
    for start in (0..sizes.stream).step_by(batch) {
        let seqs = start..(start + batch as u32).min(sizes.stream);
        let cmd = Record { writer: "long".into(), seqs: seqs.clone(), note_bytes: NOTE };
        repository.execute::<Tally>(&id, &cmd, &CommandContext::default()).await.expect("build ours");
        cqrs.execute(&id, EsRecord { writer: "long".into(), seqs, note_bytes: NOTE }).await.expect("build theirs");
    }
    let es_replay = PersistedEventStore::<_, EsTally>::new_event_store(es_repo());
    let es_snapshot = PersistedEventStore::<_, EsTally>::new_snapshot_store(es_repo(), sizes.stream as usize);
    let (mut a, mut b, mut c, mut d) = (vec![], vec![], vec![], vec![]);
    let (mut ra, mut rb, mut rc, mut rd) = (0, 0, 0, 0);
    for _ in 0..sizes.loads {
        let (r0, t0) = (ours_requests.get(), Instant::now());
        let replayed = repository.replay::<Tally>(&id).await.expect("replay");
        a.push(t0.elapsed());
        ra = ours_requests.get() - r0;
        assert_eq!(replayed.events_replayed, sizes.stream as usize);
        let (r0, t0) = (ours_requests.get(), Instant::now());
        let loaded = repository.load::<Tally>(&id).await.expect("load");
        b.push(t0.elapsed());
        rb = ours_requests.get() - r0;
        assert_eq!(loaded.snapshot_version, Some(u64::from(sizes.stream)));
        let (r0, t0) = (theirs_requests.get(), Instant::now());
        let mut ctx = es_replay.load_aggregate(&id).await.expect("es replay");
        c.push(t0.elapsed());
        rc = theirs_requests.get() - r0;
        assert_eq!(cqrs_es::AggregateContext::aggregate(&mut ctx).entries, sizes.stream as usize);
        let (r0, t0) = (theirs_requests.get(), Instant::now());
        es_snapshot.load_aggregate(&id).await.expect("es snapshot");
        d.push(t0.elapsed());
        rd = theirs_requests.get() - r0;
    }
    let label_replay: &'static str =
        if full { "load 1,000 events, full replay: ms (median)" } else { "load events, full replay: ms (median)" };
    let label_snap: &'static str =
        if full { "load 1,000 events, from snapshot: ms (median)" } else { "load events, from snapshot: ms (median)" };
    rows.push(Row { label: label_replay, ours: median_ms(a), theirs: median_ms(c) });
    rows.push(Row { label: "  DynamoDB requests per load", ours: ra.to_string(), theirs: rc.to_string() });
    rows.push(Row { label: label_snap, ours: median_ms(b), theirs: median_ms(d) });
    rows.push(Row { label: "  DynamoDB requests per load", ours: rb.to_string(), theirs: rd.to_string() });

    let endpoint = aws.vars.get("AWS_ENDPOINT_URL_DYNAMODB").cloned().unwrap_or_default();
    println!(
        "\nEvent store benchmark ({}) on DynamoDB Local at {endpoint}; payload note {NOTE} B",
        if full { "full" } else { "smoke size; run `cargo bench` for figures" }
    );
    println!("{:<48} {:>14} {:>14}", "", "this store", "dynamo-es 0.5");
    for row in rows {
        println!("{:<48} {:>14} {:>14}", row.label, row.ours, row.theirs);
    }
}
