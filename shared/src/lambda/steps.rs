//! The AWS edge of a step Lambda: an SQS batch in, a `SendTaskSuccess`/`SendTaskFailure` per
//! command, per-message failures out (`ReportBatchItemFailures`). A command that cannot be read
//! goes to the step's DLQ at once with the reason: no poison-message loop, nothing dropped.

use std::future::Future;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use serde_json::Value;
use tracing::Instrument;

use crate::adapters::sqs::SqsDeadLetters;
use crate::deadline::Deadline;
use crate::lambda::batch::{Batch, DeadLetters, Unhandled};
use crate::saga::errors::{MALFORMED_COMMAND, STEP_FAILED};
use crate::saga::{Step, StepError, StepMessage, StepOutcome};

/// How a callback to the state machine went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    /// The task already ended (answered before, timed out, execution over): nothing to do.
    AlreadyClosed,
}

#[derive(Debug, thiserror::Error)]
#[error("callback to Step Functions failed: {0}")]
pub struct CallbackError(pub String);

/// Answers a task token: the port; the Step Functions client implements it
/// (`adapters::stepfunctions`), tests record what it is told.
pub trait TaskCallback: Send + Sync {
    fn succeed(&self, token: &str, output: &Value) -> impl Future<Output = Result<Delivery, CallbackError>> + Send;
    fn fail(
        &self,
        token: &str,
        error: &str,
        cause: &str,
    ) -> impl Future<Output = Result<Delivery, CallbackError>> + Send;
}

/// Commands of one batch worked on at once.
pub const STEP_CONCURRENCY: usize = 4;

/// Processes one SQS batch of step commands, up to [`STEP_CONCURRENCY`] at a time (see
/// [`Batch::sqs`]): each message is answered to the state machine and deleted, or reported as a
/// batch item failure to be redelivered (and, after `maxReceiveCount`, moved to the DLQ by the
/// redrive policy). At `deadline` the rest is left for redelivery: a redelivered command finds
/// its effects recorded (every step is idempotent).
pub async fn process_batch<C, D, F, Fut>(
    event: SqsEvent,
    deadline: &Deadline,
    accepts: &[Step],
    callback: &C,
    dead_letters: &D,
    step: F,
) -> SqsBatchResponse
where
    C: TaskCallback,
    D: DeadLetters,
    F: Fn(StepMessage) -> Fut,
    Fut: Future<Output = Result<StepOutcome, StepError>>,
{
    // A few at a time: commands of one batch are for different orders, so they overlap well;
    // a hot SKU they share is settled by the store's expected-version retries.
    let batch = Batch::new(dead_letters, *deadline).concurrently(STEP_CONCURRENCY);
    batch.sqs(&event, |message| process_one(message, accepts, callback, &step)).await
}

async fn process_one<C, F, Fut>(message: &SqsMessage, accepts: &[Step], callback: &C, step: &F) -> Result<(), Unhandled>
where
    C: TaskCallback,
    F: Fn(StepMessage) -> Fut,
    Fut: Future<Output = Result<StepOutcome, StepError>>,
{
    let body = message.body.as_deref().unwrap_or_default();
    let command =
        serde_json::from_str::<StepMessage>(body).map_err(|e| format!("malformed step command: {e}")).and_then(|c| {
            if accepts.contains(&c.step) {
                Ok(c)
            } else {
                Err(format!("step {:?} does not belong on this queue", c.step))
            }
        });
    let command = match command {
        Ok(command) => command,
        Err(reason) => {
            let reason = crate::text::bounded(&reason, crate::text::MAX_REASON);
            // If the token can be read, the saga learns at once instead of waiting for a timeout.
            if let Some(token) =
                serde_json::from_str::<Value>(body).ok().and_then(|v| v["taskToken"].as_str().map(str::to_owned))
            {
                callback.fail(&token, MALFORMED_COMMAND, &reason).await.map_err(|e| Unhandled::retry(e.to_string()))?;
            }
            return Err(Unhandled::dead_letter(reason));
        }
    };
    // Every line about this command carries its order, correlation and trace.
    let span = crate::telemetry::record_span(command.about());
    span.in_scope(|| tracing::debug!(step = ?command.step, "step command received"));
    let token = command.task_token.clone();
    let step_name = format!("{:?}", command.step);
    let answered = async {
        let started = std::time::Instant::now();
        let result = step(command).await;
        let took = started.elapsed();
        crate::metrics::step_latency(&step_name, took);
        let delivery = match result {
            // (A compensation is counted by its step, when it had its effect: not on a replay.)
            Ok(Ok(output)) => {
                tracing::info!(step = %step_name, took_ms = took.as_millis() as u64, "step succeeded");
                callback.succeed(&token, &output).await
            }
            Ok(Err(failure)) => {
                tracing::info!(step = %step_name, error = failure.error, cause = %failure.cause, "step failed with a business error");
                callback.fail(&token, failure.error, &failure.cause).await
            }
            Err(StepError::Permanent(reason)) => {
                tracing::error!(step = %step_name, %reason, "step failed permanently");
                callback.fail(&token, STEP_FAILED, &reason).await
            }
            Err(StepError::Retryable(reason)) => return Err(format!("step {step_name}: {reason}")),
        };
        match delivery {
            Ok(Delivery::Delivered) => Ok(()),
            Ok(Delivery::AlreadyClosed) => {
                tracing::info!(step = %step_name, "task already closed: a redelivered command, answered again");
                Ok(())
            }
            Err(e) => Err(format!("step {step_name}: the answer to the state machine failed: {e}")),
        }
    }
    .instrument(span.clone())
    .await;
    answered.map_err(|reason| Unhandled::retry(reason).in_span(span))
}

/// What a step Lambda builds once and keeps between invocations.
pub struct StepLambda<X> {
    pub repo: crate::aggregate::Repository<crate::adapters::dynamodb::DynamoEventStore>,
    pub callback: aws_sdk_sfn::Client,
    pub dead_letters: SqsDeadLetters,
    /// The external services the step calls (gateway, carrier, notifier) or `()`.
    pub services: X,
}

/// Steps often contend on one aggregate (a popular SKU): more, shorter retries than the default.
pub const STEP_RETRY: crate::retry::RetryPolicy = crate::retry::RetryPolicy {
    max_attempts: 30,
    base_delay: std::time::Duration::from_millis(5),
    max_delay: std::time::Duration::from_millis(500),
};

/// Snapshotted streams (SKUs' inventories: every order reserves, commits or releases its lines
/// on them) whose state a warm step Lambda keeps: a load then reads only the newer events.
pub const STEP_STATE_CACHE: usize = 256;

impl<X> StepLambda<X> {
    /// From clients and environment variables: `EVENTS_TABLE`, `COMMANDS_TABLE`,
    /// `SNAPSHOTS_TABLE`, `DEAD_LETTER_QUEUE_URL`.
    pub fn new(
        dynamodb: aws_sdk_dynamodb::Client,
        sfn: aws_sdk_sfn::Client,
        sqs: impl Into<crate::adapters::aws::LazyClient<aws_sdk_sqs::Client>>,
        vars: crate::config::Vars<'_>,
        services: X,
    ) -> Result<Self, crate::config::ConfigError> {
        let store = crate::adapters::dynamodb::DynamoEventStore::new(
            dynamodb,
            crate::adapters::dynamodb::EventStoreConfig::from_vars(vars)?,
        );
        let repo = crate::aggregate::Repository::new(store)
            .with_retry(STEP_RETRY)
            .with_snapshots_every(100)
            .with_state_cache(STEP_STATE_CACHE);
        let dead_letters =
            SqsDeadLetters { client: sqs.into(), queue_url: crate::config::required(vars, "DEAD_LETTER_QUEUE_URL")? };
        Ok(Self { repo, callback: sfn, dead_letters, services })
    }

    /// In Lambda: clients from the default AWS configuration, variables from the process.
    pub async fn from_env(services: X) -> Result<Self, crate::config::ConfigError> {
        Self::from_sdk(&crate::adapters::aws::sdk_config().await, services)
    }

    /// [`Self::from_env`] with an AWS configuration already loaded (the providers' too).
    pub fn from_sdk(sdk: &aws_config::SdkConfig, services: X) -> Result<Self, crate::config::ConfigError> {
        let sdk = sdk.clone();
        Self::new(
            aws_sdk_dynamodb::Client::new(&sdk),
            aws_sdk_sfn::Client::new(&sdk),
            crate::adapters::aws::LazyClient::new(&sdk, aws_sdk_sqs::Client::new),
            &crate::config::process_env,
            services,
        )
    }

    /// Runs `step` for every command of the batch this function `accepts`, until `deadline`.
    pub async fn handle<F, Fut>(
        &self,
        event: SqsEvent,
        deadline: Deadline,
        accepts: &[Step],
        step: F,
    ) -> SqsBatchResponse
    where
        F: Fn(StepMessage) -> Fut,
        Fut: Future<Output = Result<StepOutcome, StepError>>,
    {
        process_batch(event, &deadline, accepts, &self.callback, &self.dead_letters, step).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::lambda::batch::KeptDeadLetters;

    /// Records each answer to the state machine, by task token.
    #[derive(Default)]
    struct Answers(Mutex<Vec<(String, Result<Value, String>)>>);

    impl TaskCallback for Answers {
        async fn succeed(&self, token: &str, output: &Value) -> Result<Delivery, CallbackError> {
            self.0.lock().expect("lock").push((token.to_owned(), Ok(output.clone())));
            Ok(Delivery::Delivered)
        }

        async fn fail(&self, token: &str, error: &str, _cause: &str) -> Result<Delivery, CallbackError> {
            self.0.lock().expect("lock").push((token.to_owned(), Err(error.to_owned())));
            Ok(Delivery::Delivered)
        }
    }

    /// The reserve-inventory sample's message, `n` times with task tokens `t1..=tn`, plus one
    /// unreadable message `bad`.
    fn batch(n: usize) -> SqsEvent {
        let sample: Value = serde_json::from_str(include_str!("../../../events/reserve-inventory/command.json"))
            .expect("the sample event");
        let record = &sample["Records"][0];
        let mut body: Value = serde_json::from_str(record["body"].as_str().expect("body")).expect("a command");
        let mut records: Vec<Value> = (1..=n)
            .map(|i| {
                body["taskToken"] = json!(format!("t{i}"));
                let mut r = record.clone();
                r["messageId"] = json!(format!("m{i}"));
                r["body"] = json!(body.to_string());
                r
            })
            .collect();
        let mut bad = record.clone();
        bad["messageId"] = json!("bad");
        bad["body"] = json!("{ not json");
        records.push(bad);
        serde_json::from_value(json!({ "Records": records })).expect("an SQS event")
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_worked_concurrently_with_a_result_per_message() {
        // Given a step that takes 1 s, and fails retryably for the command of token t3
        let (answers, parked) = (Answers::default(), KeptDeadLetters::default());
        let (in_flight, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let step = |command: StepMessage| {
            let (in_flight, most) = (&in_flight, &most);
            async move {
                most.fetch_max(in_flight.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                match command.task_token.as_str() {
                    "t3" => Err(StepError::Retryable("store busy".into())),
                    token => Ok(Ok(json!({ "done": token }))),
                }
            }
        };

        // When a batch of 9 commands and one unreadable message is processed
        let began = tokio::time::Instant::now();
        let response =
            process_batch(batch(9), &Deadline::never(), &[Step::ReserveInventory], &answers, &parked, step).await;

        // Then the commands ran STEP_CONCURRENCY at a time (3 rounds, not 9)
        assert_eq!(most.load(Ordering::SeqCst), STEP_CONCURRENCY);
        assert_eq!(began.elapsed(), Duration::from_secs(3));
        // and only t3's message is left for redelivery
        let failed: Vec<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
        assert_eq!(failed, ["m3"]);
        // and the other 8 were answered, each once
        let mut answered: Vec<String> = answers.0.lock().expect("lock").iter().map(|(t, _)| t.clone()).collect();
        answered.sort();
        assert_eq!(answered, ["t1", "t2", "t4", "t5", "t6", "t7", "t8", "t9"]);
        // and the unreadable message was parked with its reason
        let parked = parked.reasons();
        assert!(parked.len() == 1 && parked[0].starts_with("malformed step command"), "{parked:?}");
    }

    /// Arbitrary message bodies on a step's queue: each is either worked and answered, or parked
    /// with its reason; none panics, none is left for redelivery (no poison loop).
    mod properties {
        use proptest::prelude::*;
        use serde_json::json;

        use super::*;

        /// The sample command with one field replaced by anything, or any text at all.
        fn body() -> impl Strategy<Value = String> {
            let sample: Value = serde_json::from_str(include_str!("../../../events/reserve-inventory/command.json"))
                .expect("the sample event");
            let command: Value =
                serde_json::from_str(sample["Records"][0]["body"].as_str().expect("body")).expect("a command");
            let field = prop::sample::select(vec!["taskToken", "step", "order", "correlationId", "traceHeader"]);
            let value = prop_oneof![
                Just(Value::Null),
                any::<i64>().prop_map(|n| json!(n)),
                ".{0,30}".prop_map(Value::String),
                Just(json!({})),
                Just(json!(["ReserveInventory"])),
                Just(json!("ChargePayment")),
            ];
            prop_oneof![
                ".{0,200}",
                (field, value).prop_map(move |(field, value)| {
                    let mut command = command.clone();
                    command[field] = value;
                    command.to_string()
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn a_long_field_is_not_echoed_whole_in_the_reason(
                field in prop::sample::select(vec!["step", "order", "taskToken", "correlationId"]),
                text in (".{1,4}", 1_000usize..8_000).prop_map(|(s, n)| s.repeat(n)),
            ) {
                let sample: Value = serde_json::from_str(include_str!("../../../events/reserve-inventory/command.json"))
                    .expect("sample");
                let mut command: Value =
                    serde_json::from_str(sample["Records"][0]["body"].as_str().expect("body")).expect("a command");
                // A long text where the command has something else (or, for the token, a number).
                let text = if field == "taskToken" || field == "correlationId" { json!([text]) } else { json!(text) };
                command[field] = text;
                let mut record = sample["Records"][0].clone();
                record["body"] = json!(command.to_string());
                let event: SqsEvent = serde_json::from_value(json!({ "Records": [record] })).expect("an SQS event");
                let (answers, parked) = (Answers::default(), KeptDeadLetters::default());
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let step = |_command: StepMessage| async { Ok(Ok(json!({}))) };
                let accepts = [Step::ReserveInventory];
                runtime.block_on(process_batch(event, &Deadline::never(), &accepts, &answers, &parked, step));
                let reasons = parked.reasons();
                prop_assert_eq!(reasons.len(), 1);
                prop_assert!(reasons[0].starts_with("malformed step command"), "{}", reasons[0]);
                prop_assert!(reasons[0].len() <= crate::text::MAX_REASON, "{} bytes", reasons[0].len());
            }

            #[test]
            fn every_message_is_answered_or_parked_with_a_reason(bodies in prop::collection::vec(body(), 1..5)) {
                let sample: Value =
                    serde_json::from_str(include_str!("../../../events/reserve-inventory/command.json")).expect("sample");
                let records: Vec<Value> = bodies
                    .iter()
                    .enumerate()
                    .map(|(i, body)| {
                        let mut record = sample["Records"][0].clone();
                        record["messageId"] = json!(format!("m{i}"));
                        record["body"] = json!(body);
                        record
                    })
                    .collect();
                let event: SqsEvent = serde_json::from_value(json!({ "Records": records })).expect("an SQS event");
                let (answers, parked) = (Answers::default(), KeptDeadLetters::default());
                let worked = AtomicUsize::new(0);
                let step = |_command: StepMessage| {
                    let worked = &worked;
                    async move {
                        worked.fetch_add(1, Ordering::SeqCst);
                        Ok(Ok(json!({})))
                    }
                };
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                let response = runtime.block_on(process_batch(
                    event,
                    &Deadline::never(),
                    &[Step::ReserveInventory],
                    &answers,
                    &parked,
                    step,
                ));
                prop_assert!(response.batch_item_failures.is_empty(), "{:?}", response.batch_item_failures);
                let reasons = parked.reasons();
                prop_assert_eq!(worked.load(Ordering::SeqCst) + reasons.len(), bodies.len());
                for reason in reasons {
                    prop_assert!(
                        reason.starts_with("malformed step command") || reason.contains("does not belong on this queue"),
                        "{}", reason
                    );
                }
            }
        }
    }
}
