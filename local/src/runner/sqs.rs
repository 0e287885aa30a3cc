//! SQS event source mappings: pollers that long-poll a queue, scale with its backlog up to
//! `ScalingConfig.MaximumConcurrency`, invoke with batches and delete what was handled.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsMessage};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::events::{receipts, sqs_event, sqs_filter_view, sqs_record};
use super::plumbing::{Stop, backoff, ended, error_text, invoke, queue_url, sdk_error};
use super::properties::{Arn, SqsProperties};
use super::{Invoke, Source};

/// How long a receive waits for a message: SQS's longest long poll, as Lambda's pollers use.
/// An idle queue costs one request per poller every 20 s; a message sent, or one whose
/// visibility timeout ends, answers a waiting poll at once (LocalStack included).
const LONG_POLL_SECONDS: i32 = 20;

pub(super) struct SqsMapping {
    source: Source,
    queue_arn: String,
    queue_name: String,
    account: String,
    window: Duration,
    concurrency: usize,
    functions: Arc<dyn Invoke>,
    client: aws_sdk_sqs::Client,
}

impl SqsMapping {
    /// From the event's properties; the records' region is the client's, else the queue's.
    pub(super) fn new(
        (function, event): (&str, &str),
        p: SqsProperties,
        client: aws_sdk_sqs::Client,
        functions: Arc<dyn Invoke>,
    ) -> anyhow::Result<Self> {
        let arn = Arn::parse(&p.queue, "sqs")?;
        let region = client.config().region().map(ToString::to_string);
        Ok(Self {
            source: Source::new(function, event, &p.common, 10, region.unwrap_or(arn.region))?,
            window: p.window(),
            concurrency: p.concurrency(),
            queue_arn: p.queue,
            queue_name: arn.resource,
            account: arn.account,
            functions,
            client,
        })
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{}: SQS {} -> {} (MaximumConcurrency {}, MaximumBatchingWindowInSeconds {}, {})",
            self.source.name(),
            self.queue_arn,
            self.source.function,
            self.concurrency,
            self.window.as_secs(),
            self.source.options()
        )
    }
}

pub(super) async fn run(m: Arc<SqsMapping>, mut stop: Stop) {
    let (name, client) = (m.source.name(), &m.client);
    let mut attempt = 0;
    let url = loop {
        match stop.run(queue_url(client, &m.queue_name, &m.account)).await {
            None => return,
            Some(Ok(url)) => break url,
            Some(Err(e)) => sdk_error(&name, "GetQueueUrl", attempt + 1, &e),
        }
        attempt += 1;
        if stop.sleep(backoff(attempt)).await {
            return;
        }
    };
    info!(mapping = %name, %url, max_pollers = m.concurrency, "polling the queue");
    // One long-polling poller while the queue is idle; each poll that finds messages asks for
    // another, up to MaximumConcurrency; an extra poller leaves once a poll comes back empty.
    let (grow, mut wants_more) = mpsc::channel::<()>(1);
    let poller = |extra| Poller { m: m.clone(), url: url.clone(), grow: grow.clone(), extra };
    let mut pollers = JoinSet::new();
    pollers.spawn(poller(false).run(stop.clone()));
    loop {
        tokio::select! {
            Some(()) = wants_more.recv() => {
                if pollers.len() < m.concurrency {
                    debug!(mapping = %name, pollers = pollers.len() + 1, "backlog: one more poller");
                    pollers.spawn(poller(true).run(stop.clone()));
                }
            }
            finished = pollers.join_next() => match finished {
                None => break,
                Some(result) => ended(&name, "an SQS poller", result),
            },
        }
    }
}

/// One poller of a queue.
struct Poller {
    m: Arc<SqsMapping>,
    url: String,
    /// Asks for one more poller.
    grow: mpsc::Sender<()>,
    /// An extra poller, which leaves once a poll comes back empty.
    extra: bool,
}

impl Poller {
    async fn run(self, mut stop: Stop) {
        let name = self.m.source.name();
        let mut failures = 0;
        while !stop.is_set() {
            let messages = match stop.run(self.receive()).await {
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
                if self.extra {
                    break;
                }
                continue;
            }
            // Full or not, messages mean a backlog may be building: ask for a poller (a no-op at
            // the limit, or while an earlier request is pending).
            let _ = self.grow.try_send(());
            self.process(messages).await;
        }
    }

    /// One batch: up to `BatchSize` messages. The first receive long-polls; once a message is
    /// in, the batch gathers for `MaximumBatchingWindowInSeconds` when it is set. Empty when a
    /// long poll found nothing.
    async fn receive(&self) -> Result<Vec<aws_sdk_sqs::types::Message>, String> {
        let batch_size = self.m.source.batch_size;
        let mut batch = Vec::new();
        let mut window_ends: Option<Instant> = None;
        loop {
            let wanted = (batch_size - batch.len()).min(10) as i32;
            let wait = match window_ends {
                None => LONG_POLL_SECONDS,
                Some(ends) => ends.saturating_duration_since(Instant::now()).as_secs().min(20) as i32,
            };
            let received = self
                .m
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(wanted)
                .wait_time_seconds(wait)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await;
            match received {
                Ok(out) => batch.extend(out.messages.unwrap_or_default()),
                Err(e) if batch.is_empty() => return Err(error_text(e)),
                Err(e) => {
                    let error = error_text(e);
                    warn!(mapping = %self.m.source.name(), error, "ReceiveMessage failed; invoking with what was received");
                    return Ok(batch);
                }
            }
            if batch.is_empty() || batch.len() >= batch_size {
                return Ok(batch);
            }
            let ends = *window_ends.get_or_insert_with(|| Instant::now() + self.m.window);
            if Instant::now() >= ends {
                return Ok(batch);
            }
        }
    }

    /// Invokes with the messages that match the filters and deletes what was handled; the
    /// others are deleted unseen, as Lambda does.
    async fn process(&self, messages: Vec<aws_sdk_sqs::types::Message>) {
        let (m, name) = (&self.m, self.m.source.name());
        let records = messages.into_iter().map(|msg| sqs_record(msg, &m.queue_arn, &m.source.region));
        let (records, filtered_out): (Vec<SqsMessage>, Vec<SqsMessage>) =
            records.partition(|r| m.source.filters.is_empty() || m.source.filters.matches(&sqs_filter_view(r)));
        if !filtered_out.is_empty() {
            debug!(mapping = %name, count = filtered_out.len(), "deleting messages that match no filter");
            self.delete(&receipts(&filtered_out)).await;
        }
        if records.is_empty() {
            return;
        }
        let handles = receipts(&records);
        let count = handles.len();
        let response = invoke::<SqsBatchResponse>(m.functions.as_ref(), &m.source.function, &sqs_event(records)).await;
        let retained: HashSet<String> = match response {
            Err(e) => {
                warn!(mapping = %name, count, error = %e, "function error: the batch returns to the queue");
                return;
            }
            Ok(response) if m.source.report_batch_item_failures => {
                let ids: HashSet<&str> = handles.iter().map(|(id, _)| id.as_str()).collect();
                let failed: HashSet<String> =
                    response.batch_item_failures.into_iter().map(|f| f.item_identifier).collect();
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
        self.delete(&done).await;
    }

    /// Deletes (messageId, receiptHandle) pairs, ten at a time, trying each request three times.
    async fn delete(&self, messages: &[(String, String)]) {
        use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
        let mapping = self.m.source.name();
        for chunk in messages.chunks(10) {
            let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, (_, receipt))| {
                    DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(receipt).build().ok()
                })
                .collect();
            for attempt in 1..=3 {
                let request =
                    self.m.client.delete_message_batch().queue_url(&self.url).set_entries(Some(entries.clone()));
                match request.send().await {
                    Ok(out) => {
                        for failed in out.failed() {
                            let message_id = failed.id().parse::<usize>().ok().and_then(|i| chunk.get(i)).map(|m| &m.0);
                            warn!(
                                mapping,
                                ?message_id,
                                code = failed.code(),
                                "delete failed: the message will come back"
                            );
                        }
                        break;
                    }
                    Err(e) => {
                        warn!(mapping, attempt, error = error_text(e), "DeleteMessageBatch failed");
                        if attempt < 3 {
                            tokio::time::sleep(backoff(attempt)).await;
                        }
                    }
                }
            }
        }
    }
}
