//! The batch loop of every SQS and DynamoDB stream consumer, once: records worked a few at a
//! time, never past the invocation's [`Deadline`], unreadable ones parked with their reason on
//! the function's DLQ (the [`DeadLetters`] port) instead of looping. [`Batch::sqs`] reports the
//! failed messages for redelivery; [`Batch::stream`] the first record, in stream order, that
//! failed or did not finish, as Lambda checkpoints every record before it.

use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use futures::stream::{self, StreamExt};
use tracing::{Instrument, Span};

use crate::deadline::Deadline;
use crate::text::{MAX_REASON, bounded};

/// Where unreadable messages go, with the reason and where they came from.
pub trait DeadLetters: Send + Sync {
    fn dead_letter(
        &self,
        body: &str,
        reason: &str,
        source: &Source<'_>,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// Where a dead-lettered message came from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Source<'a> {
    /// The queue or stream ARN.
    pub arn: Option<&'a str>,
    /// The SQS message id or the stream record's sequence number.
    pub id: Option<&'a str>,
}

/// Dead letters kept in memory with their reasons, in arrival order: for unit tests of the
/// handlers that park unreadable input.
#[derive(Debug, Default)]
pub struct KeptDeadLetters(std::sync::Mutex<Vec<String>>);

impl KeptDeadLetters {
    pub fn reasons(&self) -> Vec<String> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl DeadLetters for KeptDeadLetters {
    async fn dead_letter(&self, _body: &str, reason: &str, _source: &Source<'_>) -> Result<(), String> {
        self.0.lock().map_err(|e| e.to_string())?.push(reason.to_owned());
        Ok(())
    }
}

/// For a consumer that has no DLQ to park in (the dead-letter handler is the end of the line):
/// a message it cannot handle stays on its queue.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDeadLetters;

impl DeadLetters for NoDeadLetters {
    async fn dead_letter(&self, _body: &str, _reason: &str, _source: &Source<'_>) -> Result<(), String> {
        Err("no dead-letter queue".to_owned())
    }
}

/// Why a message was not handled, and what becomes of it.
#[derive(Debug)]
pub struct Unhandled {
    reason: String,
    dead_letter: bool,
    span: Span,
}

impl Unhandled {
    /// Another delivery may succeed: reported as a batch item failure.
    pub fn retry(reason: impl Into<String>) -> Self {
        Self { reason: reason.into(), dead_letter: false, span: Span::none() }
    }

    /// It will never be handled (unreadable, invalid): dead-lettered with `reason`, then
    /// acknowledged.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Self { dead_letter: true, ..Self::retry(reason) }
    }

    /// Logged in `span` (the record's order, correlation and trace).
    pub fn in_span(self, span: Span) -> Self {
        Self { span, ..self }
    }
}

/// How a batch is worked through: `concurrency` records (or groups) at a time, until `deadline`,
/// unreadable ones to `dead_letters`.
pub struct Batch<'a, D> {
    pub dead_letters: &'a D,
    pub deadline: Deadline,
    pub concurrency: usize,
}

/// Each record its own group, for [`Batch::stream`].
pub fn one_by_one<T>(items: &[T]) -> Vec<Range<usize>> {
    (0..items.len()).map(|i| i..i + 1).collect()
}

const NOT_STARTED: &str = "not started before the invocation's deadline";
const CUT_OFF: &str = "cut off at the invocation's deadline";

impl<'a, D: DeadLetters> Batch<'a, D> {
    /// One record at a time.
    pub fn new(dead_letters: &'a D, deadline: Deadline) -> Self {
        Self { dead_letters, deadline, concurrency: 1 }
    }

    /// `n` records at a time.
    pub fn concurrently(self, n: usize) -> Self {
        Self { concurrency: n.max(1), ..self }
    }

    /// `work`, with the deadline as its [`current`](Deadline::current) one, unless the deadline
    /// has come (`Err(NOT_STARTED)`) or comes first (`Err(CUT_OFF)`).
    async fn until_deadline<T>(&self, work: impl Future<Output = T>) -> Result<T, &'static str> {
        if !self.deadline.allows(Duration::ZERO) {
            return Err(NOT_STARTED);
        }
        self.deadline.run(self.deadline.scope(work)).await.ok_or(CUT_OFF)
    }

    /// Handles every message of an SQS batch with `handle`; the response lists the messages to
    /// redeliver: those `handle` failed, those cut off or not started at the deadline, and those
    /// whose dead letter could not be sent.
    pub async fn sqs<'m, F, Fut>(&self, event: &'m SqsEvent, handle: F) -> SqsBatchResponse
    where
        F: Fn(&'m SqsMessage) -> Fut,
        Fut: Future<Output = Result<(), Unhandled>>,
    {
        let handle = &handle;
        let one = |message: &'m SqsMessage| async move {
            let id = message.message_id.as_deref().unwrap_or_default();
            let work = async {
                let unhandled = match handle(message).await {
                    Err(unhandled) if unhandled.dead_letter => unhandled,
                    other => return other,
                };
                let body = message.body.as_deref().unwrap_or_default();
                let source = Source { arn: message.event_source_arn.as_deref(), id: message.message_id.as_deref() };
                let parked = self.park(body, &unhandled.reason, &source).instrument(unhandled.span.clone()).await;
                let span = unhandled.span;
                parked.map_err(|reason| Unhandled::retry(reason).in_span(span))
            };
            let unhandled = match self.until_deadline(work).await {
                Ok(Ok(())) => return None,
                Ok(Err(unhandled)) => unhandled,
                Err(deadline) => Unhandled::retry(deadline),
            };
            let reason = &unhandled.reason;
            unhandled.span.in_scope(|| tracing::warn!(message_id = %id, %reason, "message left for redelivery"));
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = id.to_owned();
            Some(failure)
        };
        let mut response = SqsBatchResponse::default();
        // `buffered` polls the handlers in this task (so they see the current deadline), and
        // yields in batch order.
        let failures = stream::iter(&event.records).map(one).buffered(self.concurrency).filter_map(std::future::ready);
        response.batch_item_failures = failures.collect().await;
        response
    }

    /// Parks an unreadable record with its reason (kept short: a decoder's message may quote a
    /// field whole); `Err`: why it could not.
    async fn park(&self, body: &str, reason: &str, source: &Source<'_>) -> Result<(), String> {
        let reason = bounded(reason, MAX_REASON);
        let parked = self.dead_letters.dead_letter(body, &reason, source).await;
        parked.map_err(|e| format!("dead-lettering failed ({e}): {reason}"))?;
        tracing::error!(source = ?source.id, %reason, "unreadable record dead-lettered");
        Ok(())
    }

    /// Works through a DynamoDB stream batch: first every record is read, in stream order
    /// (`None`: nothing to do; `Err`: unreadable, dead-lettered with the reason, as it would
    /// otherwise hold back the shard); then `group` splits the records read into consecutive
    /// ranges ([`one_by_one`], or records that go in one call), and `work` does each group,
    /// [`concurrency`](Self::concurrency) groups at a time. `work` fails with the index, in its
    /// group, of the first record it did not finish, and why.
    ///
    /// The response names the first record in stream order that failed, was cut off or not
    /// started at the deadline, or could not be dead-lettered; everything before it is done, so
    /// the stream resumes there (work after it that finished is done again: consumers are
    /// idempotent). Nothing after it is started once it is known.
    pub async fn stream<'r, T, R, G, W, Fut>(
        &self,
        event: &'r Event,
        read: R,
        group: G,
        work: W,
    ) -> DynamoDbEventResponse
    where
        R: Fn(&'r EventRecord) -> Result<Option<T>, String>,
        G: FnOnce(&[T]) -> Vec<Range<usize>>,
        W: Fn(Vec<T>) -> Fut,
        Fut: Future<Output = Result<(), (usize, String)>>,
    {
        let (mut sequences, mut items, mut stopped) = (Vec::new(), Vec::new(), None);
        for record in &event.records {
            let sequence = record.change.sequence_number.as_deref();
            let reason = match read(record) {
                Ok(Some(item)) => {
                    sequences.push(sequence);
                    items.push(item);
                    continue;
                }
                Ok(None) => continue,
                Err(reason) => reason,
            };
            let body = serde_json::to_string(&record.change.new_image).unwrap_or_default();
            let source = Source { arn: record.event_source_arn.as_deref(), id: sequence };
            let parked = self.until_deadline(self.park(&body, &reason, &source)).await;
            if let Err(reason) = parked.map_err(str::to_owned).and_then(|parked| parked) {
                stopped = Some((sequence, reason));
                break;
            }
        }
        let ranges = group(&items);
        let mut items = items.into_iter();
        let groups: Vec<(usize, Vec<T>)> =
            ranges.into_iter().map(|range| (range.start, items.by_ref().take(range.len()).collect())).collect();
        let work = &work;
        // `buffered` yields in stream order; stopping drops (cancels) the work still in flight.
        let mut done = stream::iter(groups)
            .map(|(start, group)| async move {
                let result = self.until_deadline(work(group)).await;
                (start, result.unwrap_or_else(|deadline| Err((0, deadline.to_owned()))))
            })
            .buffered(self.concurrency);
        while let Some((start, result)) = done.next().await {
            if let Err((index, reason)) = result {
                stopped = Some((sequences.get(start + index).copied().flatten(), reason));
                break;
            }
        }
        let mut response = DynamoDbEventResponse::default();
        if let Some((sequence, reason)) = stopped {
            tracing::warn!(?sequence, %reason, "stopping: the stream resumes at this record");
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = sequence.map(str::to_owned);
            response.batch_item_failures.push(failure);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::json;

    use super::*;

    /// Dead letters as parked (`<source id>:<body>`, reason), or refused.
    #[derive(Default)]
    struct Parking(Option<&'static str>, Mutex<Vec<(String, String)>>);

    impl DeadLetters for Parking {
        async fn dead_letter(&self, body: &str, reason: &str, source: &Source<'_>) -> Result<(), String> {
            let at = format!("{}:{body}", source.id.unwrap_or_default());
            self.0.map_or(Ok(()), |refusal| Err(refusal.to_owned()))?;
            self.1.lock().expect("lock").push((at, reason.to_owned()));
            Ok(())
        }
    }

    /// Counts the records worked on at once (each takes 1 s) and records what was done.
    #[derive(Default)]
    struct Work {
        now: AtomicUsize,
        most: AtomicUsize,
        done: Mutex<Vec<u64>>,
    }

    impl Work {
        async fn take_a_second(&self, n: u64) {
            self.most.fetch_max(self.now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.done.lock().expect("lock").push(n);
        }
    }

    /// Messages `m1..=mn` with bodies `1..=n`.
    fn messages(n: usize) -> SqsEvent {
        let records: Vec<_> = (1..=n).map(|i| json!({ "messageId": format!("m{i}"), "body": i.to_string() })).collect();
        serde_json::from_value(json!({ "Records": records })).expect("an SQS event")
    }

    fn body(message: &SqsMessage) -> u64 {
        message.body.as_deref().and_then(|b| b.parse().ok()).expect("a number")
    }

    fn failed(response: &SqsBatchResponse) -> Vec<&str> {
        response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_sqs_batch_is_worked_concurrently_with_a_result_per_message() {
        // Given a handler that takes 1 s, fails m3 retryably and finds m5 unreadable
        let (dead_letters, work) = (Parking::default(), Work::default());
        let handle = |message: &SqsMessage| {
            let (work, n) = (&work, body(message));
            async move {
                work.take_a_second(n).await;
                match n {
                    3 => Err(Unhandled::retry("store busy")),
                    5 => Err(Unhandled::dead_letter("x".repeat(5_000))),
                    _ => Ok(()),
                }
            }
        };

        // When 9 messages are handled 4 at a time
        let began = tokio::time::Instant::now();
        let response = Batch::new(&dead_letters, Deadline::never()).concurrently(4).sqs(&messages(9), handle).await;

        // Then they ran 4 at a time (3 rounds, not 9), only m3 is redelivered, and m5 is parked
        // (and acknowledged) with a bounded reason
        assert_eq!((work.most.load(Ordering::SeqCst), began.elapsed()), (4, Duration::from_secs(3)));
        assert_eq!(failed(&response), ["m3"]);
        let parked = dead_letters.1.lock().expect("lock").clone();
        assert_eq!(parked.len(), 1);
        assert_eq!(parked[0].0, "m5:5");
        assert!(parked[0].1.starts_with("xxx") && parked[0].1.len() <= MAX_REASON, "{} bytes", parked[0].1.len());

        // And an unreadable message whose dead letter cannot be sent stays on its queue
        let refusing = Parking(Some("SQS unavailable"), Mutex::default());
        let handle = |message: &SqsMessage| {
            let unreadable = body(message) == 2;
            async move { if unreadable { Err(Unhandled::dead_letter("not a command")) } else { Ok(()) } }
        };
        assert_eq!(failed(&Batch::new(&refusing, Deadline::never()).sqs(&messages(3), handle).await), ["m2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_deadline_unfinished_and_unstarted_messages_are_left_for_redelivery() {
        // Given a handler that takes 1 s and records the deadline it sees, and 1.5 s left
        let (dead_letters, seen) = (Parking::default(), Mutex::new(Vec::new()));
        let handle = |_: &SqsMessage| {
            let seen = &seen;
            async move {
                seen.lock().expect("lock").push(Deadline::current().remaining());
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
        };
        let deadline = Deadline::after(Duration::from_millis(1_500));

        // When 9 messages are handled 4 at a time
        let began = tokio::time::Instant::now();
        let response = Batch::new(&dead_letters, deadline).concurrently(4).sqs(&messages(9), handle).await;

        // Then the invocation answers at its deadline, not after the 3 s the batch needs, and the
        // messages cut off (m5-m8) or never started (m9) stay on the queue
        assert_eq!(began.elapsed(), Duration::from_millis(1_500));
        assert_eq!(failed(&response), ["m5", "m6", "m7", "m8", "m9"]);
        // and each message's work saw the time left to the invocation's deadline
        let left: Vec<_> = [1_500, 1_500, 1_500, 1_500, 500, 500, 500, 500].map(Duration::from_millis).map(Some).into();
        assert_eq!(*seen.lock().expect("lock"), left);
    }

    /// Stream records `1..=n` (sequence numbers and images): `INSERT`s, except the `modified`.
    fn records(n: u64, modified: &[u64]) -> Event {
        let mut event = Event::default();
        event.records = (1..=n)
            .map(|i| {
                let mut record = EventRecord::default();
                record.event_name = if modified.contains(&i) { "MODIFY" } else { "INSERT" }.into();
                record.change.sequence_number = Some(i.to_string());
                record.change.new_image = serde_dynamo::to_item(json!({ "n": i })).expect("an item");
                record
            })
            .collect();
        event
    }

    /// The record's `n`, `None` for a `MODIFY`, unreadable if it is `unreadable`.
    fn read(unreadable: u64) -> impl Fn(&EventRecord) -> Result<Option<u64>, String> {
        move |record| {
            let n = serde_dynamo::from_attribute_value(record.change.new_image["n"].clone()).expect("n");
            match record.event_name.as_str() {
                _ if n == unreadable => Err(format!("record {n} is unreadable")),
                "INSERT" => Ok(Some(n)),
                _ => Ok(None),
            }
        }
    }

    fn resumes_at(response: &DynamoDbEventResponse) -> Vec<Option<String>> {
        response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_batch_is_worked_concurrently_and_resumes_at_its_first_failure() {
        // Given work that takes 1 s per record and fails records 7 and 4, and a batch where
        // record 2 is a MODIFY and record 3 unreadable
        let (dead_letters, work) = (Parking::default(), Work::default());
        let each = |ns: Vec<u64>| {
            let work = &work;
            async move {
                work.take_a_second(ns[0]).await;
                if ns[0] == 4 || ns[0] == 7 { Err((0, "throttled".to_owned())) } else { Ok(()) }
            }
        };

        // When 10 records are worked 3 at a time
        let batch = Batch::new(&dead_letters, Deadline::never()).concurrently(3);
        let response = batch.stream(&records(10, &[2]), read(3), one_by_one, each).await;

        // Then the stream resumes at record 4, record 1 done, 2 skipped and 3 parked
        assert_eq!(resumes_at(&response), [Some("4".to_owned())]);
        assert_eq!(work.most.load(Ordering::SeqCst), 3);
        assert!(work.done.lock().expect("lock").contains(&1));
        let parked = dead_letters.1.lock().expect("lock").clone();
        assert_eq!(parked, [("3:{\"n\":{\"N\":\"3\"}}".to_owned(), "record 3 is unreadable".to_owned())]);

        // And an unreadable record whose dead letter cannot be sent holds the stream there, once
        // the records before it (which the stream will not deliver again) are done
        let (refusing, work) = (Parking(Some("SQS unavailable"), Mutex::default()), Work::default());
        let each = |ns: Vec<u64>| {
            let work = &work;
            async move {
                work.take_a_second(ns[0]).await;
                Ok(())
            }
        };
        let response =
            Batch::new(&refusing, Deadline::never()).stream(&records(6, &[]), read(4), one_by_one, each).await;
        assert_eq!(resumes_at(&response), [Some("4".to_owned())]);
        assert_eq!(*work.done.lock().expect("lock"), [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn groups_resume_at_their_first_unfinished_record_and_stop_at_the_deadline() {
        // Given groups of 4 that take 1 s, the one from record 5 finishing only its first half
        let dead_letters = Parking::default();
        let fours = |ns: &[u64]| (0..ns.len()).step_by(4).map(|s| s..(s + 4).min(ns.len())).collect();
        let work = |ns: Vec<u64>| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if ns[0] == 5 { Err((2, "half done".to_owned())) } else { Ok(()) }
        };

        // When 12 records are worked a group at a time, without deadline and with 1.5 s
        let batch = Batch::new(&dead_letters, Deadline::never());
        let response = batch.stream(&records(12, &[]), read(0), fours, work).await;
        let batch = Batch::new(&dead_letters, Deadline::after(Duration::from_millis(1_500)));
        let cut_off = batch.stream(&records(12, &[]), read(0), fours, work).await;

        // Then the first resumes at record 7, the second at the group it had no time for
        assert_eq!(resumes_at(&response), [Some("7".to_owned())]);
        assert_eq!(resumes_at(&cut_off), [Some("5".to_owned())]);
    }
}
