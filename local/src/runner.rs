//! The local runner: what Lambda's event source mappings do, for the functions of the template.
//!
//! Each `AWS::Serverless::Function` the [`Invoke`] serves gets one mapping per `SQS` or
//! `DynamoDB` entry of its `Events` (resolved by the provisioner: queue ARN, stream ARN). The
//! runner knows nothing about the functions: it builds Lambda's event, invokes the function by
//! logical id through the local Lambda service (its real binary) and reads Lambda's response.
//!
//! **SQS.** Pollers long-poll (20 s) for up to `BatchSize` messages (gathering for
//! `MaximumBatchingWindowInSeconds` when it is set): one while the queue is idle, more while
//! polls find messages, up to `ScalingConfig.MaximumConcurrency` (at least 2). They build a real
//! [`SqsEvent`] and invoke. On success every message is deleted except, with
//! `ReportBatchItemFailures`, the ones the response lists: those come back after the visibility
//! timeout, so the queue's redrive policy moves them to its DLQ as on AWS. A function error or a
//! timeout deletes nothing. A response naming a message that is not in the batch (or an empty
//! id) fails the whole batch, as Lambda does. Messages that match no filter are deleted unseen.
//!
//! **DynamoDB streams.** Shards are discovered with `DescribeStream` (and again every few
//! seconds); a child shard starts only once its parent is read to the end, so per key the
//! order holds. Records are converted to Lambda's [`EventRecord`], filtered, and delivered in
//! order in batches of up to `BatchSize`. With `ReportBatchItemFailures` the first failed
//! sequence number is where the next delivery starts; a function error retries the whole batch.
//! Retries back off; after `MaximumRetryAttempts` (unless -1) the batch is skipped with an error
//! log naming its sequence numbers, and recorded as Lambda records it (`DDBStreamBatchInfo`) on
//! `DestinationConfig.OnFailure` when that is an SQS queue. Delivery is in order and at least
//! once per shard. With `ParallelizationFactor` N, up to N batches of a shard are in flight at
//! once, its records split into N lanes by partition key (from `DescribeStream`'s key schema), so
//! each key's records still arrive in order; the position recorded is the end of the longest
//! handled prefix, and a failing lane holds the next round back until it is retried or skipped.
//!
//! Differences from AWS, by design: positions live in memory unless the runner is given a file
//! ([`Runner::with_checkpoints`], as `local-env run` does); without one, a new runner starts
//! again from `StartingPosition` (with TRIM_HORIZON that replays the stream's 24 hours);
//! `BisectBatchOnFunctionError`, `MaximumRecordAgeInSeconds`, destinations other than SQS and
//! tumbling windows are not modelled; FIFO queues get no ordering beyond what SQS itself gives.
//!
//! Timeouts, crashes and function errors are the Lambda service's: each comes back as a function
//! error, which fails the whole batch (an unreadable response does too, as on Lambda).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use aws_lambda_events::encodings::Base64Data;
use aws_lambda_events::event::dynamodb::{Event as DynamoDbEvent, EventRecord};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage, SqsMessageAttribute};
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::Stack;
use crate::filter::Filters;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What the mappings invoke functions through: the local Lambda service
/// ([`crate::lambda::LambdaService`]), which runs each function's own binary. The runner's own
/// tests put a double of it here, to script what a function answers.
pub trait Invoke: Send + Sync {
    /// Whether `function` (a logical id) can be invoked.
    fn serves(&self, function: &str) -> bool;
    /// A synchronous invocation with a JSON payload: the response payload, or the function
    /// error (a timeout, a crash or an error the function returned), which fails the batch.
    fn invoke(&self, function: &str, payload: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>>;
    /// The same, in the caller's X-Ray trace (`X-Amzn-Trace-Id`), as API Gateway invokes.
    /// Where the trace cannot be passed on, it is a plain invocation.
    fn invoke_traced(
        &self,
        function: &str,
        payload: Vec<u8>,
        trace_header: Option<String>,
    ) -> BoxFuture<Result<Vec<u8>, String>> {
        let _ = trace_header;
        self.invoke(function, payload)
    }
}

/// The clients the runner polls with, each pointed at its emulator.
pub struct RunnerClients {
    pub sqs: aws_sdk_sqs::Client,
    pub streams: aws_sdk_dynamodbstreams::Client,
}

impl RunnerClients {
    /// From an SDK configuration; `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL_DYNAMODB_STREAMS`
    /// (or `AWS_ENDPOINT_URL`) apply as the SDK reads them.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self { sqs: aws_sdk_sqs::Client::new(config), streams: aws_sdk_dynamodbstreams::Client::new(config) }
    }
}

/// Stream positions, per mapping and shard: the last sequence number whose records are all
/// handled. An event source mapping keeps its position for as long as it exists, so with a file
/// ([`Runner::with_checkpoints`]) a new runner resumes where the last one stopped instead of
/// replaying the stream from `StartingPosition`. Keyed by stream ARN too: a recreated table
/// (new stream) starts afresh.
#[derive(Debug, Default)]
struct Checkpoints {
    file: Option<std::path::PathBuf>,
    positions: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl Checkpoints {
    fn load(file: std::path::PathBuf) -> Self {
        let positions =
            std::fs::read_to_string(&file).ok().and_then(|text| serde_json::from_str(&text).ok()).unwrap_or_default();
        Self { file: Some(file), positions: std::sync::Mutex::new(positions) }
    }

    fn key(mapping: &str, stream_arn: &str, shard: &str) -> String {
        format!("{mapping} {stream_arn} {shard}")
    }

    fn get(&self, mapping: &str, stream_arn: &str, shard: &str) -> Option<String> {
        self.positions.lock().ok()?.get(&Self::key(mapping, stream_arn, shard)).cloned()
    }

    /// Whether the mapping has read this stream before (so a shard it has not seen is new).
    fn knows(&self, mapping: &str, stream_arn: &str) -> bool {
        let prefix = format!("{mapping} {stream_arn} ");
        self.positions.lock().is_ok_and(|p| p.keys().any(|k| k.starts_with(&prefix)))
    }

    fn set(&self, mapping: &str, stream_arn: &str, shard: &str, sequence: &str) {
        if let Ok(mut positions) = self.positions.lock() {
            positions.insert(Self::key(mapping, stream_arn, shard), sequence.to_owned());
        }
    }

    fn save(&self) {
        let Some(file) = &self.file else { return };
        let Ok(positions) = self.positions.lock().map(|p| p.clone()) else { return };
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(file, serde_json::to_vec_pretty(&positions).unwrap_or_default()));
        if let Err(e) = written {
            warn!(file = %file.display(), error = %e, "stream positions not saved: the next run replays from StartingPosition");
        }
    }
}

/// How often a DynamoDB stream is described again, to find new shards.
const SHARD_DISCOVERY: Duration = Duration::from_secs(3);
/// The pause after an empty `GetRecords`.
const STREAM_POLL: Duration = Duration::from_millis(250);
const GET_RECORDS_LIMIT: i32 = 1000;

struct Source {
    function: String,
    event: String,
    filters: Filters,
    report_batch_item_failures: bool,
    batch_size: usize,
    region: String,
}

impl Source {
    fn name(&self) -> String {
        format!("{}.{}", self.function, self.event)
    }

    fn options(&self) -> String {
        let mut parts = vec![format!("BatchSize {}", self.batch_size)];
        if self.report_batch_item_failures {
            parts.push("ReportBatchItemFailures".into());
        }
        if !self.filters.is_empty() {
            parts.push(format!("{} filter(s)", self.filters.len()));
        }
        parts.join(", ")
    }
}

struct SqsMapping {
    source: Source,
    queue_arn: String,
    queue_name: String,
    account: String,
    window: Duration,
    concurrency: usize,
    functions: Arc<dyn Invoke>,
}

struct StreamMapping {
    source: Source,
    stream_arn: String,
    starting_position: ShardIteratorType,
    max_retry_attempts: i64,
    /// `ParallelizationFactor`: batches of one shard in flight at once, records split by
    /// partition key so that each key's records stay in order.
    parallelization_factor: usize,
    /// `DestinationConfig.OnFailure` when it is an SQS queue: where a skipped batch is recorded.
    on_failure: Option<Destination>,
    function_arn: String,
    functions: Arc<dyn Invoke>,
}

struct Destination {
    arn: String,
    queue_name: String,
    account: String,
}

enum Mapping {
    Sqs(Arc<SqsMapping>),
    Stream(Arc<StreamMapping>),
}

impl Mapping {
    fn describe(&self) -> String {
        match self {
            Self::Sqs(m) => format!(
                "{}: SQS {} -> {} (MaximumConcurrency {}, MaximumBatchingWindowInSeconds {}, {})",
                m.source.name(),
                m.queue_arn,
                m.source.function,
                m.concurrency,
                m.window.as_secs(),
                m.source.options()
            ),
            Self::Stream(m) => format!(
                "{}: DynamoDB {} -> {} ({}, MaximumRetryAttempts {}, ParallelizationFactor {}, {}{})",
                m.source.name(),
                m.stream_arn,
                m.source.function,
                m.starting_position.as_str(),
                m.max_retry_attempts,
                m.parallelization_factor,
                m.source.options(),
                m.on_failure.as_ref().map(|d| format!(", OnFailure {}", d.arn)).unwrap_or_default()
            ),
        }
    }
}

/// The event source mappings of a stack, ready to [`start`](Runner::start).
pub struct Runner {
    mappings: Vec<Mapping>,
    skipped: Vec<String>,
    clients: RunnerClients,
    checkpoints: Arc<Checkpoints>,
}

impl Runner {
    /// One mapping per (function, event) whose function `functions` serves; events of other
    /// types (Api, HttpApi, Schedule…), disabled events and functions not served are listed in
    /// [`skipped`](Runner::skipped). An invalid event (bad ARN, bad filter pattern) is an error.
    pub fn new(stack: &Stack, clients: RunnerClients, functions: Arc<dyn Invoke>) -> anyhow::Result<Self> {
        let mut mappings = Vec::new();
        let mut skipped = Vec::new();
        let sqs_region = clients.sqs.config().region().map(|r| r.to_string());
        let streams_region = clients.streams.config().region().map(|r| r.to_string());
        for (function, props) in &stack.function_properties {
            let events = props.get("Events").and_then(Value::as_object);
            for (event, spec) in events.into_iter().flatten() {
                let kind = spec.get("Type").and_then(Value::as_str).unwrap_or("(no Type)");
                let p = spec.get("Properties").unwrap_or(&Value::Null);
                let context = || format!("{function}.{event} ({kind})");
                if kind != "SQS" && kind != "DynamoDB" {
                    skipped.push(format!("{function}.{event} ({kind}): event type not run by the local runner"));
                    continue;
                }
                if !functions.serves(function) {
                    skipped.push(format!("{function}.{event} ({kind}): {function} is not served"));
                    continue;
                }
                if boolean(p.get("Enabled")).with_context(context)? == Some(false) {
                    skipped.push(format!("{function}.{event} ({kind}): Enabled is false"));
                    continue;
                }
                let source = |batch_default: i64, region: &Option<String>, arn: &Arn| -> anyhow::Result<Source> {
                    let batch_size = integer(p.get("BatchSize"))?.unwrap_or(batch_default);
                    if !(1..=10_000).contains(&batch_size) {
                        bail!("BatchSize {batch_size} is out of range (1 to 10000)");
                    }
                    Ok(Source {
                        function: function.clone(),
                        event: event.clone(),
                        filters: Filters::from_criteria(p.get("FilterCriteria"))?,
                        report_batch_item_failures: reports_batch_item_failures(p.get("FunctionResponseTypes")),
                        batch_size: batch_size as usize,
                        region: region.clone().unwrap_or_else(|| arn.region.clone()),
                    })
                };
                let mapping = match kind {
                    "SQS" => {
                        let queue_arn = p.get("Queue").and_then(Value::as_str).context("Queue (an ARN) is missing");
                        let queue_arn = queue_arn.with_context(context)?;
                        let arn = Arn::parse(queue_arn, "sqs").with_context(context)?;
                        let window = integer(p.get("MaximumBatchingWindowInSeconds")).with_context(context)?;
                        let concurrency =
                            integer(p.pointer("/ScalingConfig/MaximumConcurrency")).with_context(context)?;
                        Mapping::Sqs(Arc::new(SqsMapping {
                            source: source(10, &sqs_region, &arn).with_context(context)?,
                            queue_arn: queue_arn.to_owned(),
                            queue_name: arn.resource.clone(),
                            account: arn.account.clone(),
                            window: Duration::from_secs(window.unwrap_or(0).clamp(0, 300) as u64),
                            concurrency: concurrency.unwrap_or(2).max(2) as usize,
                            functions: functions.clone(),
                        }))
                    }
                    _ => {
                        let stream_arn = p.get("Stream").and_then(Value::as_str).context("Stream (an ARN) is missing");
                        let stream_arn = stream_arn.with_context(context)?;
                        let arn = Arn::parse(stream_arn, "dynamodb").with_context(context)?;
                        if !arn.resource.contains("/stream/") {
                            bail!("{}: {stream_arn} is not a stream ARN", context());
                        }
                        let starting_position = match p.get("StartingPosition").and_then(Value::as_str) {
                            Some("TRIM_HORIZON") => ShardIteratorType::TrimHorizon,
                            Some("LATEST") => ShardIteratorType::Latest,
                            other => bail!("{}: StartingPosition {other:?} (TRIM_HORIZON or LATEST)", context()),
                        };
                        let max_retry_attempts = integer(p.get("MaximumRetryAttempts")).with_context(context)?;
                        let parallelization_factor =
                            integer(p.get("ParallelizationFactor")).with_context(context)?.unwrap_or(1);
                        if !(1..=10).contains(&parallelization_factor) {
                            bail!("{}: ParallelizationFactor {parallelization_factor} (1 to 10)", context());
                        }
                        let on_failure = match p.pointer("/DestinationConfig/OnFailure/Destination") {
                            None | Some(Value::Null) => None,
                            Some(Value::String(destination)) if Arn::parse(destination, "sqs").is_ok() => {
                                let queue = Arn::parse(destination, "sqs")?;
                                Some(Destination {
                                    arn: destination.clone(),
                                    queue_name: queue.resource,
                                    account: queue.account,
                                })
                            }
                            Some(other) => {
                                skipped.push(format!(
                                    "{function}.{event} (DynamoDB): DestinationConfig.OnFailure {other} is not an SQS \
                                     queue: skipped batches are only logged"
                                ));
                                None
                            }
                        };
                        let function_arn = stack
                            .resources
                            .get(function)
                            .and_then(|r| r.attributes.get("Arn"))
                            .cloned()
                            .unwrap_or_else(|| {
                                format!("arn:aws:lambda:{}:{}:function:{function}", arn.region, arn.account)
                            });
                        Mapping::Stream(Arc::new(StreamMapping {
                            source: source(100, &streams_region, &arn).with_context(context)?,
                            stream_arn: stream_arn.to_owned(),
                            starting_position,
                            max_retry_attempts: max_retry_attempts.unwrap_or(-1).max(-1),
                            parallelization_factor: parallelization_factor as usize,
                            on_failure,
                            function_arn,
                            functions: functions.clone(),
                        }))
                    }
                };
                mappings.push(mapping);
            }
        }
        Ok(Self { mappings, skipped, clients, checkpoints: Arc::new(Checkpoints::default()) })
    }

    /// Keeps stream positions in `file` across runs (read now, written when stopped).
    pub fn with_checkpoints(mut self, file: impl Into<std::path::PathBuf>) -> Self {
        self.checkpoints = Arc::new(Checkpoints::load(file.into()));
        self
    }

    /// Human-readable, one per mapping.
    pub fn mappings(&self) -> Vec<String> {
        self.mappings.iter().map(Mapping::describe).collect()
    }

    /// What is not run, and why.
    pub fn skipped(&self) -> Vec<String> {
        self.skipped.clone()
    }

    /// Starts every mapping as tokio tasks (call it inside a tokio runtime); the handle's
    /// [`stop`](RunnerHandle::stop) ends them cleanly. Dropping the handle aborts them.
    pub fn start(self) -> RunnerHandle {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for mapping in self.mappings {
            info!(mapping = %mapping.describe(), "starting");
            let stop = Stop(stop_rx.clone());
            match mapping {
                Mapping::Sqs(m) => tasks.spawn(run_sqs(m, self.clients.sqs.clone(), stop)),
                Mapping::Stream(m) => tasks.spawn(run_stream(
                    m,
                    self.clients.streams.clone(),
                    self.clients.sqs.clone(),
                    self.checkpoints.clone(),
                    stop,
                )),
            };
        }
        RunnerHandle { stop: stop_tx, tasks, checkpoints: self.checkpoints }
    }
}

/// The running mappings.
pub struct RunnerHandle {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    checkpoints: Arc<Checkpoints>,
}

impl RunnerHandle {
    /// Stops polling and waits for every task to end. An invocation under way finishes first
    /// (bounded by the function's timeout) and its batch is settled (deleted / checkpointed).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        while let Some(ended) = self.tasks.join_next().await {
            if let Err(e) = ended {
                error!(error = %e, "a runner task ended abnormally");
            }
        }
        self.checkpoints.save();
    }
}

// ---------------------------------------------------------------------------------------------
// Shared plumbing

/// The stop signal, as each task sees it.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn is_set(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Returns once stopped (or once the handle is gone).
    async fn wait(&mut self) {
        let _ = self.0.wait_for(|stopped| *stopped).await;
    }

    /// Runs `f` unless stopped first: `None` means stopped.
    async fn run<F: Future>(&mut self, f: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.wait() => None,
            out = f => Some(out),
        }
    }

    /// Sleeps; `true` if stopped meanwhile.
    async fn sleep(&mut self, pause: Duration) -> bool {
        self.run(tokio::time::sleep(pause)).await.is_none()
    }
}

/// Exponential backoff with jitter, capped at 2 s: 100 ms, 200 ms, 400 ms… (each between half
/// and all of it).
fn backoff(attempt: u32) -> Duration {
    let ceiling = (100u64 << attempt.saturating_sub(1).min(5)).min(2_000);
    Duration::from_millis(ceiling / 2 + fastrand::u64(0..=ceiling / 2))
}

/// SDK errors are logged as warnings at first, then only now and then while they persist.
fn sdk_error(mapping: &str, what: &str, attempt: u32, error: &str) {
    if attempt <= 1 || attempt.is_multiple_of(30) {
        warn!(mapping, attempt, error, "{what} failed; retrying with backoff");
    } else {
        debug!(mapping, attempt, error, "{what} failed; retrying with backoff");
    }
}

/// Invokes `function` with Lambda's event and reads Lambda's response: an empty or `null`
/// response is a success with nothing reported; a function error or a response that is not the
/// expected JSON fails the batch.
async fn invoke<R: serde::de::DeserializeOwned + Default>(
    functions: &dyn Invoke,
    function: &str,
    event: &impl serde::Serialize,
) -> Result<R, String> {
    let payload = serde_json::to_vec(event).map_err(|e| format!("the event does not serialize: {e}"))?;
    let response = functions.invoke(function, payload).await?;
    let text = std::str::from_utf8(&response).map_err(|_| "the response is not UTF-8".to_owned())?.trim();
    if text.is_empty() || text == "null" {
        return Ok(R::default());
    }
    serde_json::from_str(text).map_err(|e| format!("the response is not a batch response ({e}): {text}"))
}

struct Arn {
    region: String,
    account: String,
    resource: String,
}

impl Arn {
    /// `arn:<partition>:<service>:<region>:<account>:<resource>`
    fn parse(arn: &str, service: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        match parts.as_slice() {
            ["arn", _, s, region, account, resource] if *s == service && !resource.is_empty() => Ok(Self {
                region: (*region).to_owned(),
                account: (*account).to_owned(),
                resource: (*resource).to_owned(),
            }),
            _ => bail!("{arn} is not an {service} ARN"),
        }
    }
}

fn integer(value: Option<&Value>) -> anyhow::Result<Option<i64>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).with_context(|| format!("{n} is not an integer")),
        Some(Value::String(s)) => s.trim().parse().map(Some).with_context(|| format!("{s:?} is not an integer")),
        Some(other) => bail!("{other} is not an integer"),
    }
}

fn boolean(value: Option<&Value>) -> anyhow::Result<Option<bool>> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => bail!("{other} is not a boolean"),
    }
}

fn reports_batch_item_failures(types: Option<&Value>) -> bool {
    match types {
        Some(Value::Array(items)) => items.iter().any(|t| t == "ReportBatchItemFailures"),
        Some(Value::String(s)) => s == "ReportBatchItemFailures",
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// SQS

async fn run_sqs(m: Arc<SqsMapping>, client: aws_sdk_sqs::Client, mut stop: Stop) {
    let name = m.source.name();
    let mut attempt = 0;
    let url = loop {
        let request = client.get_queue_url().queue_name(&m.queue_name).queue_owner_aws_account_id(&m.account).send();
        match stop.run(request).await {
            None => return,
            Some(Ok(found)) if found.queue_url().is_some() => break found.queue_url.unwrap_or_default(),
            Some(Ok(_)) => sdk_error(&name, "GetQueueUrl", attempt + 1, "no QueueUrl in the response"),
            Some(Err(e)) => {
                sdk_error(&name, "GetQueueUrl", attempt + 1, &aws_sdk_sqs::error::DisplayErrorContext(&e).to_string())
            }
        }
        attempt += 1;
        if stop.sleep(backoff(attempt)).await {
            return;
        }
    };
    info!(mapping = %name, %url, max_pollers = m.concurrency, "polling the queue");
    // One long-polling poller while the queue is idle; each poll that finds messages asks for
    // another, up to MaximumConcurrency; an extra poller leaves once a poll comes back empty.
    let (grow, mut wants_more) = tokio::sync::mpsc::channel::<()>(1);
    let mut pollers = JoinSet::new();
    pollers.spawn(sqs_poller(m.clone(), client.clone(), url.clone(), stop.clone(), grow.clone(), false));
    loop {
        tokio::select! {
            Some(()) = wants_more.recv() => {
                if pollers.len() < m.concurrency {
                    debug!(mapping = %name, pollers = pollers.len() + 1, "backlog: one more poller");
                    pollers.spawn(sqs_poller(m.clone(), client.clone(), url.clone(), stop.clone(), grow.clone(), true));
                }
            }
            ended = pollers.join_next() => match ended {
                None => break,
                Some(Err(e)) => error!(mapping = %name, error = %e, "an SQS poller ended abnormally"),
                Some(Ok(())) => {}
            },
        }
    }
}

/// How long a receive waits for a message: SQS's longest long poll, as Lambda's pollers use.
/// An idle queue costs one request per poller every 20 s; a message sent, or one whose
/// visibility timeout ends, answers a waiting poll at once (LocalStack included).
const LONG_POLL_SECONDS: i32 = 20;

async fn sqs_poller(
    m: Arc<SqsMapping>,
    client: aws_sdk_sqs::Client,
    url: String,
    mut stop: Stop,
    grow: tokio::sync::mpsc::Sender<()>,
    extra: bool,
) {
    let name = m.source.name();
    let mut failures = 0;
    while !stop.is_set() {
        let messages = match stop.run(receive(&m, &client, &url)).await {
            None => break,
            Some(Ok(messages)) => {
                failures = 0;
                messages
            }
            Some(Err(e)) => {
                failures += 1;
                sdk_error(&name, "ReceiveMessage", failures, &e);
                if stop.sleep(backoff(failures)).await {
                    break;
                }
                continue;
            }
        };
        if messages.is_empty() {
            if extra {
                break;
            }
            continue;
        }
        // Full or not, messages mean a backlog may be building: ask for a poller (a no-op at
        // the limit, or while an earlier request is pending).
        let _ = grow.try_send(());
        process_sqs_batch(&m, &client, &url, messages).await;
    }
}

/// One batch: up to `BatchSize` messages. The first receive long-polls; once a message is in,
/// the batch gathers for `MaximumBatchingWindowInSeconds` when it is set. Empty when a long
/// poll found nothing.
async fn receive(
    m: &SqsMapping,
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> Result<Vec<aws_sdk_sqs::types::Message>, String> {
    let mut batch = Vec::new();
    let mut window_ends: Option<Instant> = None;
    loop {
        let wanted = (m.source.batch_size - batch.len()).min(10) as i32;
        let wait = match window_ends {
            None => LONG_POLL_SECONDS,
            Some(ends) => ends.saturating_duration_since(Instant::now()).as_secs().min(20) as i32,
        };
        let received = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(wanted)
            .wait_time_seconds(wait)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await;
        match received {
            Ok(out) => batch.extend(out.messages.unwrap_or_default()),
            Err(e) if batch.is_empty() => return Err(aws_sdk_sqs::error::DisplayErrorContext(&e).to_string()),
            Err(e) => {
                let error = aws_sdk_sqs::error::DisplayErrorContext(&e).to_string();
                warn!(mapping = %m.source.name(), error, "ReceiveMessage failed; invoking with what was received");
                return Ok(batch);
            }
        }
        if batch.is_empty() || batch.len() >= m.source.batch_size {
            return Ok(batch);
        }
        let ends = *window_ends.get_or_insert_with(|| Instant::now() + m.window);
        if Instant::now() >= ends {
            return Ok(batch);
        }
    }
}

async fn process_sqs_batch(
    m: &SqsMapping,
    client: &aws_sdk_sqs::Client,
    url: &str,
    messages: Vec<aws_sdk_sqs::types::Message>,
) {
    let name = m.source.name();
    let records = messages.into_iter().map(|msg| sqs_record(msg, &m.queue_arn, &m.source.region));
    let (records, filtered_out): (Vec<SqsMessage>, Vec<SqsMessage>) =
        records.partition(|r| m.source.filters.is_empty() || m.source.filters.matches(&sqs_filter_view(r)));
    if !filtered_out.is_empty() {
        // Lambda deletes the messages no filter matches.
        debug!(mapping = %name, count = filtered_out.len(), "deleting messages that match no filter");
        delete_messages(&name, client, url, &receipts(&filtered_out)).await;
    }
    if records.is_empty() {
        return;
    }
    let handles = receipts(&records);
    let mut event = SqsEvent::default();
    event.records = records;
    let count = handles.len();
    let retained: HashSet<String> =
        match invoke::<SqsBatchResponse>(m.functions.as_ref(), &m.source.function, &event).await {
            Err(e) => {
                warn!(mapping = %name, count, error = %e, "function error: the batch returns to the queue");
                return;
            }
            Ok(response) if m.source.report_batch_item_failures => {
                let ids: HashSet<&str> = handles.iter().map(|(id, _)| id.as_str()).collect();
                let failed: HashSet<String> =
                    response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect();
                if let Some(bad) = failed.iter().find(|id| !ids.contains(id.as_str())) {
                    warn!(
                        mapping = %name,
                        item_identifier = %bad,
                        "a batch item failure names no message of the batch: the whole batch fails"
                    );
                    return;
                }
                if !failed.is_empty() {
                    debug!(mapping = %name, failed = ?failed, "batch item failures stay on the queue");
                }
                failed
            }
            Ok(_) => HashSet::new(),
        };
    let done: Vec<(String, String)> = handles.into_iter().filter(|(id, _)| !retained.contains(id)).collect();
    delete_messages(&name, client, url, &done).await;
}

/// (messageId, receiptHandle) of each record.
fn receipts(records: &[SqsMessage]) -> Vec<(String, String)> {
    records
        .iter()
        .map(|r| (r.message_id.clone().unwrap_or_default(), r.receipt_handle.clone().unwrap_or_default()))
        .collect()
}

async fn delete_messages(mapping: &str, client: &aws_sdk_sqs::Client, url: &str, messages: &[(String, String)]) {
    use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
    for chunk in messages.chunks(10) {
        let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
            .iter()
            .enumerate()
            .filter_map(|(i, (_, receipt))| {
                DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(receipt).build().ok()
            })
            .collect();
        for attempt in 1..=3 {
            match client.delete_message_batch().queue_url(url).set_entries(Some(entries.clone())).send().await {
                Ok(out) => {
                    for failed in out.failed() {
                        let message_id = failed.id().parse::<usize>().ok().and_then(|i| chunk.get(i)).map(|m| &m.0);
                        warn!(mapping, ?message_id, code = failed.code(), "delete failed: the message will come back");
                    }
                    break;
                }
                Err(e) => {
                    let error = aws_sdk_sqs::error::DisplayErrorContext(&e).to_string();
                    warn!(mapping, attempt, error, "DeleteMessageBatch failed");
                    if attempt < 3 {
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
            }
        }
    }
}

/// An SQS message as Lambda delivers it.
fn sqs_record(msg: aws_sdk_sqs::types::Message, queue_arn: &str, region: &str) -> SqsMessage {
    let mut record = SqsMessage::default();
    record.attributes =
        msg.attributes.unwrap_or_default().into_iter().map(|(k, v)| (k.as_str().to_owned(), v)).collect();
    record.message_attributes =
        msg.message_attributes.unwrap_or_default().into_iter().map(|(k, v)| (k, sqs_attribute(v))).collect();
    record.message_id = msg.message_id;
    record.receipt_handle = msg.receipt_handle;
    record.body = msg.body;
    record.md5_of_body = msg.md5_of_body;
    record.md5_of_message_attributes = msg.md5_of_message_attributes;
    record.event_source = Some("aws:sqs".to_owned());
    record.event_source_arn = Some(queue_arn.to_owned());
    record.aws_region = Some(region.to_owned());
    record
}

fn base64_data(bytes: Vec<u8>) -> Base64Data {
    let mut data = Base64Data::default();
    data.0 = bytes;
    data
}

fn sqs_attribute(value: aws_sdk_sqs::types::MessageAttributeValue) -> SqsMessageAttribute {
    let mut attribute = SqsMessageAttribute::default();
    attribute.string_value = value.string_value;
    attribute.binary_value = value.binary_value.map(|b| base64_data(b.into_inner()));
    attribute.string_list_values = value.string_list_values.unwrap_or_default();
    attribute.binary_list_values =
        value.binary_list_values.unwrap_or_default().into_iter().map(|b| base64_data(b.into_inner())).collect();
    attribute.data_type = Some(value.data_type);
    attribute
}

/// What an SQS filter is matched against: the message, with a JSON body parsed.
fn sqs_filter_view(record: &SqsMessage) -> Value {
    let mut view = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(parsed) = record.body.as_deref().and_then(|b| serde_json::from_str::<Value>(b).ok()) {
        view["body"] = parsed;
    }
    view
}

// ---------------------------------------------------------------------------------------------
// DynamoDB streams

async fn run_stream(
    m: Arc<StreamMapping>,
    client: aws_sdk_dynamodbstreams::Client,
    sqs: aws_sdk_sqs::Client,
    checkpoints: Arc<Checkpoints>,
    mut stop: Stop,
) {
    let name = m.source.name();
    // A mapping that read this stream before starts its new shards at their beginning.
    let mut initial = !checkpoints.knows(&name, &m.stream_arn);
    // Shard id -> "read to the end", for the children to wait on.
    let mut known: HashMap<String, watch::Receiver<bool>> = HashMap::new();
    let mut shards = JoinSet::new();
    let mut failures = 0;
    loop {
        match stop.run(list_shards(&client, &m.stream_arn)).await {
            None => break,
            Some(Ok((listed, partition_key))) => {
                failures = 0;
                let ids: HashSet<String> = listed.iter().filter_map(|s| s.shard_id.clone()).collect();
                let mut remaining: Vec<_> = listed
                    .into_iter()
                    .filter(|s| s.shard_id.as_ref().is_some_and(|id| !known.contains_key(id)))
                    .collect();
                // Parents first, so that each child can wait for its parent.
                while !remaining.is_empty() {
                    let (ready, rest): (Vec<_>, Vec<_>) = remaining.into_iter().partition(|s| {
                        s.parent_shard_id.as_ref().is_none_or(|p| !ids.contains(p) || known.contains_key(p))
                    });
                    // No progress (a parent loop, which DynamoDB never reports): take them all.
                    let ready = if ready.is_empty() {
                        remaining = Vec::new();
                        rest
                    } else {
                        remaining = rest;
                        ready
                    };
                    for shard in ready {
                        let id = shard.shard_id.clone().unwrap_or_default();
                        let position =
                            if initial { m.starting_position.clone() } else { ShardIteratorType::TrimHorizon };
                        let parent = shard.parent_shard_id.as_ref().and_then(|p| known.get(p)).cloned();
                        let (done_tx, done_rx) = watch::channel(false);
                        known.insert(id.clone(), done_rx);
                        debug!(mapping = %name, shard = %id, position = position.as_str(), "reading a new shard");
                        let mut reader = ShardReader::new(m.clone(), client.clone(), sqs.clone(), id, position);
                        reader.last_sequence = checkpoints.get(&name, &m.stream_arn, &reader.shard_id);
                        reader.checkpoints = checkpoints.clone();
                        reader.partition_key = partition_key.clone();
                        shards.spawn(reader.run(parent, done_tx, stop.clone()));
                    }
                }
                initial = false;
            }
            Some(Err(e)) => {
                failures += 1;
                sdk_error(&name, "DescribeStream", failures, &e);
            }
        }
        while let Some(ended) = shards.try_join_next() {
            if let Err(e) = ended {
                error!(mapping = %name, error = %e, "a shard reader ended abnormally");
            }
        }
        let pause = if failures == 0 { SHARD_DISCOVERY } else { backoff(failures) };
        if stop.sleep(pause).await {
            break;
        }
    }
    while let Some(ended) = shards.join_next().await {
        if let Err(e) = ended {
            error!(mapping = %name, error = %e, "a shard reader ended abnormally");
        }
    }
}

/// The stream's shards, and the name of its table's partition key (the key Lambda splits a
/// shard's records by under `ParallelizationFactor`).
async fn list_shards(
    client: &aws_sdk_dynamodbstreams::Client,
    stream_arn: &str,
) -> Result<(Vec<aws_sdk_dynamodbstreams::types::Shard>, Option<String>), String> {
    use aws_sdk_dynamodbstreams::types::KeyType;
    let mut shards = Vec::new();
    let mut partition_key = None;
    let mut start: Option<String> = None;
    loop {
        let described = client
            .describe_stream()
            .stream_arn(stream_arn)
            .set_exclusive_start_shard_id(start.clone())
            .send()
            .await
            .map_err(|e| aws_sdk_dynamodbstreams::error::DisplayErrorContext(&e).to_string())?;
        let Some(description) = described.stream_description else { break };
        partition_key = partition_key.or_else(|| {
            let keys = description.key_schema.as_deref().unwrap_or_default();
            keys.iter().find(|k| k.key_type == KeyType::Hash).map(|k| k.attribute_name.clone())
        });
        shards.extend(description.shards.unwrap_or_default());
        match description.last_evaluated_shard_id {
            Some(last) if start.as_ref() != Some(&last) => start = Some(last),
            _ => break,
        }
    }
    Ok((shards, partition_key))
}

/// Reads one shard to its end (or until stopped), delivering in order.
struct ShardReader {
    m: Arc<StreamMapping>,
    client: aws_sdk_dynamodbstreams::Client,
    sqs: aws_sdk_sqs::Client,
    shard_id: String,
    name: String,
    position: ShardIteratorType,
    iterator: Option<String>,
    /// The last record read (delivered or filtered out): where a new iterator resumes.
    last_sequence: Option<String>,
    /// The shard has no more records (no next iterator).
    closed: bool,
    /// The last `GetRecords` returned nothing.
    caught_up: bool,
    /// Records read and matching the filters, not yet handled successfully.
    pending: VecDeque<EventRecord>,
    /// Failed invocations of the batch at the head of `pending`.
    attempts: u32,
    /// Where the position is recorded once records are handled.
    checkpoints: Arc<Checkpoints>,
    /// The table's partition key attribute, when the stream names it.
    partition_key: Option<String>,
}

impl ShardReader {
    fn new(
        m: Arc<StreamMapping>,
        client: aws_sdk_dynamodbstreams::Client,
        sqs: aws_sdk_sqs::Client,
        shard_id: String,
        position: ShardIteratorType,
    ) -> Self {
        let name = m.source.name();
        Self {
            m,
            client,
            sqs,
            shard_id,
            name,
            position,
            iterator: None,
            last_sequence: None,
            closed: false,
            caught_up: false,
            pending: VecDeque::new(),
            attempts: 0,
            checkpoints: Arc::new(Checkpoints::default()),
            partition_key: None,
        }
    }

    /// Records `sequence` as handled, with everything before it.
    fn checkpoint(&self, sequence: &str) {
        self.checkpoints.set(&self.name, &self.m.stream_arn, &self.shard_id, sequence);
    }

    async fn run(mut self, parent: Option<watch::Receiver<bool>>, done: watch::Sender<bool>, mut stop: Stop) {
        if let Some(mut parent) = parent {
            let parent_done = async move {
                let _ = parent.wait_for(|done| *done).await;
            };
            if stop.run(parent_done).await.is_none() {
                return;
            }
        }
        if self.read(&mut stop).await {
            debug!(mapping = %self.name, shard = %self.shard_id, "shard read to its end");
            let _ = done.send(true);
        }
    }

    /// `true` once the shard is read to its end and everything is handled; `false` if stopped.
    async fn read(&mut self, stop: &mut Stop) -> bool {
        let batch_size = self.m.source.batch_size;
        let mut failures = 0;
        loop {
            if stop.is_set() {
                return false;
            }
            let fetch =
                !self.closed && (self.pending.is_empty() || (self.pending.len() < batch_size && !self.caught_up));
            if fetch {
                match stop.run(self.fetch()).await {
                    None => return false,
                    Some(Ok(())) => {
                        failures = 0;
                        if let (true, Some(last)) = (self.pending.is_empty(), &self.last_sequence) {
                            // Everything read was filtered out or handled.
                            self.checkpoint(last);
                        }
                        if self.caught_up && self.pending.is_empty() && !self.closed && stop.sleep(STREAM_POLL).await {
                            return false;
                        }
                    }
                    Some(Err(e)) => {
                        failures += 1;
                        sdk_error(&self.name, "reading the stream", failures, &e);
                        if stop.sleep(backoff(failures)).await {
                            return false;
                        }
                    }
                }
                continue;
            }
            if self.pending.is_empty() {
                return true;
            }
            self.deliver(stop).await;
            self.caught_up = false;
        }
    }

    async fn fetch(&mut self) -> Result<(), String> {
        use aws_sdk_dynamodbstreams::error::DisplayErrorContext;
        let iterator = match self.iterator.clone() {
            Some(iterator) => iterator,
            None => {
                let request = self.client.get_shard_iterator().stream_arn(&self.m.stream_arn).shard_id(&self.shard_id);
                let request = match &self.last_sequence {
                    Some(sequence) => {
                        request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(sequence)
                    }
                    None => request.shard_iterator_type(self.position.clone()),
                };
                match request.send().await {
                    Ok(out) => match out.shard_iterator {
                        Some(iterator) => iterator,
                        None => {
                            self.closed = true;
                            return Ok(());
                        }
                    },
                    Err(e) if e.as_service_error().is_some_and(|e| e.is_trimmed_data_access_exception()) => {
                        self.trimmed();
                        return Err(DisplayErrorContext(&e).to_string());
                    }
                    Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                        warn!(mapping = %self.name, shard = %self.shard_id, "the shard is gone: stopped reading it");
                        self.closed = true;
                        return Ok(());
                    }
                    Err(e) => return Err(DisplayErrorContext(&e).to_string()),
                }
            }
        };
        let read = self.client.get_records().shard_iterator(&iterator).limit(GET_RECORDS_LIMIT).send().await;
        let out = match read {
            Ok(out) => out,
            Err(e) => {
                let service = e.as_service_error();
                if service.is_some_and(|e| e.is_expired_iterator_exception()) {
                    // A new iterator resumes after the last record read.
                    self.iterator = None;
                    return Ok(());
                }
                if service.is_some_and(|e| e.is_trimmed_data_access_exception()) {
                    self.trimmed();
                } else {
                    self.iterator = Some(iterator);
                }
                return Err(DisplayErrorContext(&e).to_string());
            }
        };
        self.iterator = out.next_shard_iterator;
        self.closed = self.iterator.is_none();
        let records = out.records.unwrap_or_default();
        self.caught_up = records.is_empty();
        for record in records {
            let converted = shared::streams::lambda_record(record, &self.m.stream_arn, &self.m.source.region);
            self.last_sequence = converted.change.sequence_number.clone();
            let filters = &self.m.source.filters;
            if filters.is_empty() || filters.matches(&serde_json::to_value(&converted).unwrap_or(Value::Null)) {
                self.pending.push_back(converted);
            }
        }
        Ok(())
    }

    fn trimmed(&mut self) {
        warn!(
            mapping = %self.name,
            shard = %self.shard_id,
            "records were trimmed before they were read: resuming at TRIM_HORIZON"
        );
        self.iterator = None;
        self.last_sequence = None;
        self.position = ShardIteratorType::TrimHorizon;
    }

    /// Invokes with the head of `pending`: one batch, or with `ParallelizationFactor` up to that
    /// many batches at once, one per lane of partition keys. Settles what was handled, or backs
    /// off for a retry of what was not.
    async fn deliver(&mut self, stop: &mut Stop) {
        let factor = self.m.parallelization_factor;
        let key = self.partition_key.as_deref();
        let lanes_of: Vec<usize> = self.pending.iter().map(|r| lane(r, key, factor)).collect();
        let (window, lanes) = plan(&lanes_of, factor, self.m.source.batch_size);
        let records: Vec<EventRecord> = self.pending.iter().take(window).cloned().collect();
        let sequences: Vec<String> =
            records.iter().map(|r| r.change.sequence_number.clone().unwrap_or_default()).collect();
        // Kept for the failure record, should records be skipped.
        let arrivals: Vec<String> =
            records.iter().map(|r| r.change.approximate_creation_date_time.to_rfc3339()).collect();
        let batches = lanes.iter().map(|lane| {
            let batch: Vec<EventRecord> = lane.iter().map(|&i| records[i].clone()).collect();
            let lane_sequences: Vec<String> = lane.iter().map(|&i| sequences[i].clone()).collect();
            self.invoke_batch(batch, lane_sequences)
        });
        let done = futures::future::join_all(batches).await;

        // What each lane handled: its records up to its first failure.
        let mut handled = vec![false; window];
        for (lane, done) in lanes.iter().zip(&done) {
            for &i in &lane[..*done] {
                handled[i] = true;
            }
        }
        let settled = handled.iter().take_while(|h| **h).count();
        let kept: Vec<EventRecord> =
            self.pending.drain(..window).zip(&handled).filter(|(_, h)| !**h).map(|(r, _)| r).collect();
        let failed: Vec<usize> = (0..window).filter(|&i| !handled[i]).collect();
        for record in kept.into_iter().rev() {
            self.pending.push_front(record);
        }
        if settled > 0 {
            self.checkpoint(&sequences[settled - 1]);
        }
        if failed.is_empty() {
            self.attempts = 0;
            return;
        }
        // Progress made counts as the first failure of the new head; otherwise one more.
        self.attempts = if failed.len() < window { 1 } else { self.attempts + 1 };
        let max = self.m.max_retry_attempts;
        if max >= 0 && i64::from(self.attempts) > max {
            let skipped: Vec<String> = failed.iter().map(|&i| sequences[i].clone()).collect();
            let skipped_arrivals: Vec<String> = failed.iter().map(|&i| arrivals[i].clone()).collect();
            self.pending.drain(..failed.len());
            error!(
                mapping = %self.name,
                shard = %self.shard_id,
                sequence_numbers = ?skipped,
                "MaximumRetryAttempts ({max}) exhausted: these records are skipped"
            );
            self.send_failure_record(&skipped, &skipped_arrivals).await;
            self.checkpoint(&sequences[window - 1]);
            self.attempts = 0;
            return;
        }
        stop.sleep(backoff(self.attempts)).await;
    }

    /// One invocation; how many records of the batch, from its start, were handled.
    async fn invoke_batch(&self, records: Vec<EventRecord>, sequences: Vec<String>) -> usize {
        let size = records.len();
        let mut event = DynamoDbEvent::default();
        event.records = records;
        match invoke::<DynamoDbEventResponse>(self.m.functions.as_ref(), &self.m.source.function, &event).await {
            Err(e) => {
                warn!(
                    mapping = %self.name,
                    shard = %self.shard_id,
                    records = size,
                    error = %e,
                    "function error: the batch is retried"
                );
                0
            }
            Ok(response) if self.m.source.report_batch_item_failures => match first_failure(&response, &sequences) {
                Ok(None) => size,
                Ok(Some(index)) => {
                    debug!(
                        mapping = %self.name,
                        shard = %self.shard_id,
                        from = %sequences[index],
                        "batch item failure: redelivering from it"
                    );
                    index
                }
                Err(why) => {
                    warn!(
                        mapping = %self.name,
                        shard = %self.shard_id,
                        why,
                        "invalid batch item failures: the whole batch is retried"
                    );
                    0
                }
            },
            Ok(_) => size,
        }
    }
}

/// The lane (of `factor`) a record goes to: by its partition key's value, so that one key's
/// records always share a lane and keep their order. Without a known key, by all its keys.
fn lane(record: &EventRecord, partition_key: Option<&str>, factor: usize) -> usize {
    use std::hash::{DefaultHasher, Hash, Hasher};
    if factor <= 1 {
        return 0;
    }
    let keys = &record.change.keys;
    let text = match partition_key.and_then(|k| keys.get(k)) {
        Some(value) => format!("{value:?}"),
        None => {
            let sorted: std::collections::BTreeMap<_, _> = keys.iter().map(|(k, v)| (k, format!("{v:?}"))).collect();
            format!("{sorted:?}")
        }
    };
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    (hasher.finish() % factor as u64) as usize
}

/// The next delivery: the longest head of the pending records (their lanes in `lanes_of`) that
/// fits `factor` lanes of at most `batch_size` records each. Returns its length and, per
/// non-empty lane, the indices of its records in order. The head stops at the first record whose
/// lane is full, so that what is delivered is always a prefix of the stream.
fn plan(lanes_of: &[usize], factor: usize, batch_size: usize) -> (usize, Vec<Vec<usize>>) {
    let mut lanes: Vec<Vec<usize>> = vec![Vec::new(); factor.max(1)];
    let mut window = 0;
    for (i, &lane) in lanes_of.iter().enumerate() {
        if lanes[lane].len() == batch_size {
            break;
        }
        lanes[lane].push(i);
        window = i + 1;
    }
    lanes.retain(|l| !l.is_empty());
    (window, lanes)
}

impl ShardReader {
    /// Records a skipped batch at `DestinationConfig.OnFailure`, in Lambda's format (the
    /// batch's position, not its records).
    async fn send_failure_record(&self, skipped: &[String], arrivals: &[String]) {
        let Some(destination) = &self.m.on_failure else { return };
        let now = aws_sdk_sqs::primitives::DateTime::from(std::time::SystemTime::now());
        let record = json!({
            "requestContext": {
                "requestId": format!("local-{:016x}", fastrand::u64(..)),
                "functionArn": self.m.function_arn,
                "condition": "RetryAttemptsExhausted",
                "approximateInvokeCount": self.attempts,
            },
            "responseContext": { "statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled" },
            "version": "1.0",
            "timestamp": now.fmt(aws_sdk_sqs::primitives::DateTimeFormat::DateTime).unwrap_or_default(),
            "DDBStreamBatchInfo": {
                "shardId": self.shard_id,
                "startSequenceNumber": skipped.first(),
                "endSequenceNumber": skipped.last(),
                "approximateArrivalOfFirstRecord": arrivals.first(),
                "approximateArrivalOfLastRecord": arrivals.last(),
                "batchSize": skipped.len(),
                "streamArn": self.m.stream_arn,
            },
        });
        let url = self
            .sqs
            .get_queue_url()
            .queue_name(&destination.queue_name)
            .queue_owner_aws_account_id(&destination.account)
            .send()
            .await
            .map(|found| found.queue_url.unwrap_or_default());
        let sent = match url {
            Ok(url) => self.sqs.send_message().queue_url(url).message_body(record.to_string()).send().await.map(|_| ()),
            Err(e) => {
                let error = aws_sdk_sqs::error::DisplayErrorContext(&e).to_string();
                error!(mapping = %self.name, destination = %destination.arn, error, "OnFailure queue not found");
                return;
            }
        };
        if let Err(e) = sent {
            let error = aws_sdk_sqs::error::DisplayErrorContext(&e).to_string();
            error!(mapping = %self.name, destination = %destination.arn, error, "sending to OnFailure failed");
        }
    }
}

/// The index of the first failed record, as Lambda reads a stream response: the lowest
/// sequence number listed. An empty, missing or foreign item identifier fails the whole batch.
fn first_failure(response: &DynamoDbEventResponse, sequences: &[String]) -> Result<Option<usize>, String> {
    let mut first: Option<usize> = None;
    for failure in &response.batch_item_failures {
        let id = failure.item_identifier.as_deref().unwrap_or_default();
        if id.is_empty() {
            return Err("an item identifier is empty".into());
        }
        let index = sequences.iter().position(|s| s == id).ok_or_else(|| format!("{id} is not in the batch"))?;
        first = Some(first.map_or(index, |f| f.min(index)));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::event::streams::DynamoDbBatchItemFailure;

    fn response(ids: &[Option<&str>]) -> DynamoDbEventResponse {
        let mut r = DynamoDbEventResponse::default();
        r.batch_item_failures = ids
            .iter()
            .map(|id| {
                let mut f = DynamoDbBatchItemFailure::default();
                f.item_identifier = id.map(str::to_owned);
                f
            })
            .collect();
        r
    }

    #[test]
    fn the_first_failed_sequence_number_is_where_redelivery_starts() {
        let seqs: Vec<String> = ["100", "200", "300"].map(String::from).to_vec();
        assert_eq!(first_failure(&response(&[]), &seqs), Ok(None));
        assert_eq!(first_failure(&response(&[Some("200")]), &seqs), Ok(Some(1)));
        assert_eq!(first_failure(&response(&[Some("300"), Some("200")]), &seqs), Ok(Some(1)));
        assert!(first_failure(&response(&[Some("999")]), &seqs).is_err());
        assert!(first_failure(&response(&[Some("")]), &seqs).is_err());
        assert!(first_failure(&response(&[None]), &seqs).is_err());
    }

    #[test]
    fn a_delivery_is_a_stream_prefix_split_into_lanes_of_at_most_batch_size() {
        // One lane: a plain batch.
        assert_eq!(plan(&[0, 0, 0], 1, 2), (2, vec![vec![0, 1]]));
        // Two lanes of two: records 0..4 fit; record 4 (lane 0, full) ends the delivery even
        // though lane 1 has room, so that nothing after an undelivered record goes ahead of it.
        assert_eq!(plan(&[0, 1, 0, 1, 0, 1], 2, 2), (4, vec![vec![0, 2], vec![1, 3]]));
        assert_eq!(plan(&[1, 1, 1], 4, 2), (2, vec![vec![0, 1]]));
        assert_eq!(plan(&[], 4, 2), (0, vec![]));
    }

    #[test]
    fn one_partition_keys_records_always_share_a_lane() {
        use aws_lambda_events::event::dynamodb::EventRecord;
        let record = |stream: &str, version: &str| {
            let mut r = EventRecord::default();
            r.change.keys = serde_dynamo::Item::from(HashMap::from([
                ("streamId".to_owned(), serde_dynamo::AttributeValue::S(stream.to_owned())),
                ("version".to_owned(), serde_dynamo::AttributeValue::N(version.to_owned())),
            ]));
            r
        };
        let key = Some("streamId");
        for stream in ["Order-a", "Order-b", "Order-c", "Inventory-x"] {
            let first = lane(&record(stream, "1"), key, 8);
            assert!(first < 8);
            for version in 2..20 {
                assert_eq!(lane(&record(stream, &version.to_string()), key, 8), first, "{stream}");
            }
        }
        let lanes: HashSet<usize> = (0..64).map(|i| lane(&record(&format!("Order-{i}"), "1"), key, 8)).collect();
        assert!(lanes.len() > 4, "keys spread over the lanes: {lanes:?}");
        assert_eq!(lane(&record("Order-a", "1"), key, 1), 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            assert!(d <= Duration::from_secs(2), "{attempt}: {d:?}");
        }
        assert!(backoff(1) <= Duration::from_millis(100));
        assert!(backoff(10) >= Duration::from_secs(1));
    }

    #[test]
    fn arns_and_properties_parse() {
        let arn = Arn::parse("arn:aws:sqs:us-east-1:000000000000:work", "sqs").expect("arn");
        assert_eq!(
            (arn.region.as_str(), arn.account.as_str(), arn.resource.as_str()),
            ("us-east-1", "000000000000", "work")
        );
        let stream = "arn:aws:dynamodb:ddblocal:000000000000:table/t/stream/2024-01-01T00:00:00.000";
        assert_eq!(
            Arn::parse(stream, "dynamodb").expect("stream arn").resource,
            "table/t/stream/2024-01-01T00:00:00.000"
        );
        assert!(Arn::parse("https://sqs/work", "sqs").is_err());
        assert!(Arn::parse(stream, "sqs").is_err());
        assert_eq!(integer(Some(&json!("5"))).expect("int"), Some(5));
        assert_eq!(integer(Some(&json!(7))).expect("int"), Some(7));
        assert!(integer(Some(&json!("x"))).is_err());
        assert_eq!(boolean(Some(&json!("false"))).expect("bool"), Some(false));
        assert!(reports_batch_item_failures(Some(&json!(["ReportBatchItemFailures"]))));
        assert!(!reports_batch_item_failures(None));
    }

    #[test]
    fn a_stream_record_converts_to_lambdas_shape() {
        use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record, StreamRecord, StreamViewType};
        let change = StreamRecord::builder()
            .approximate_creation_date_time(aws_smithy_types_datetime(1_700_000_000))
            .keys("pk", AttributeValue::S("a".into()))
            .new_image("pk", AttributeValue::S("a".into()))
            .new_image("n", AttributeValue::N("5".into()))
            .new_image("m", AttributeValue::M(HashMap::from([("x".into(), AttributeValue::Bool(true))])))
            .sequence_number("100")
            .size_bytes(42)
            .stream_view_type(StreamViewType::NewImage)
            .build();
        let record = Record::builder().event_id("e1").event_name(OperationType::Insert).dynamodb(change).build();
        let converted = shared::streams::lambda_record(record, "arn:aws:dynamodb:r:1:table/t/stream/s", "us-east-1");
        let json = serde_json::to_value(&converted).expect("serializes");
        assert_eq!(json["eventName"], "INSERT");
        assert_eq!(json["eventSource"], "aws:dynamodb");
        assert_eq!(json["eventSourceARN"], "arn:aws:dynamodb:r:1:table/t/stream/s");
        assert_eq!(json["awsRegion"], "us-east-1");
        assert_eq!(json["dynamodb"]["NewImage"]["n"], json!({ "N": "5" }));
        assert_eq!(json["dynamodb"]["NewImage"]["m"], json!({ "M": { "x": { "BOOL": true } } }));
        assert_eq!(json["dynamodb"]["SequenceNumber"], "100");
        assert_eq!(json["dynamodb"]["SizeBytes"], 42);
        assert_eq!(json["dynamodb"]["StreamViewType"], "NEW_IMAGE");
        assert_eq!(json["dynamodb"]["ApproximateCreationDateTime"].as_f64(), Some(1_700_000_000.0));
        #[derive(serde::Deserialize)]
        struct Image {
            pk: String,
            n: i64,
        }
        let image: Image = serde_dynamo::from_item(converted.change.new_image).expect("decodes");
        assert_eq!((image.pk.as_str(), image.n), ("a", 5));
    }

    fn aws_smithy_types_datetime(secs: i64) -> aws_sdk_dynamodbstreams::primitives::DateTime {
        aws_sdk_dynamodbstreams::primitives::DateTime::from_secs(secs)
    }

    #[test]
    fn an_sqs_message_converts_and_a_json_body_is_filtered_on() {
        use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
        let msg = Message::builder()
            .message_id("m1")
            .receipt_handle("r1")
            .body(r#"{"kind":"order"}"#)
            .attributes(MessageSystemAttributeName::ApproximateReceiveCount, "1")
            .message_attributes(
                "trace",
                MessageAttributeValue::builder().data_type("String").string_value("t-1").build().expect("attribute"),
            )
            .build();
        let record = sqs_record(msg, "arn:aws:sqs:us-east-1:000000000000:q", "us-east-1");
        let json = serde_json::to_value(&record).expect("serializes");
        assert_eq!(json["messageId"], "m1");
        assert_eq!(json["eventSource"], "aws:sqs");
        assert_eq!(json["attributes"]["ApproximateReceiveCount"], "1");
        assert_eq!(json["messageAttributes"]["trace"]["stringValue"], "t-1");
        assert_eq!(json["messageAttributes"]["trace"]["dataType"], "String");
        let filters =
            Filters::from_criteria(Some(&json!({ "Filters": [{ "Pattern": r#"{"body":{"kind":["order"]}}"# }] })))
                .expect("filters");
        assert!(filters.matches(&sqs_filter_view(&record)));
    }
}
