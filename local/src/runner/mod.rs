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
//!
//! The parts: [`properties`] (an event's SAM properties, read through serde), `sqs` (the queue
//! pollers), `stream` (shard discovery) and `shard` (reading and delivering one shard),
//! `events` (records and events in Lambda's shapes), `checkpoints` (stream positions) and
//! `plumbing` (the stop signal, backoff, invoking a function).

mod checkpoints;
mod events;
mod plumbing;
pub mod properties;
mod shard;
mod sqs;
mod stream;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::info;

use crate::Stack;
use crate::filter::Filters;
use checkpoints::Checkpoints;
use plumbing::{Stop, ended};
use properties::{CommonProperties, FunctionEvents};
use sqs::SqsMapping;
use stream::StreamMapping;

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
#[derive(Clone)]
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

/// What SQS and stream mappings have in common: the function, the event, and how records are
/// batched, filtered and reported on.
struct Source {
    function: String,
    event: String,
    filters: Filters,
    report_batch_item_failures: bool,
    batch_size: usize,
    /// The region the records name.
    region: String,
}

impl Source {
    fn new(
        function: &str,
        event: &str,
        p: &CommonProperties,
        default_batch_size: i64,
        region: String,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            function: function.to_owned(),
            event: event.to_owned(),
            filters: Filters::from_criteria(p.filter_criteria.as_ref())?,
            report_batch_item_failures: p.report_batch_item_failures,
            batch_size: p.batch_size(default_batch_size)?,
            region,
        })
    }

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

enum Mapping {
    Sqs(Arc<SqsMapping>),
    Stream(Arc<StreamMapping>),
}

impl Mapping {
    fn describe(&self) -> String {
        match self {
            Self::Sqs(m) => m.describe(),
            Self::Stream(m) => m.describe(),
        }
    }
}

/// The event source mappings of a stack, ready to [`start`](Runner::start).
pub struct Runner {
    mappings: Vec<Mapping>,
    skipped: Vec<String>,
    checkpoints: Arc<Checkpoints>,
}

impl Runner {
    /// One mapping per (function, event) whose function `functions` serves; events of other
    /// types (Api, HttpApi, Schedule…), disabled events and functions not served are listed in
    /// [`skipped`](Runner::skipped). An invalid event (bad ARN, bad filter pattern) is an error.
    pub fn new(stack: &Stack, clients: RunnerClients, functions: Arc<dyn Invoke>) -> anyhow::Result<Self> {
        let mut mappings = Vec::new();
        let mut skipped = Vec::new();
        for (function, props) in &stack.function_properties {
            let events = FunctionEvents::deserialize(props).with_context(|| format!("{function}: Events"))?;
            for (event, spec) in &events.events {
                let kind = spec.kind();
                let context = || format!("{function}.{event} ({kind})");
                let skip = |why: &str| format!("{function}.{event} ({kind}): {why}");
                if kind != "SQS" && kind != "DynamoDB" {
                    skipped.push(skip("event type not run by the local runner"));
                } else if !functions.serves(function) {
                    skipped.push(skip(&format!("{function} is not served")));
                } else if !spec.enabled().with_context(context)? {
                    skipped.push(skip("Enabled is false"));
                } else if kind == "SQS" {
                    let p = spec.read().with_context(context)?;
                    let mapping = SqsMapping::new((function, event), p, clients.sqs.clone(), functions.clone());
                    mappings.push(Mapping::Sqs(Arc::new(mapping.with_context(context)?)));
                } else {
                    let p = spec.read().with_context(context)?;
                    let (id, clients, functions) =
                        ((function.as_str(), event.as_str()), clients.clone(), functions.clone());
                    let mapping = StreamMapping::new(stack, id, p, clients, functions, &mut skipped);
                    mappings.push(Mapping::Stream(Arc::new(mapping.with_context(context)?)));
                }
            }
        }
        Ok(Self { mappings, skipped, checkpoints: Arc::new(Checkpoints::default()) })
    }

    /// Keeps stream positions in `file` across runs (read now, written when stopped).
    pub fn with_checkpoints(mut self, file: impl Into<PathBuf>) -> Self {
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
                Mapping::Sqs(m) => tasks.spawn(sqs::run(m, stop)),
                Mapping::Stream(m) => tasks.spawn(stream::run(m, self.checkpoints.clone(), stop)),
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
        while let Some(result) = self.tasks.join_next().await {
            ended("runner", "a runner task", result);
        }
        self.checkpoints.save();
    }
}
