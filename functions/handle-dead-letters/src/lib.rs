//! The dead-letter handler: every DLQ of the system is an event source of this one function.
//! Each message is recorded as a dead letter (its own stream in the event store, so every later
//! action on it is audited), classified, and then acted on:
//!
//! - a transient failure (a consumer ran out of receives, EventBridge could not deliver) is
//!   redriven to its source queue with exponential backoff and full jitter (SQS `DelaySeconds`),
//!   a bounded number of times; the redriven copy carries the dead letter's id, so when it fails
//!   again it returns to the same dead letter and the bound holds;
//! - a saga command whose task has closed (the state machine timed it out and moved on) is
//!   resolved, not redriven: the saga no longer waits for it;
//! - a poison message (a consumer parked it with a `reason`: unreadable or invalid), a transient
//!   one past its bound, and a stream consumer's skipped batch (a pointer to stream positions)
//!   are parked for a person, and the alarm topic is told.
//!
//! A failure here (the store or SQS unavailable) leaves the message on its DLQ for another try:
//! nothing is dropped. A redrive is sent before it is recorded, so a crash in between sends it
//! twice at worst; every consumer is idempotent.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use aws_lambda_events::event::dynamodb::{Event as DynamoDbEvent, EventRecord};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use serde_json::Value;
use shared::aggregate::{Aggregate, CommandContext, ExecuteError, Repository};
use shared::deadline::Deadline;
use shared::domain::dead_letter::{
    Actor, Arrival, DeadLetter, DeadLetterCommand, DeadLetterError, Failure, NextAction,
};
use shared::domain::order::{Order, OrderCommand, OrderEvent, OrderStatus};
use shared::eventstore::{EventStore, StreamId};
use shared::lambda::batch::{Batch, NoDeadLetters, Unhandled};
use shared::retry::RetryPolicy;
use tracing::Instrument;

/// The message attribute a redrive tags its copy with: the dead letter it belongs to.
pub const DEAD_LETTER_ID: &str = "deadLetterId";

/// Attributes that describe a failure rather than the message: not passed on by a redrive.
const BOOKKEEPING: &[&str] =
    &[DEAD_LETTER_ID, "reason", "sourceArn", "sourceId", "ERROR_CODE", "ERROR_MESSAGE", "RULE_ARN", "TARGET_ARN"];

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("event store: {0}")]
    Store(String),
    #[error("{0}")]
    Aws(String),
    #[error("the replay did not go through: {0}")]
    ReplayFailed(String),
    /// A queue named by a message (its source, its DLQ) does not exist.
    #[error("no such queue: {0}")]
    NoSuchQueue(String),
}

/// What an operator is told when an action is not taken.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("no such dead letter")]
    Unknown,
    #[error("cannot redrive it: {0}")]
    NotRedrivable(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Failed(#[from] HandlerError),
}

/// SQS as the handler needs it.
pub trait Queues: Send + Sync {
    /// The queue whose redrive policy names `dead_letter_queue` (both ARNs), if exactly one does.
    fn source_of(&self, dead_letter_queue: &str) -> impl Future<Output = Result<Option<String>, HandlerError>> + Send;
    /// Makes a received message of `queue_arn` visible again after `seconds` (a backoff before
    /// its next try, instead of the queue's visibility timeout).
    fn retry_after(
        &self,
        queue_arn: &str,
        receipt_handle: &str,
        seconds: u32,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
    /// Sends `body` with `attributes` to the queue `queue_arn`, visible after `delay_seconds`.
    fn send(
        &self,
        queue_arn: &str,
        body: &str,
        attributes: &BTreeMap<String, String>,
        delay_seconds: u32,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Where people are told about a parked dead letter (the alarm topic).
pub trait Notifier: Send + Sync {
    fn notify(&self, subject: &str, message: &str) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Hands a skipped stream batch to its consumer again: reads the records between the pointer's
/// positions back from the stream and invokes the consumer with them, as its event source
/// mapping would have. `Ok`: how many records it took; `Err`: why not (another try may follow).
pub trait Replayer: Send + Sync {
    fn replay(&self, batch: &StreamBatch) -> impl Future<Output = Result<u32, ReplayError>> + Send;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The records cannot be read back any more (the stream, or its records past the 24 h
    /// retention, are gone): no retry helps; a person rebuilds the read models.
    #[error("{0}")]
    Gone(String),
    /// It may go through on another try.
    #[error("{0}")]
    Failed(String),
}

/// Where a stream consumer's skipped batch lies (its `DDBStreamBatchInfo`) and who skipped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamBatch {
    pub function_arn: String,
    pub stream_arn: String,
    pub shard_id: String,
    pub start: String,
    pub end: String,
}

impl StreamBatch {
    /// From an OnFailure record's body.
    pub fn from_body(body: &str) -> Option<Self> {
        let v: Value = serde_json::from_str(body).ok()?;
        let info = v.get("DDBStreamBatchInfo")?;
        let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(Self {
            function_arn: text(v.get("requestContext")?, "functionArn")?,
            stream_arn: text(info, "streamArn")?,
            shard_id: text(info, "shardId")?,
            start: text(info, "startSequenceNumber")?,
            end: text(info, "endSequenceNumber")?,
        })
    }
}

/// Sequence numbers are decimal strings of growing length: compared as numbers.
fn sequence_after(a: &str, b: &str) -> bool {
    (a.len(), a) > (b.len(), b)
}

/// Whether a saga task still waits for its answer.
pub trait Tasks: Send + Sync {
    fn is_open(&self, token: &str) -> impl Future<Output = Result<bool, HandlerError>> + Send;
}

pub struct DeadLetterHandler<S, Q, N, T, R> {
    pub repo: Repository<S>,
    pub queues: Q,
    pub notifier: N,
    pub tasks: T,
    pub replayer: R,
    /// `max_attempts` is the number of automatic redrives; the delays are the backoff's.
    pub policy: RetryPolicy,
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Redriven {
        dead_letter_id: String,
        attempt: u32,
        delay_seconds: u32,
    },
    Parked {
        dead_letter_id: String,
        reason: String,
    },
    Resolved {
        dead_letter_id: String,
        note: String,
    },
    Replayed {
        dead_letter_id: String,
        attempt: u32,
        records: u32,
    },
    /// Already acted on (the DLQ delivered this message twice).
    AlreadyHandled {
        dead_letter_id: String,
    },
}

impl Outcome {
    /// The `Action` of the `DeadLetters` metric (`shared::metrics`); none for a repeat.
    pub fn metric_action(&self) -> Option<&'static str> {
        match self {
            Self::Redriven { .. } => Some("Redriven"),
            Self::Parked { .. } => Some("Parked"),
            Self::Resolved { .. } => Some("Resolved"),
            Self::Replayed { .. } => Some("Replayed"),
            Self::AlreadyHandled { .. } => None,
        }
    }
}

/// The flow a dead message belonged to, as far as its body says (a step command, a bus event,
/// a manual-action case) or its `AWSTraceHeader`: so the handler's lines about it are found
/// with the order's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    pub order_id: Option<String>,
    pub correlation_id: Option<String>,
    pub trace_header: Option<String>,
}

impl Flow {
    pub fn of(message: &SqsMessage) -> Self {
        let body = message.body.as_deref().and_then(|b| serde_json::from_str::<Value>(b).ok()).unwrap_or_default();
        let text = |pointers: &[&str]| {
            pointers.iter().find_map(|p| body.pointer(p).and_then(Value::as_str)).map(str::to_owned)
        };
        Self {
            order_id: text(&["/orderId", "/order/orderId", "/detail/payload/orderId"]).or_else(|| {
                let stream = text(&["/detail/streamId"])?;
                let stream = StreamId::parse(&stream).ok()?;
                (stream.category() == "Order").then(|| stream.id().to_owned())
            }),
            correlation_id: text(&["/correlationId", "/detail/correlationId"]),
            trace_header: message
                .attributes
                .get("AWSTraceHeader")
                .cloned()
                .or_else(|| text(&["/traceHeader", "/detail/traceHeader"])),
        }
    }

    pub fn about(&self) -> shared::telemetry::About<'_> {
        shared::telemetry::About {
            order_id: self.order_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            trace_header: self.trace_header.as_deref(),
        }
    }
}

impl<S: EventStore, Q: Queues, N: Notifier, T: Tasks, R: Replayer> DeadLetterHandler<S, Q, N, T, R> {
    /// Handles every message of the batch, one after the other; a message whose handling
    /// failed is left on its DLQ (there is no DLQ behind it).
    /// Handles a batch of dead letters one at a time, until `deadline` (the rest stays on its
    /// queue for the next invocation).
    pub async fn handle(&self, batch: SqsEvent, deadline: Deadline) -> SqsBatchResponse {
        Batch::new(&NoDeadLetters, deadline)
            .sqs(&batch, |message| async move {
                let span = shared::telemetry::record_span(Flow::of(message).about());
                match self.handle_one(message).instrument(span.clone()).await {
                    Ok(outcome) => {
                        if let Some(action) = outcome.metric_action() {
                            shared::metrics::dead_letter(action);
                        }
                        let id = &message.message_id;
                        span.in_scope(|| tracing::info!(message_id = ?id, ?outcome, "dead letter handled"));
                        Ok(())
                    }
                    Err(e) => Err(Unhandled::retry(format!("dead letter not handled: {e}")).in_span(span)),
                }
            })
            .await
    }

    pub async fn handle_one(&self, message: &SqsMessage) -> Result<Outcome, HandlerError> {
        let mut arrival = classify(message, shared::eventstore::now_rfc3339());
        if arrival.source.is_none() && arrival.failure == Failure::Transient {
            arrival.source = self.queues.source_of(&arrival.dead_letter_queue).await?;
        }
        // A returning redrive joins its dead letter, an order's manual action its case; anything
        // else starts one.
        let case = (arrival.failure == Failure::ManualAction)
            .then(|| serde_json::from_str::<Value>(&arrival.body).ok())
            .flatten()
            .and_then(|v| v.get("orderId").and_then(Value::as_str).map(manual_action_case));
        // A consumer's dead letter names the message it gave up on: that message delivered again
        // (at least once) and dead-lettered again is the same dead letter, seen twice.
        let from_source = match (arrival.attributes.get("sourceArn"), arrival.attributes.get("sourceId")) {
            (Some(arn), Some(source_id)) => Some(
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("{arn}#{source_id}").as_bytes()).to_string(),
            ),
            _ => None,
        };
        let id = case
            .into_iter()
            .chain(arrival.attributes.get(DEAD_LETTER_ID).cloned())
            .chain(from_source)
            .find(|id| StreamId::new("DeadLetter", id).is_ok())
            .unwrap_or_else(|| arrival.message_id.clone());
        let ctx = CommandContext { correlation_id: Some(id.clone()), ..CommandContext::default() };
        let record = DeadLetterCommand::Record { dead_letter_id: id.clone(), arrival: arrival.clone() };
        let Some(state) = self.execute(&id, &record, &ctx).await? else {
            return Ok(Outcome::AlreadyHandled { dead_letter_id: id });
        };
        shared::metrics::dead_letter("Recorded");
        match state.next_action(&self.policy) {
            NextAction::Nothing => Ok(Outcome::AlreadyHandled { dead_letter_id: id }),
            NextAction::Park { reason } => self.park(&id, &state, reason, &ctx).await,
            NextAction::Redrive { attempt } if arrival.failure == Failure::StreamBatch => {
                let Some(batch) = StreamBatch::from_body(&arrival.body) else {
                    let reason = format!("a skipped stream batch whose pointer does not read: {}", arrival.reason);
                    return self.park(&id, &state, reason, &ctx).await;
                };
                let result = self.replayer.replay(&batch).await;
                let recorded = result.clone().map_err(|e| e.to_string());
                let record = DeadLetterCommand::RecordReplay { by: Actor::Automatic, result: recorded };
                self.execute(&id, &record, &ctx).await?;
                match result {
                    Ok(records) => Ok(Outcome::Replayed { dead_letter_id: id, attempt, records }),
                    Err(ReplayError::Gone(reason)) => {
                        let reason = format!("its records cannot be replayed ({reason}): rebuild the read models");
                        self.park(&id, &state, reason, &ctx).await
                    }
                    // Left on the DLQ, back after a backoff: then replayed again, or parked.
                    Err(ReplayError::Failed(reason)) => {
                        let delay = self.backoff_seconds(attempt);
                        if let Some(handle) = &message.receipt_handle {
                            self.queues.retry_after(&arrival.dead_letter_queue, handle, delay).await?;
                        }
                        Err(HandlerError::ReplayFailed(reason))
                    }
                }
            }
            NextAction::Redrive { attempt } => {
                let task = task_token(&arrival.body);
                if let Some(token) = task
                    && !self.tasks.is_open(&token).await?
                {
                    let note = "the saga's task had closed (the state machine timed it out and moved on): \
                                redriving would answer a saga that no longer waits"
                        .to_owned();
                    let resolve = DeadLetterCommand::Resolve { by: Actor::Automatic, note: note.clone() };
                    self.execute(&id, &resolve, &ctx).await?;
                    return Ok(Outcome::Resolved { dead_letter_id: id, note });
                }
                let Some(target) = arrival.source.clone() else {
                    let reason = "no source queue is known to redrive it to".to_owned();
                    return self.park(&id, &state, reason, &ctx).await;
                };
                let delay_seconds = self.backoff_seconds(attempt);
                let attributes = redrive_attributes(&arrival, &id);
                match self.queues.send(&target, &arrival.body, &attributes, delay_seconds).await {
                    Ok(()) => {}
                    Err(HandlerError::NoSuchQueue(queue)) => {
                        let reason = format!("its source queue {queue} no longer exists");
                        return self.park(&id, &state, reason, &ctx).await;
                    }
                    Err(e) => return Err(e),
                }
                let redrive = DeadLetterCommand::Redrive { by: Actor::Automatic, delay_seconds };
                self.execute(&id, &redrive, &ctx).await?;
                Ok(Outcome::Redriven { dead_letter_id: id, attempt, delay_seconds })
            }
        }
    }

    /// An operator sends a dead letter back to its source (after fixing the cause), at once; a
    /// skipped stream batch is replayed to its consumer.
    pub async fn redrive_by_operator(&self, id: &str, operator: &str) -> Result<Outcome, OperatorError> {
        let state = self.load(id).await?;
        let arrival = state.first.clone().ok_or(OperatorError::Unknown)?;
        let by = Actor::Operator(operator.to_owned());
        let ctx = CommandContext { correlation_id: Some(id.to_owned()), ..CommandContext::default() };
        if arrival.failure == Failure::StreamBatch {
            let batch = StreamBatch::from_body(&arrival.body)
                .ok_or_else(|| OperatorError::NotRedrivable("its pointer does not read".into()))?;
            state
                .clone()
                .decide(&DeadLetterCommand::RecordReplay { by: by.clone(), result: Ok(0) })
                .map_err(|e| OperatorError::Refused(e.to_string()))?;
            let result = self.replayer.replay(&batch).await.map_err(|e| e.to_string());
            self.execute(id, &DeadLetterCommand::RecordReplay { by, result: result.clone() }, &ctx).await?;
            let records = result.map_err(|reason| OperatorError::Failed(HandlerError::ReplayFailed(reason)))?;
            return Ok(Outcome::Replayed { dead_letter_id: id.to_owned(), attempt: state.redrives + 1, records });
        }
        let target = arrival.source.clone().ok_or_else(|| {
            OperatorError::NotRedrivable("no source queue is known; send the body where it belongs by hand".into())
        })?;
        // Checked before sending: a dead letter that cannot be redriven is not sent anywhere.
        state
            .clone()
            .decide(&DeadLetterCommand::Redrive { by: Actor::Operator(operator.to_owned()), delay_seconds: 0 })
            .map_err(|e| OperatorError::Refused(e.to_string()))?;
        self.queues.send(&target, &arrival.body, &redrive_attributes(&arrival, id), 0).await?;
        let redrive = DeadLetterCommand::Redrive { by, delay_seconds: 0 };
        self.execute(id, &redrive, &ctx).await?;
        Ok(Outcome::Redriven { dead_letter_id: id.to_owned(), attempt: state.redrives + 1, delay_seconds: 0 })
    }

    /// An operator drops a dead letter (`discard`) or says it is dealt with (`resolve`), with a note.
    pub async fn settle_by_operator(
        &self,
        id: &str,
        operator: &str,
        discard: bool,
        note: &str,
    ) -> Result<DeadLetter, OperatorError> {
        let by = Actor::Operator(operator.to_owned());
        let command = if discard {
            DeadLetterCommand::Discard { by, note: note.to_owned() }
        } else {
            DeadLetterCommand::Resolve { by, note: note.to_owned() }
        };
        let ctx = CommandContext { correlation_id: Some(id.to_owned()), ..CommandContext::default() };
        match self.repo.execute_with_state::<DeadLetter>(id, &command, &ctx).await {
            Ok((_, state)) => Ok(state),
            Err(ExecuteError::Rejected(DeadLetterError::Unknown)) => Err(OperatorError::Unknown),
            Err(ExecuteError::Rejected(e)) => Err(OperatorError::Refused(e.to_string())),
            Err(e) => Err(OperatorError::Failed(HandlerError::Store(e.to_string()))),
        }
    }

    /// A flagged order's compensations, run again (after the cause is fixed) in a new execution
    /// of the saga that starts at them: all of them in reverse order, each idempotent. If they go
    /// through, the order is cancelled; if one fails again, the order is flagged again and its
    /// case comes back. Returns the execution's ARN.
    pub async fn retry_compensations(
        &self,
        order_id: &str,
        operator: &str,
        sfn: &aws_sdk_sfn::Client,
        saga_arn: &str,
    ) -> Result<String, OperatorError> {
        let store_error = |e: String| OperatorError::Failed(HandlerError::Store(e));
        let order = self.repo.load::<Order>(order_id).await.map_err(|e| store_error(e.to_string()))?;
        if order.state.status != OrderStatus::NeedsManualAction {
            return Err(OperatorError::Refused(format!("order {order_id} is {:?}, not flagged", order.state.status)));
        }
        let placed = order.state.placed.clone().ok_or(OperatorError::Unknown)?;
        let stream = StreamId::new("Order", order_id).map_err(|e| OperatorError::Refused(e.to_string()))?;
        let events = self.repo.store().load(&stream, 0).await.map_err(|e| store_error(e.to_string()))?;
        // The latest flag (decoded through the domain, so one stored in an older schema reads too).
        let failures = events
            .iter()
            .rev()
            .find_map(|e| match shared::aggregate::decode_event::<OrderEvent>(e) {
                Ok(OrderEvent::OrderFlaggedForManualAction { failures }) => Some(failures),
                _ => None,
            })
            .filter(|failures| !failures.is_empty())
            .ok_or(OperatorError::Unknown)?;
        let failed_step = failures[0].step.clone();
        let error = failures.iter().map(|f| format!("{} ({})", f.step, f.error)).collect::<Vec<_>>().join("; ");
        // The retry continues the order's flow: its correlation and trace, from `OrderPlaced`.
        let placed_event = events.first();
        let input = serde_json::json!({
            "order": placed,
            "correlationId": placed_event.map_or(order_id, |e| e.correlation_id.as_str()),
            "traceHeader": placed_event.and_then(|e| e.trace_header.as_deref()),
            "resume": "compensate",
            "failedStep": failed_step,
            "failure": { "Error": "RetriedByOperator", "Cause": format!("{operator} retried the compensations after: {error}") },
            "results": {},
            "compensations": {},
        });
        let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let name: String = format!("{order_id}-retry-{millis}").chars().take(80).collect();
        let started = sfn
            .start_execution()
            .state_machine_arn(saga_arn)
            .name(name)
            .input(input.to_string())
            .set_trace_header(input["traceHeader"].as_str().map(str::to_owned))
            .send()
            .await
            .map_err(|e| HandlerError::Aws(aws_sdk_sfn::error::DisplayErrorContext(&e).to_string()))?;
        // The case, if the manual-action queue's message reached the handler, says it was retried.
        let case = manual_action_case(order_id);
        if self.load(&case).await.is_ok() {
            let ctx = CommandContext { correlation_id: Some(case.clone()), ..CommandContext::default() };
            let redrive = DeadLetterCommand::Redrive { by: Actor::Operator(operator.to_owned()), delay_seconds: 0 };
            self.execute(&case, &redrive, &ctx).await?;
        }
        Ok(started.execution_arn)
    }

    /// A flagged order settled by hand: the order says so (final), and its case is resolved.
    pub async fn resolve_order(&self, order_id: &str, operator: &str, note: &str) -> Result<(), OperatorError> {
        if note.trim().is_empty() {
            return Err(OperatorError::Refused("a resolution needs a note saying how it was settled".into()));
        }
        let command = OrderCommand::ResolveManualAction { by: operator.to_owned(), note: note.to_owned() };
        let ctx = CommandContext { correlation_id: Some(order_id.to_owned()), ..CommandContext::default() };
        match self.repo.execute::<Order>(order_id, &command, &ctx).await {
            Ok(_) => {}
            Err(ExecuteError::Rejected(e)) => return Err(OperatorError::Refused(e.to_string())),
            Err(e) => return Err(OperatorError::Failed(HandlerError::Store(e.to_string()))),
        }
        let case = manual_action_case(order_id);
        match self.settle_by_operator(&case, operator, false, note).await {
            Ok(_) | Err(OperatorError::Unknown) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A dead letter's state, from its stream.
    pub async fn load(&self, id: &str) -> Result<DeadLetter, OperatorError> {
        let loaded = self
            .repo
            .load::<DeadLetter>(id)
            .await
            .map_err(|e| OperatorError::Failed(HandlerError::Store(e.to_string())))?;
        if loaded.version == 0 {
            return Err(OperatorError::Unknown);
        }
        Ok(loaded.state)
    }

    async fn park(
        &self,
        id: &str,
        state: &DeadLetter,
        reason: String,
        ctx: &CommandContext,
    ) -> Result<Outcome, HandlerError> {
        let first = state.first.as_ref();
        let message = serde_json::json!({
            "deadLetterId": id,
            "reason": reason,
            "failure": state.failure(),
            "deadLetterQueue": first.map(|a| &a.dead_letter_queue),
            "source": first.and_then(|a| a.source.as_ref()),
            "timesSeen": state.times_seen,
            "firstSeen": first.map(|a| &a.seen_at),
            "act": match (state.failure(), id.strip_prefix("manual-action-")) {
                (Some(Failure::ManualAction), Some(order)) => format!(
                    "fix the cause, then `cargo run -p ops -- orders retry-compensations {order}`, or settle it by hand \
                     and `cargo run -p ops -- orders resolve {order} --note ...`"
                ),
                _ => format!("cargo run -p ops -- dead-letters show {id}"),
            },
        });
        let queue = first.map(|a| queue_name(&a.dead_letter_queue)).unwrap_or_default();
        let subject = format!("Dead letter parked from {queue}");
        // Told first, then recorded: a crash in between tells twice rather than never.
        self.notifier.notify(&subject, &message.to_string()).await?;
        self.execute(id, &DeadLetterCommand::Park { reason: reason.clone() }, ctx).await?;
        Ok(Outcome::Parked { dead_letter_id: id.to_owned(), reason })
    }

    /// The jittered backoff before automatic attempt `attempt`, in whole seconds, at most SQS's
    /// longest delay (900 s).
    fn backoff_seconds(&self, attempt: u32) -> u32 {
        self.policy.delay(attempt.saturating_sub(1)).as_secs_f64().ceil().min(900.0) as u32
    }

    /// Executes `command` on dead letter `id` (load, decide, append; a handful of events, so a
    /// load per command costs one Query). `Ok(None)`: the domain refused it because another copy
    /// of this message got there first, and there is nothing left to do.
    async fn execute(
        &self,
        id: &str,
        command: &DeadLetterCommand,
        ctx: &CommandContext,
    ) -> Result<Option<DeadLetter>, HandlerError> {
        match self.repo.execute_with_state::<DeadLetter>(id, command, ctx).await {
            Ok((_, state)) => Ok(Some(state)),
            Err(ExecuteError::Rejected(e)) => {
                tracing::warn!(dead_letter_id = %id, error = %e, "already acted on");
                Ok(None)
            }
            Err(e) => Err(HandlerError::Store(e.to_string())),
        }
    }
}

/// The message's own attributes, and the dead letter it belongs to.
fn redrive_attributes(arrival: &Arrival, id: &str) -> BTreeMap<String, String> {
    let mut attributes: BTreeMap<String, String> = arrival
        .attributes
        .iter()
        .filter(|(k, _)| !BOOKKEEPING.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    attributes.insert(DEAD_LETTER_ID.to_owned(), id.to_owned());
    attributes
}

/// Reads what kind of failure a DLQ message is, from its attributes and body.
pub fn classify(message: &SqsMessage, seen_at: String) -> Arrival {
    let attributes: BTreeMap<String, String> =
        message.message_attributes.iter().filter_map(|(k, v)| v.string_value.clone().map(|s| (k.clone(), s))).collect();
    let body = message.body.clone().unwrap_or_default();
    let receive_count = message.attributes.get("ApproximateReceiveCount").and_then(|c| c.parse().ok()).unwrap_or(0);
    let dead_letter_queue = message.event_source_arn.clone().unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_str(&body).ok();
    let (failure, reason, source) = if let Some(info) = parsed.as_ref().and_then(|v| v.get("DDBStreamBatchInfo")) {
        let context = parsed.as_ref().and_then(|v| v.get("requestContext"));
        let text =
            |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).and_then(Value::as_str).unwrap_or("?").to_owned();
        let reason = format!(
            "{} skipped {} records of shard {} ({} to {}): {}",
            text(context, "functionArn"),
            info.get("batchSize").and_then(Value::as_u64).unwrap_or(0),
            text(Some(info), "shardId"),
            text(Some(info), "startSequenceNumber"),
            text(Some(info), "endSequenceNumber"),
            text(context, "condition"),
        );
        (Failure::StreamBatch, reason, info.get("streamArn").and_then(Value::as_str).map(str::to_owned))
    } else if let Some(case) = parsed.as_ref().filter(|v| v.get("executionId").is_some()).and_then(manual_action) {
        (Failure::ManualAction, case, None)
    } else if let Some(reason) = attributes.get("reason") {
        // A consumer parked it: it cannot read or accept it.
        let reason = if reason.trim().is_empty() { "its consumer parked it without a reason" } else { reason };
        (Failure::Poison, reason.to_owned(), attributes.get("sourceArn").cloned())
    } else if let Some(code) = attributes.get("ERROR_CODE") {
        let detail = attributes.get("ERROR_MESSAGE").map(String::as_str).unwrap_or_default();
        (
            Failure::Transient,
            format!("EventBridge could not deliver it: {code} {detail}"),
            attributes.get("TARGET_ARN").cloned(),
        )
    } else {
        (Failure::Transient, "its consumer failed it on every receive (the queue's maxReceiveCount)".to_owned(), None)
    };
    Arrival {
        dead_letter_queue,
        source,
        message_id: message.message_id.clone().unwrap_or_default(),
        body,
        attributes,
        failure,
        // (It may quote the message, its attributes or a consumer's reason whole: kept short; the
        // body is kept whole.)
        reason: shared::text::bounded(&reason, shared::text::MAX_REASON),
        receive_count,
        seen_at,
    }
}

/// A manual-action case (what the saga's ReportManualAction state sends): what failed, in words,
/// naming every step that kept failing, in the order the saga ran them. A message in the shape
/// from before the saga ran every compensation names one (`failedStep`, `error`, `cause`).
fn manual_action(v: &Value) -> Option<String> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    v.get("orderId")?.as_str()?;
    let failures: BTreeMap<String, shared::saga::Failure> =
        v.get("failures").and_then(|f| serde_json::from_value(f.clone()).ok()).unwrap_or_default();
    let failed = if failures.is_empty() {
        format!("{} kept failing ({}: {})", text("failedStep"), text("error"), text("cause"))
    } else {
        let each = shared::saga::failed_actions(&failures);
        each.iter().map(|f| format!("{} kept failing ({})", f.step, f.error)).collect::<Vec<_>>().join(" and ")
    };
    Some(format!("order {} needs a person: {failed}; execution {}", text("orderId"), text("executionId")))
}

/// The case id of an order's manual action: one per order.
pub fn manual_action_case(order_id: &str) -> String {
    format!("manual-action-{order_id}")
}

/// A saga step command's task token, if the body is one.
fn task_token(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    value.get("taskToken")?.as_str().map(str::to_owned)
}

/// `arn:aws:sqs:<region>:<account>:<name>` → `<name>`.
pub fn queue_name(arn: &str) -> &str {
    arn.rsplit(':').next().unwrap_or(arn)
}

/// [`Queues`] on SQS, with the look-ups cached for the instance's life.
pub struct SqsQueues {
    pub client: aws_sdk_sqs::Client,
    urls: Mutex<HashMap<String, String>>,
    sources: Mutex<HashMap<String, Option<String>>>,
}

impl SqsQueues {
    pub fn new(client: aws_sdk_sqs::Client) -> Self {
        Self { client, urls: Mutex::default(), sources: Mutex::default() }
    }

    async fn url(&self, arn: &str) -> Result<String, HandlerError> {
        if let Some(url) = self.urls.lock().ok().and_then(|u| u.get(arn).cloned()) {
            return Ok(url);
        }
        let mut parts = arn.split(':');
        let (account, name) = (parts.nth(4), parts.next());
        let (Some(account), Some(name)) = (account, name) else {
            return Err(HandlerError::Aws(format!("{arn} is not a queue ARN")));
        };
        let found =
            self.client.get_queue_url().queue_name(name).queue_owner_aws_account_id(account).send().await.map_err(
                |e| match e.as_service_error() {
                    Some(s) if s.is_queue_does_not_exist() => HandlerError::NoSuchQueue(arn.to_owned()),
                    _ => HandlerError::Aws(aws_sdk_sqs::error::DisplayErrorContext(&e).to_string()),
                },
            )?;
        let url = found.queue_url.unwrap_or_default();
        if let Ok(mut urls) = self.urls.lock() {
            urls.insert(arn.to_owned(), url.clone());
        }
        Ok(url)
    }
}

fn sqs_error<E: std::error::Error + 'static, R: std::fmt::Debug>(
    e: aws_sdk_sqs::error::SdkError<E, R>,
) -> HandlerError {
    HandlerError::Aws(aws_sdk_sqs::error::DisplayErrorContext(&e).to_string())
}

impl Queues for SqsQueues {
    async fn source_of(&self, dead_letter_queue: &str) -> Result<Option<String>, HandlerError> {
        if let Some(source) = self.sources.lock().ok().and_then(|s| s.get(dead_letter_queue).cloned()) {
            return Ok(source);
        }
        let url = match self.url(dead_letter_queue).await {
            Ok(url) => url,
            // Its queue is gone (a sample, a deleted stack): no source to find.
            Err(HandlerError::NoSuchQueue(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let listed = self.client.list_dead_letter_source_queues().queue_url(url).send().await.map_err(sqs_error)?;
        // Several sources share this DLQ: which one a message came from is not known.
        let source = match listed.queue_urls() {
            [one] => {
                let attributes = self
                    .client
                    .get_queue_attributes()
                    .queue_url(one)
                    .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                    .send()
                    .await
                    .map_err(sqs_error)?;
                attributes.attributes().and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)).cloned()
            }
            _ => None,
        };
        if let Ok(mut sources) = self.sources.lock() {
            sources.insert(dead_letter_queue.to_owned(), source.clone());
        }
        Ok(source)
    }

    async fn retry_after(&self, queue_arn: &str, receipt_handle: &str, seconds: u32) -> Result<(), HandlerError> {
        let url = self.url(queue_arn).await?;
        let change = self.client.change_message_visibility().queue_url(url).receipt_handle(receipt_handle);
        change.visibility_timeout(seconds.min(43_200) as i32).send().await.map(|_| ()).map_err(sqs_error)
    }

    async fn send(
        &self,
        queue_arn: &str,
        body: &str,
        attributes: &BTreeMap<String, String>,
        delay_seconds: u32,
    ) -> Result<(), HandlerError> {
        let url = self.url(queue_arn).await?;
        let mut send =
            self.client.send_message().queue_url(url).message_body(body).delay_seconds(delay_seconds.min(900) as i32);
        for (name, value) in attributes {
            let value = aws_sdk_sqs::types::MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build()
                .map_err(|e| HandlerError::Aws(e.to_string()))?;
            send = send.message_attributes(name, value);
        }
        send.send().await.map(|_| ()).map_err(sqs_error)
    }
}

/// [`Notifier`] on SNS.
pub struct SnsNotifier {
    pub client: aws_sdk_sns::Client,
    pub topic_arn: String,
}

impl Notifier for SnsNotifier {
    async fn notify(&self, subject: &str, message: &str) -> Result<(), HandlerError> {
        // SNS subjects: at most 100 printable ASCII characters.
        let subject: String = subject.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(100).collect();
        self.client
            .publish()
            .topic_arn(&self.topic_arn)
            .subject(subject)
            .message(message)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| HandlerError::Aws(aws_sdk_sns::error::DisplayErrorContext(&e).to_string()))
    }
}

/// [`Tasks`] on Step Functions: a heartbeat is accepted only while the task is open, and changes
/// nothing for a state without `HeartbeatSeconds`.
impl Tasks for aws_sdk_sfn::Client {
    async fn is_open(&self, token: &str) -> Result<bool, HandlerError> {
        match self.send_task_heartbeat().task_token(token).send().await {
            Ok(_) => Ok(true),
            Err(e) => match e.as_service_error() {
                Some(s) if s.is_task_timed_out() || s.is_task_does_not_exist() || s.is_invalid_token() => Ok(false),
                _ => Err(HandlerError::Aws(aws_sdk_sfn::error::DisplayErrorContext(&e).to_string())),
            },
        }
    }
}

/// [`Replayer`] on DynamoDB Streams and Lambda's Invoke API.
pub struct StreamReplayer {
    pub streams: aws_sdk_dynamodbstreams::Client,
    pub lambda: aws_sdk_lambda::Client,
    pub region: String,
}

/// Records per invocation of a replay: a stream mapping's largest batch here is 100.
const REPLAY_CHUNK: usize = 100;

impl StreamReplayer {
    async fn read(&self, batch: &StreamBatch) -> Result<Vec<EventRecord>, ReplayError> {
        use aws_sdk_dynamodbstreams::error::DisplayErrorContext;
        let iterator = self
            .streams
            .get_shard_iterator()
            .stream_arn(&batch.stream_arn)
            .shard_id(&batch.shard_id)
            .shard_iterator_type(aws_sdk_dynamodbstreams::types::ShardIteratorType::AtSequenceNumber)
            .sequence_number(&batch.start)
            .send()
            .await
            .map_err(|e| {
                let text = DisplayErrorContext(&e).to_string();
                match e.as_service_error() {
                    Some(s) if s.is_resource_not_found_exception() || s.is_trimmed_data_access_exception() => {
                        ReplayError::Gone(text)
                    }
                    _ => ReplayError::Failed(text),
                }
            })?;
        let mut iterator = iterator.shard_iterator;
        let (mut records, mut empty_pages) = (Vec::new(), 0);
        while let Some(current) = iterator.take() {
            let page = self
                .streams
                .get_records()
                .shard_iterator(current)
                .limit(1000)
                .send()
                .await
                .map_err(|e| ReplayError::Failed(format!("reading the stream: {}", DisplayErrorContext(&e))))?;
            if page.records().is_empty() {
                empty_pages += 1;
            }
            for record in page.records.unwrap_or_default() {
                let sequence = record.dynamodb.as_ref().and_then(|d| d.sequence_number.clone()).unwrap_or_default();
                if sequence_after(&sequence, &batch.end) {
                    return Ok(records);
                }
                records.push(shared::lambda::streams::lambda_record(record, &batch.stream_arn, &self.region));
            }
            // An open shard answers empty pages past its end: the batch is behind us by then.
            if empty_pages >= 3 {
                break;
            }
            iterator = page.next_shard_iterator;
        }
        Ok(records)
    }
}

impl Replayer for StreamReplayer {
    async fn replay(&self, batch: &StreamBatch) -> Result<u32, ReplayError> {
        let records = self.read(batch).await?;
        if records.is_empty() {
            let gone = format!("no records from {} to {} on {}", batch.start, batch.end, batch.shard_id);
            return Err(ReplayError::Gone(gone));
        }
        let count = records.len() as u32;
        for chunk in records.chunks(REPLAY_CHUNK) {
            let mut event = DynamoDbEvent::default();
            event.records = chunk.to_vec();
            let payload = serde_json::to_vec(&event).map_err(|e| ReplayError::Failed(e.to_string()))?;
            let out = self
                .lambda
                .invoke()
                .function_name(&batch.function_arn)
                .payload(aws_sdk_lambda::primitives::Blob::new(payload))
                .send()
                .await
                .map_err(|e| {
                    let text = aws_sdk_lambda::error::DisplayErrorContext(&e);
                    ReplayError::Failed(format!("invoking {}: {text}", batch.function_arn))
                })?;
            let answer = out.payload.map(|p| String::from_utf8_lossy(p.as_ref()).into_owned()).unwrap_or_default();
            if let Some(error) = out.function_error {
                return Err(ReplayError::Failed(format!("{} failed ({error}): {answer}", batch.function_arn)));
            }
            // A consumer reporting batch item failures did not take every record.
            let response: DynamoDbEventResponse = serde_json::from_str(&answer).unwrap_or_default();
            if let Some(first) = response.batch_item_failures.first() {
                let at = first.item_identifier.clone().unwrap_or_default();
                return Err(ReplayError::Failed(format!(
                    "{} did not take the records from {at} on",
                    batch.function_arn
                )));
            }
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use shared::domain::dead_letter::Status;
    use shared::eventstore::InMemoryEventStore;

    use super::*;

    const SOURCE: &str = "arn:aws:sqs:us-east-1:123456789012:order-saga-ReserveInventoryQueue";

    /// A sent message: queue, body, attributes, delay.
    type Message = (String, String, BTreeMap<String, String>, u32);

    #[derive(Default)]
    struct Sent(Mutex<Vec<Message>>, Mutex<Vec<u32>>);

    impl Queues for Sent {
        async fn source_of(&self, dead_letter_queue: &str) -> Result<Option<String>, HandlerError> {
            Ok(dead_letter_queue.ends_with("ReserveInventoryDlq").then(|| SOURCE.to_owned()))
        }
        async fn retry_after(&self, _queue_arn: &str, _receipt_handle: &str, seconds: u32) -> Result<(), HandlerError> {
            self.1.lock().map_err(|e| HandlerError::Aws(e.to_string()))?.push(seconds);
            Ok(())
        }
        async fn send(
            &self,
            queue_arn: &str,
            body: &str,
            attributes: &BTreeMap<String, String>,
            delay_seconds: u32,
        ) -> Result<(), HandlerError> {
            let sent = (queue_arn.to_owned(), body.to_owned(), attributes.clone(), delay_seconds);
            self.0.lock().map_err(|e| HandlerError::Aws(e.to_string()))?.push(sent);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Told(Mutex<Vec<(String, String)>>);

    impl Notifier for Told {
        async fn notify(&self, subject: &str, message: &str) -> Result<(), HandlerError> {
            self.0.lock().map_err(|e| HandlerError::Aws(e.to_string()))?.push((subject.to_owned(), message.to_owned()));
            Ok(())
        }
    }

    struct TaskOpen(bool);

    impl Tasks for TaskOpen {
        async fn is_open(&self, _token: &str) -> Result<bool, HandlerError> {
            Ok(self.0)
        }
    }

    /// Replays answering from a script, the last answer repeated.
    struct Replays(Mutex<Vec<Result<u32, ReplayError>>>);

    impl Replayer for Replays {
        async fn replay(&self, _batch: &StreamBatch) -> Result<u32, ReplayError> {
            let mut script = self.0.lock().map_err(|e| ReplayError::Failed(e.to_string()))?;
            if script.len() > 1 { script.remove(0) } else { script[0].clone() }
        }
    }

    type Handler = DeadLetterHandler<InMemoryEventStore, Sent, Told, TaskOpen, Replays>;

    fn handler(task_open: bool) -> Handler {
        DeadLetterHandler {
            repo: Repository::new(InMemoryEventStore::new()),
            queues: Sent::default(),
            notifier: Told::default(),
            tasks: TaskOpen(task_open),
            replayer: Replays(Mutex::new(vec![Err(ReplayError::Failed("the relay crashed".into())), Ok(7)])),
            policy: RetryPolicy {
                max_attempts: 2,
                base_delay: Duration::from_secs(30),
                max_delay: Duration::from_secs(900),
            },
        }
    }

    /// The first record of a sample in `events/handle-dead-letters/`.
    fn sample(name: &str) -> SqsMessage {
        let path = format!("{}/../../events/handle-dead-letters/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("sample event");
        let event: SqsEvent = serde_json::from_str(&text).expect("an SQS event");
        event.records.into_iter().next().expect("one record")
    }

    async fn state(h: &Handler, id: &str) -> DeadLetter {
        h.repo.load::<DeadLetter>(id).await.expect("load").state
    }

    #[tokio::test]
    async fn a_command_that_ran_out_of_receives_is_redriven_to_its_queue_tagged_with_its_dead_letter() {
        // Given a step command the redrive policy moved to the DLQ, its task still open
        let h = handler(true);
        let message = sample("receives-exhausted.json");
        // When it is handled
        let outcome = h.handle_one(&message).await.expect("handled");
        // Then it went back to its queue, delayed within the first backoff, tagged with the dead letter
        let id = message.message_id.clone().expect("id");
        let Outcome::Redriven { attempt: 1, delay_seconds, .. } = outcome else { panic!("{outcome:?}") };
        assert!(delay_seconds <= 30, "{delay_seconds}");
        let sent = h.queues.0.lock().expect("sent").clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, SOURCE);
        assert_eq!(Some(&sent[0].1), message.body.as_ref());
        assert_eq!(sent[0].2.get(DEAD_LETTER_ID), Some(&id));
        let dl = state(&h, &id).await;
        assert_eq!((dl.status, dl.automatic_redrives), (Status::Redriven, 1));
        assert!(h.notifier.0.lock().expect("told").is_empty());
    }

    #[tokio::test]
    async fn a_redriven_copy_that_keeps_failing_is_parked_after_the_bound_and_people_are_told() {
        // Given a command redriven twice (the policy's bound), each copy back on the DLQ
        let h = handler(true);
        let first = sample("receives-exhausted.json");
        let id = first.message_id.clone().expect("id");
        h.handle_one(&first).await.expect("first");
        for n in 0..2 {
            let mut back = first.clone();
            back.message_id = Some(format!("copy-{n}"));
            let (_, body, attributes, _) = h.queues.0.lock().expect("sent").last().cloned().expect("a redrive");
            back.body = Some(body);
            back.message_attributes = attributes
                .into_iter()
                .map(|(k, v)| {
                    let mut a = aws_lambda_events::event::sqs::SqsMessageAttribute::default();
                    a.string_value = Some(v);
                    a.data_type = Some("String".into());
                    (k, a)
                })
                .collect();
            // When it comes back
            let outcome = h.handle_one(&back).await.expect("handled");
            if n == 0 {
                assert!(matches!(outcome, Outcome::Redriven { attempt: 2, .. }), "{outcome:?}");
            } else {
                // Then the third arrival is parked, not redriven
                assert!(matches!(outcome, Outcome::Parked { .. }), "{outcome:?}");
            }
        }
        assert_eq!(h.queues.0.lock().expect("sent").len(), 2);
        let dl = state(&h, &id).await;
        assert_eq!((dl.status, dl.times_seen), (Status::Parked, 3));
        let told = h.notifier.0.lock().expect("told").clone();
        assert_eq!(told.len(), 1);
        assert!(told[0].1.contains(&id) && told[0].1.contains("after 2 automatic redrives"), "{}", told[0].1);
    }

    #[tokio::test]
    async fn an_unreadable_message_is_parked_with_its_reason_and_never_redriven() {
        let h = handler(true);
        let message = sample("unreadable.json");
        let outcome = h.handle_one(&message).await.expect("handled");
        let Outcome::Parked { reason, dead_letter_id } = outcome else { panic!("{outcome:?}") };
        assert!(reason.contains("expected struct Order"), "{reason}");
        assert!(h.queues.0.lock().expect("sent").is_empty());
        let dl = state(&h, &dead_letter_id).await;
        assert_eq!(dl.failure(), Some(Failure::Poison));
        assert_eq!(dl.first.and_then(|a| a.source).as_deref(), Some(SOURCE));
        assert_eq!(h.notifier.0.lock().expect("told").len(), 1);

        // When its source message, delivered again, is dead-lettered again (a new DLQ message)
        let mut again = message.clone();
        again.message_id = Some("dlq-copy-2".into());
        let outcome = h.handle_one(&again).await.expect("handled");
        // Then it is the same dead letter, seen twice and parked again, not a second one
        assert!(matches!(&outcome, Outcome::Parked { dead_letter_id: same, .. } if *same == dead_letter_id));
        let dl = state(&h, &dead_letter_id).await;
        assert_eq!((dl.status, dl.times_seen), (Status::Parked, 2));
    }

    #[test]
    fn a_manual_action_case_names_every_step_that_kept_failing_in_the_order_the_saga_ran_them() {
        // Given what the saga's ReportManualAction sends when the refund and the stock release
        // both kept failing (a map, in no particular order)
        let body = serde_json::json!({
            "orderId": "ord-1",
            "failures": {
                "ReleaseInventory": { "Error": "States.Timeout" },
                "RefundPayment": { "Error": "ServiceUnavailable", "Cause": "refund of pay_1 failed" },
            },
            "executionId": "arn:aws:states:us-east-1:1:execution:saga:ord-1",
        });
        // When it is read as a case
        let reason = manual_action(&body).expect("a manual-action case");
        // Then the reason names both, refund first, each with its error
        assert_eq!(
            reason,
            "order ord-1 needs a person: RefundPayment kept failing (ServiceUnavailable: refund of pay_1 failed) \
             and ReleaseInventory kept failing (States.Timeout); execution arn:aws:states:us-east-1:1:execution:saga:ord-1"
        );
        // And a message in the shape from before (one failed step) still reads
        let old = serde_json::json!({
            "orderId": "ord-2", "failedStep": "RefundPayment", "error": "ServiceUnavailable", "cause": "down",
            "executionId": "x",
        });
        assert_eq!(
            manual_action(&old).as_deref(),
            Some("order ord-2 needs a person: RefundPayment kept failing (ServiceUnavailable: down); execution x")
        );
    }

    #[tokio::test]
    async fn an_undeliverable_bus_event_goes_to_the_rules_target() {
        let h = handler(true);
        let outcome = h.handle_one(&sample("undeliverable.json")).await.expect("handled");
        assert!(matches!(outcome, Outcome::Redriven { attempt: 1, .. }), "{outcome:?}");
        let sent = h.queues.0.lock().expect("sent").clone();
        assert_eq!(sent[0].0, "arn:aws:sqs:us-east-1:123456789012:order-saga-OrderViewProjectionQueue");
        assert!(!sent[0].2.contains_key("ERROR_CODE"), "bookkeeping attributes are not passed on");
    }

    #[tokio::test]
    async fn a_command_whose_task_has_closed_is_resolved_not_redriven() {
        let h = handler(false);
        let message = sample("receives-exhausted.json");
        let outcome = h.handle_one(&message).await.expect("handled");
        assert!(matches!(outcome, Outcome::Resolved { .. }), "{outcome:?}");
        assert!(h.queues.0.lock().expect("sent").is_empty());
        assert_eq!(state(&h, message.message_id.as_deref().expect("id")).await.status, Status::Resolved);
    }

    #[tokio::test]
    async fn a_skipped_stream_batch_is_replayed_to_its_consumer_and_retried_after_a_backoff_if_that_fails() {
        // Given a relay's skipped batch, whose first replay fails and second goes through
        let h = handler(true);
        let message = sample("stream-batch-skipped.json");
        let id = message.message_id.clone().expect("id");
        // When it is handled: the replay fails, the message is left on the DLQ for a later try
        let first = h.handle_one(&message).await;
        assert!(matches!(first, Err(HandlerError::ReplayFailed(ref r)) if r.contains("crashed")), "{first:?}");
        assert_eq!(h.queues.1.lock().expect("retries").len(), 1, "made visible again after a backoff");
        assert_eq!(state(&h, &id).await.status, Status::Pending);
        // When the DLQ delivers it again: the replay goes through and the dead letter is settled
        let second = h.handle_one(&message).await.expect("handled");
        assert_eq!(second, Outcome::Replayed { dead_letter_id: id.clone(), attempt: 2, records: 7 });
        let dl = state(&h, &id).await;
        assert_eq!((dl.status, dl.redrives), (Status::Resolved, 2));
        assert!(h.queues.0.lock().expect("sent").is_empty(), "nothing is sent to a queue");
    }

    #[test]
    fn a_pointer_reads_as_the_batch_it_names() {
        let body = sample("stream-batch-skipped.json").body.expect("body");
        let batch = StreamBatch::from_body(&body).expect("a pointer");
        assert!(batch.function_arn.ends_with(":function:order-saga-OutboxRelayFunction"));
        assert_eq!((batch.start.as_str(), batch.end.as_str()), ("4700000000000000000001", "4700000000000000000100"));
        assert!(sequence_after("4700000000000000000101", &batch.end));
        assert!(!sequence_after("999", &batch.end), "a shorter number is smaller");
    }

    #[tokio::test]
    async fn the_same_dlq_message_delivered_twice_is_acted_on_once() {
        let h = handler(true);
        let message = sample("receives-exhausted.json");
        h.handle_one(&message).await.expect("first");
        let again = h.handle_one(&message).await.expect("second");
        assert!(matches!(again, Outcome::AlreadyHandled { .. }), "{again:?}");
        assert_eq!(h.queues.0.lock().expect("sent").len(), 1);
    }

    /// Arbitrary DLQ messages (any body, any attributes): each is recorded as a dead letter with
    /// a short reason, classified by what it says it is, and acted on; none panics, none is left
    /// on the queue when nothing failed.
    mod properties {
        use proptest::prelude::*;
        use serde_json::json;
        use shared::testing::{json_with_keys, text};
        use shared::text::MAX_REASON;

        use super::*;

        fn any_json() -> impl Strategy<Value = Value> {
            const KEYS: &[&str] = &[
                "taskToken",
                "orderId",
                "executionId",
                "failures",
                "failedStep",
                "error",
                "cause",
                "DDBStreamBatchInfo",
                "requestContext",
                "detail",
                "streamId",
                "correlationId",
            ];
            json_with_keys(KEYS)
        }

        /// A sample body with one field (of its own, or of a nested object) replaced by anything.
        fn damaged_sample() -> impl Strategy<Value = String> {
            let samples = prop::sample::select(vec![
                "receives-exhausted.json",
                "unreadable.json",
                "undeliverable.json",
                "stream-batch-skipped.json",
            ]);
            let pointer = prop::sample::select(vec![
                "/taskToken",
                "/order",
                "/detail",
                "/detail/streamId",
                "/DDBStreamBatchInfo",
                "/DDBStreamBatchInfo/shardId",
                "/DDBStreamBatchInfo/batchSize",
                "/DDBStreamBatchInfo/streamArn",
                "/requestContext",
                "/requestContext/functionArn",
            ]);
            (samples, pointer, any_json()).prop_map(|(name, pointer, value)| {
                let mut body: Value = serde_json::from_str(&sample(name).body.unwrap_or_default()).unwrap_or_default();
                if let Some(slot) = body.pointer_mut(pointer) {
                    *slot = value;
                }
                body.to_string()
            })
        }

        /// A manual-action case with any order, execution and failures.
        fn manual_action_body() -> impl Strategy<Value = String> {
            (text(), text(), any_json()).prop_map(|(order, execution, failures)| {
                json!({ "orderId": order, "executionId": execution, "failures": failures }).to_string()
            })
        }

        fn body() -> impl Strategy<Value = Option<String>> {
            proptest::option::weighted(
                0.95,
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
                    text(),
                    any_json().prop_map(|v| v.to_string()),
                    damaged_sample(),
                    manual_action_body(),
                ],
            )
        }

        fn attributes() -> impl Strategy<Value = BTreeMap<String, Option<String>>> {
            let name = prop_oneof![
                prop::sample::select(vec![
                    "reason",
                    "sourceArn",
                    "sourceId",
                    DEAD_LETTER_ID,
                    "ERROR_CODE",
                    "ERROR_MESSAGE",
                    "RULE_ARN",
                    "TARGET_ARN",
                ])
                .prop_map(str::to_owned),
                "[a-zA-Z]{1,8}",
            ];
            prop::collection::btree_map(name, proptest::option::weighted(0.9, text()), 0..5)
        }

        fn message(i: usize) -> impl Strategy<Value = SqsMessage> {
            let queue = prop_oneof![
                Just(Some("arn:aws:sqs:us-east-1:123456789012:order-saga-ReserveInventoryDlq".to_owned())),
                proptest::option::of(text()),
            ];
            (body(), attributes(), queue, proptest::option::of(".{0,12}")).prop_map(
                move |(body, attributes, queue, receive_count)| {
                    let mut message = sample("receives-exhausted.json");
                    message.message_id = Some(format!("3f0c6a7e-2b1d-4c8e-9a55-00000000000{i}"));
                    message.body = body;
                    message.event_source_arn = queue;
                    message.attributes = receive_count
                        .map(|count| HashMap::from([("ApproximateReceiveCount".to_owned(), count)]))
                        .unwrap_or_default();
                    message.message_attributes = attributes
                        .into_iter()
                        .map(|(name, value)| {
                            let mut attribute = aws_lambda_events::event::sqs::SqsMessageAttribute::default();
                            attribute.data_type = Some(if value.is_some() { "String" } else { "Binary" }.into());
                            attribute.string_value = value;
                            (name, attribute)
                        })
                        .collect();
                    message
                },
            )
        }

        fn block_on<F: std::future::Future>(future: F) -> F::Output {
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(future)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            #[test]
            fn any_message_is_classified_with_a_short_reason(message in message(0)) {
                let arrival = classify(&message, "2026-11-22T10:00:00.000000Z".into());
                let reason = &arrival.reason;
                prop_assert!(!reason.is_empty() && reason.len() <= MAX_REASON, "{} bytes", reason.len());
                prop_assert_eq!(&arrival.body, message.body.as_deref().unwrap_or_default());
                let body: Option<Value> = message.body.as_deref().and_then(|b| serde_json::from_str(b).ok());
                let reason_attribute = message.message_attributes.get("reason").and_then(|a| a.string_value.as_ref());
                let expected = match &body {
                    Some(v) if v.get("DDBStreamBatchInfo").is_some() => Failure::StreamBatch,
                    Some(v) if v.get("executionId").is_some() && v.get("orderId").is_some_and(Value::is_string) => {
                        Failure::ManualAction
                    }
                    _ if reason_attribute.is_some() => Failure::Poison,
                    _ => Failure::Transient,
                };
                prop_assert_eq!(arrival.failure, expected);
            }

            #[test]
            fn any_message_becomes_a_dead_letter_with_a_reason_and_is_acted_on(
                messages in (1usize..4).prop_flat_map(|n| (0..n).map(message).collect::<Vec<_>>()),
                task_open in any::<bool>(),
            ) {
                let mut h = handler(task_open);
                h.replayer = Replays(Mutex::new(vec![Ok(3)]));
                let mut event = SqsEvent::default();
                event.records = messages.clone();
                // The batch as Lambda hands it over: nothing is left on the queue.
                let response = block_on(h.handle(event, Deadline::never()));
                prop_assert!(response.batch_item_failures.is_empty(), "{:?}", response.batch_item_failures);

                // And each message, handled again by a fresh handler, says what was done.
                let mut h = handler(task_open);
                h.replayer = Replays(Mutex::new(vec![Ok(3)]));
                let mut seen = Vec::new();
                for message in &messages {
                    let outcome = block_on(h.handle_one(message)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let id = match &outcome {
                        Outcome::Parked { dead_letter_id, reason } => {
                            prop_assert!(!reason.is_empty(), "no reason");
                            prop_assert!(reason.len() <= MAX_REASON + 100, "{} bytes", reason.len());
                            dead_letter_id
                        }
                        Outcome::AlreadyHandled { dead_letter_id } => {
                            prop_assert!(seen.contains(dead_letter_id), "{outcome:?} on a first arrival");
                            dead_letter_id
                        }
                        Outcome::Redriven { dead_letter_id, .. }
                        | Outcome::Resolved { dead_letter_id, .. }
                        | Outcome::Replayed { dead_letter_id, .. } => dead_letter_id,
                    };
                    let dead_letter = block_on(state(&h, id));
                    prop_assert!(dead_letter.times_seen >= 1);
                    prop_assert!(!dead_letter.last_reason.is_empty() && dead_letter.last_reason.len() <= MAX_REASON);
                    let first = dead_letter.first.as_ref().expect("the first arrival");
                    if !seen.contains(id) {
                        prop_assert_eq!(&first.body, message.body.as_deref().unwrap_or_default());
                    }
                    if first.failure == Failure::Poison {
                        let parked = matches!(outcome, Outcome::Parked { .. } | Outcome::AlreadyHandled { .. });
                        prop_assert!(parked, "{outcome:?}");
                    }
                    seen.push(id.clone());
                }
            }
        }
    }
}
