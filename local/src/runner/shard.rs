//! Reading one shard of a DynamoDB stream: records converted to Lambda's, filtered and
//! delivered in order in batches of up to `BatchSize` (with `ParallelizationFactor` N, up to N
//! batches at once, one per lane of partition keys), retried with backoff, skipped after
//! `MaximumRetryAttempts` and recorded at the `OnFailure` queue.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::dynamodb::EventRecord;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use tokio::sync::watch;
use tracing::{debug, error, warn};

use super::checkpoints::Checkpoints;
use super::events::{SkippedBatch, stream_event, stream_filter_view, stream_record};
use super::plumbing::{Stop, backoff, error_text, invoke, queue_url, sdk_error};
use super::stream::StreamMapping;

/// The pause after an empty `GetRecords`.
const STREAM_POLL: Duration = Duration::from_millis(250);
const GET_RECORDS_LIMIT: i32 = 1000;

/// Reads one shard to its end (or until stopped), delivering in order.
pub(super) struct ShardReader {
    m: Arc<StreamMapping>,
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
    /// A reader of `shard_id` that starts after `start`'s sequence number if it has one (a
    /// checkpoint), else at `start`'s position.
    pub(super) fn new(
        m: Arc<StreamMapping>,
        shard_id: String,
        (position, last_sequence): (ShardIteratorType, Option<String>),
        checkpoints: Arc<Checkpoints>,
        partition_key: Option<String>,
    ) -> Self {
        let name = m.source.name();
        Self {
            m,
            shard_id,
            name,
            position,
            iterator: None,
            last_sequence,
            closed: false,
            caught_up: false,
            pending: VecDeque::new(),
            attempts: 0,
            checkpoints,
            partition_key,
        }
    }

    /// Records `sequence` as handled, with everything before it.
    fn checkpoint(&self, sequence: &str) {
        self.checkpoints.set(&self.name, &self.m.stream_arn, &self.shard_id, sequence);
    }

    /// Waits for the parent shard to be read to its end, then reads this one; `done` is told
    /// once it is.
    pub(super) async fn run(
        mut self,
        parent: Option<watch::Receiver<bool>>,
        done: watch::Sender<bool>,
        mut stop: Stop,
    ) {
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

    /// One `GetRecords` (with a new iterator first, if need be): its records converted and
    /// filtered into `pending`.
    async fn fetch(&mut self) -> Result<(), String> {
        let client = &self.m.clients.streams;
        let iterator = match self.iterator.clone() {
            Some(iterator) => iterator,
            None => {
                let request = client.get_shard_iterator().stream_arn(&self.m.stream_arn).shard_id(&self.shard_id);
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
                        return Err(error_text(e));
                    }
                    Err(e) if e.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
                        warn!(mapping = %self.name, shard = %self.shard_id, "the shard is gone: stopped reading it");
                        self.closed = true;
                        return Ok(());
                    }
                    Err(e) => return Err(error_text(e)),
                }
            }
        };
        let read = client.get_records().shard_iterator(&iterator).limit(GET_RECORDS_LIMIT).send().await;
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
                return Err(error_text(e));
            }
        };
        self.iterator = out.next_shard_iterator;
        self.closed = self.iterator.is_none();
        let records = out.records.unwrap_or_default();
        self.caught_up = records.is_empty();
        let filters = &self.m.source.filters;
        for record in records {
            let converted = stream_record(record, &self.m.stream_arn, &self.m.source.region);
            self.last_sequence = converted.change.sequence_number.clone();
            if filters.is_empty() || filters.matches(&stream_filter_view(&converted)) {
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
        let event = stream_event(records);
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

    /// Records a skipped batch at `DestinationConfig.OnFailure`, in Lambda's format (the
    /// batch's position, not its records).
    async fn send_failure_record(&self, skipped: &[String], arrivals: &[String]) {
        let Some(destination) = &self.m.on_failure else { return };
        let record = SkippedBatch {
            function_arn: &self.m.function_arn,
            stream_arn: &self.m.stream_arn,
            shard_id: &self.shard_id,
            attempts: self.attempts,
            sequences: skipped,
            arrivals,
        }
        .failure_record();
        let sqs = &self.m.clients.sqs;
        let url = match queue_url(sqs, &destination.queue_name, &destination.account).await {
            Ok(url) => url,
            Err(error) => {
                error!(mapping = %self.name, destination = %destination.arn, error, "OnFailure queue not found");
                return;
            }
        };
        if let Err(e) = sqs.send_message().queue_url(url).message_body(record.to_string()).send().await {
            let error = error_text(e);
            error!(mapping = %self.name, destination = %destination.arn, error, "sending to OnFailure failed");
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
    use std::collections::{HashMap, HashSet};

    use aws_lambda_events::event::streams::DynamoDbBatchItemFailure;

    use super::*;

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
}
