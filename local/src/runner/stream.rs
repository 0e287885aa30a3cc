//! DynamoDB stream event source mappings: the stream's shards, discovered with `DescribeStream`
//! (and again every few seconds), each read by a [`ShardReader`] once its parent is read to the
//! end, so that per key the order holds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodbstreams::types::{Shard, ShardIteratorType};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::debug;

use super::checkpoints::Checkpoints;
use super::plumbing::{Stop, backoff, ended, error_text, sdk_error};
use super::properties::{Arn, StreamProperties};
use super::shard::ShardReader;
use super::{Invoke, RunnerClients, Source};
use crate::Stack;

/// How often a DynamoDB stream is described again, to find new shards.
const SHARD_DISCOVERY: Duration = Duration::from_secs(3);

pub(super) struct StreamMapping {
    pub(super) source: Source,
    pub(super) stream_arn: String,
    starting_position: ShardIteratorType,
    pub(super) max_retry_attempts: i64,
    /// `ParallelizationFactor`: batches of one shard in flight at once, records split by
    /// partition key so that each key's records stay in order.
    pub(super) parallelization_factor: usize,
    /// `DestinationConfig.OnFailure` when it is an SQS queue: where a skipped batch is recorded.
    pub(super) on_failure: Option<Destination>,
    pub(super) function_arn: String,
    pub(super) functions: Arc<dyn Invoke>,
    pub(super) clients: RunnerClients,
}

pub(super) struct Destination {
    pub(super) arn: String,
    pub(super) queue_name: String,
    pub(super) account: String,
}

impl StreamMapping {
    /// From the event's properties; the records' region is the streams client's, else the
    /// stream's. What is not run as configured (an `OnFailure` destination that is not a queue)
    /// is noted in `notes`.
    pub(super) fn new(
        stack: &Stack,
        (function, event): (&str, &str),
        p: StreamProperties,
        clients: RunnerClients,
        functions: Arc<dyn Invoke>,
        notes: &mut Vec<String>,
    ) -> anyhow::Result<Self> {
        let arn = Arn::parse(&p.stream, "dynamodb")?;
        let region = clients.streams.config().region().map(ToString::to_string);
        if !arn.resource.contains("/stream/") {
            anyhow::bail!("{} is not a stream ARN", p.stream);
        }
        let on_failure = p.on_failure().and_then(|destination| match Arn::parse(destination, "sqs") {
            Ok(queue) => {
                Some(Destination { arn: destination.to_owned(), queue_name: queue.resource, account: queue.account })
            }
            Err(_) => {
                notes.push(format!(
                    "{function}.{event} (DynamoDB): DestinationConfig.OnFailure {destination:?} is not an SQS queue: \
                     skipped batches are only logged"
                ));
                None
            }
        });
        let function_arn = stack
            .resources
            .get(function)
            .and_then(|r| r.attributes.get("Arn"))
            .cloned()
            .unwrap_or_else(|| format!("arn:aws:lambda:{}:{}:function:{function}", arn.region, arn.account));
        Ok(Self {
            source: Source::new(function, event, &p.common, 100, region.unwrap_or(arn.region))?,
            starting_position: p.starting_position.into(),
            max_retry_attempts: p.max_retry_attempts(),
            parallelization_factor: p.parallelization_factor()?,
            on_failure,
            function_arn,
            stream_arn: p.stream,
            functions,
            clients,
        })
    }

    pub(super) fn describe(&self) -> String {
        format!(
            "{}: DynamoDB {} -> {} ({}, MaximumRetryAttempts {}, ParallelizationFactor {}, {}{})",
            self.source.name(),
            self.stream_arn,
            self.source.function,
            self.starting_position.as_str(),
            self.max_retry_attempts,
            self.parallelization_factor,
            self.source.options(),
            self.on_failure.as_ref().map(|d| format!(", OnFailure {}", d.arn)).unwrap_or_default()
        )
    }
}

pub(super) async fn run(m: Arc<StreamMapping>, checkpoints: Arc<Checkpoints>, mut stop: Stop) {
    let name = m.source.name();
    // A mapping that read this stream before starts its new shards at their beginning.
    let mut initial = !checkpoints.knows(&name, &m.stream_arn);
    // Shard id -> "read to the end", for the children to wait on.
    let mut known: HashMap<String, watch::Receiver<bool>> = HashMap::new();
    let mut shards = JoinSet::new();
    let mut failures = 0;
    loop {
        match stop.run(list_shards(&m.clients.streams, &m.stream_arn)).await {
            None => break,
            Some(Ok((listed, partition_key))) => {
                failures = 0;
                let position = if initial { m.starting_position.clone() } else { ShardIteratorType::TrimHorizon };
                for shard in parents_first(listed, &known) {
                    let id = shard.shard_id.unwrap_or_default();
                    let parent = shard.parent_shard_id.as_ref().and_then(|p| known.get(p)).cloned();
                    let (done_tx, done_rx) = watch::channel(false);
                    known.insert(id.clone(), done_rx);
                    debug!(mapping = %name, shard = %id, position = position.as_str(), "reading a new shard");
                    let last_sequence = checkpoints.get(&name, &m.stream_arn, &id);
                    let start = (position.clone(), last_sequence);
                    let reader = ShardReader::new(m.clone(), id, start, checkpoints.clone(), partition_key.clone());
                    shards.spawn(reader.run(parent, done_tx, stop.clone()));
                }
                initial = false;
            }
            Some(Err(e)) => {
                failures += 1;
                sdk_error(&name, "DescribeStream", failures, &e);
            }
        }
        while let Some(result) = shards.try_join_next() {
            ended(&name, "a shard reader", result);
        }
        let pause = if failures == 0 { SHARD_DISCOVERY } else { backoff(failures) };
        if stop.sleep(pause).await {
            break;
        }
    }
    while let Some(result) = shards.join_next().await {
        ended(&name, "a shard reader", result);
    }
}

/// The shards listed that are not `known` yet, each after its parent (when that is listed too),
/// so that each child can wait for its parent.
fn parents_first(listed: Vec<Shard>, known: &HashMap<String, watch::Receiver<bool>>) -> Vec<Shard> {
    let ids: HashSet<String> = listed.iter().filter_map(|s| s.shard_id.clone()).collect();
    let mut placed: HashSet<String> = known.keys().cloned().collect();
    let mut remaining: Vec<Shard> =
        listed.into_iter().filter(|s| s.shard_id.as_ref().is_some_and(|id| !placed.contains(id))).collect();
    let mut ordered = Vec::new();
    while !remaining.is_empty() {
        let (ready, rest): (Vec<_>, Vec<_>) = remaining
            .into_iter()
            .partition(|s| s.parent_shard_id.as_ref().is_none_or(|p| !ids.contains(p) || placed.contains(p)));
        // No progress (a parent loop, which DynamoDB never reports): take them all.
        let ready = if ready.is_empty() {
            remaining = Vec::new();
            rest
        } else {
            remaining = rest;
            ready
        };
        placed.extend(ready.iter().filter_map(|s| s.shard_id.clone()));
        ordered.extend(ready);
    }
    ordered
}

/// The stream's shards, and the name of its table's partition key (the key Lambda splits a
/// shard's records by under `ParallelizationFactor`).
async fn list_shards(
    client: &aws_sdk_dynamodbstreams::Client,
    stream_arn: &str,
) -> Result<(Vec<Shard>, Option<String>), String> {
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
            .map_err(error_text)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>) -> Shard {
        Shard::builder().shard_id(id).set_parent_shard_id(parent.map(str::to_owned)).build()
    }

    fn ids(shards: &[Shard]) -> Vec<&str> {
        shards.iter().filter_map(|s| s.shard_id.as_deref()).collect()
    }

    #[test]
    fn new_shards_start_after_their_parents() {
        // Given a stream whose shards are listed children first, one of them already read
        let listed = vec![shard("c2", Some("c1")), shard("c1", Some("p")), shard("p", None), shard("old", None)];
        let (_tx, rx) = watch::channel(false);
        let known = HashMap::from([("old".to_owned(), rx)]);

        // When the new ones are ordered
        let ordered = parents_first(listed, &known);

        // Then each comes after its parent, and the known one is left out
        assert_eq!(ids(&ordered), ["p", "c1", "c2"]);
        // A parent no longer listed (trimmed) holds nothing back; a loop is taken as it is.
        let orphan = parents_first(vec![shard("c", Some("gone"))], &HashMap::new());
        assert_eq!(ids(&orphan), ["c"]);
        let looped = parents_first(vec![shard("a", Some("b")), shard("b", Some("a"))], &HashMap::new());
        assert_eq!(ids(&looped).len(), 2);
    }
}
