//! An event source mapping's SAM properties (a function's `Events` entry of type `SQS` or
//! `DynamoDB`, resolved by the provisioner), read through serde.
//!
//! Numbers and booleans are accepted as JSON values or as strings (`!Ref` to a parameter
//! resolves to a string). Properties the runner does not model (`BisectBatchOnFunctionError`,
//! `MaximumRecordAgeInSeconds`, `TumblingWindowInSeconds`…) are ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use serde::Deserialize;
use serde::de::{Deserializer, Error as _};
use serde_json::Value;

/// A function's properties, as far as its event sources are concerned.
#[derive(Debug, Default, Deserialize)]
pub struct FunctionEvents {
    /// `Events`, by name.
    #[serde(rename = "Events", default)]
    pub events: BTreeMap<String, EventSource>,
}

/// One entry of `Events`: its `Type` and its `Properties`, read once the type is known.
#[derive(Debug, Deserialize)]
pub struct EventSource {
    #[serde(rename = "Type")]
    pub kind: Option<String>,
    #[serde(rename = "Properties", default)]
    pub properties: Value,
}

impl EventSource {
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("(no Type)")
    }

    /// `Enabled` (default true), read on its own: a disabled event is skipped whatever else it
    /// says.
    pub fn enabled(&self) -> Result<bool, serde_json::Error> {
        #[derive(Deserialize)]
        struct Toggle {
            #[serde(rename = "Enabled", default, deserialize_with = "boolean")]
            enabled: Option<bool>,
        }
        Ok(Toggle::deserialize(&self.properties)?.enabled != Some(false))
    }

    /// The properties as `T` ([`SqsProperties`], [`StreamProperties`]).
    pub fn read<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.properties)
    }
}

/// What SQS and DynamoDB sources have in common.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CommonProperties {
    #[serde(default, deserialize_with = "integer")]
    pub batch_size: Option<i64>,
    /// `FunctionResponseTypes` names `ReportBatchItemFailures`.
    #[serde(rename = "FunctionResponseTypes", default, deserialize_with = "reports_batch_item_failures")]
    pub report_batch_item_failures: bool,
    /// `{"Filters": [{"Pattern": ".."}]}`, compiled by [`crate::filter::Filters::from_criteria`].
    #[serde(default)]
    pub filter_criteria: Option<Value>,
}

impl CommonProperties {
    /// `BatchSize`, or the source type's default; 1 to 10000.
    pub fn batch_size(&self, default: i64) -> anyhow::Result<usize> {
        let size = self.batch_size.unwrap_or(default);
        if !(1..=10_000).contains(&size) {
            bail!("BatchSize {size} is out of range (1 to 10000)");
        }
        Ok(size as usize)
    }
}

/// The properties of an `SQS` event.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SqsProperties {
    /// The queue's ARN.
    pub queue: String,
    #[serde(flatten)]
    pub common: CommonProperties,
    #[serde(default, deserialize_with = "integer")]
    pub maximum_batching_window_in_seconds: Option<i64>,
    #[serde(default)]
    pub scaling_config: ScalingConfig,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScalingConfig {
    #[serde(default, deserialize_with = "integer")]
    pub maximum_concurrency: Option<i64>,
}

impl SqsProperties {
    /// `MaximumBatchingWindowInSeconds`, 0 to 300 s (default 0).
    pub fn window(&self) -> Duration {
        Duration::from_secs(self.maximum_batching_window_in_seconds.unwrap_or(0).clamp(0, 300) as u64)
    }

    /// `ScalingConfig.MaximumConcurrency`: pollers at most; at least (and by default) 2.
    pub fn concurrency(&self) -> usize {
        self.scaling_config.maximum_concurrency.unwrap_or(2).max(2) as usize
    }
}

/// The properties of a `DynamoDB` event.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct StreamProperties {
    /// The stream's ARN.
    pub stream: String,
    #[serde(flatten)]
    pub common: CommonProperties,
    pub starting_position: StartingPosition,
    #[serde(default, deserialize_with = "integer")]
    pub maximum_retry_attempts: Option<i64>,
    #[serde(default, deserialize_with = "integer")]
    pub parallelization_factor: Option<i64>,
    #[serde(default)]
    pub destination_config: DestinationConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StartingPosition {
    TrimHorizon,
    Latest,
}

impl From<StartingPosition> for ShardIteratorType {
    fn from(position: StartingPosition) -> Self {
        match position {
            StartingPosition::TrimHorizon => Self::TrimHorizon,
            StartingPosition::Latest => Self::Latest,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfig {
    #[serde(default)]
    pub on_failure: Option<OnFailure>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OnFailure {
    /// The destination's ARN.
    #[serde(default)]
    pub destination: Option<String>,
}

impl StreamProperties {
    /// `MaximumRetryAttempts`: -1 (the default) retries until the records expire.
    pub fn max_retry_attempts(&self) -> i64 {
        self.maximum_retry_attempts.unwrap_or(-1).max(-1)
    }

    /// `ParallelizationFactor`, 1 (the default) to 10.
    pub fn parallelization_factor(&self) -> anyhow::Result<usize> {
        let factor = self.parallelization_factor.unwrap_or(1);
        if !(1..=10).contains(&factor) {
            bail!("ParallelizationFactor {factor} (1 to 10)");
        }
        Ok(factor as usize)
    }

    /// `DestinationConfig.OnFailure.Destination`, when one is set.
    pub fn on_failure(&self) -> Option<&str> {
        self.destination_config.on_failure.as_ref()?.destination.as_deref()
    }
}

/// `arn:<partition>:<service>:<region>:<account>:<resource>`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arn {
    pub region: String,
    pub account: String,
    pub resource: String,
}

impl Arn {
    pub fn parse(arn: &str, service: &str) -> anyhow::Result<Self> {
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

/// An integer, or a string of one; absent or `null`: `None`.
fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            n.as_i64().map(Some).ok_or_else(|| D::Error::custom(format!("{n} is not an integer")))
        }
        Some(Value::String(s)) => {
            s.trim().parse().map(Some).map_err(|_| D::Error::custom(format!("{s:?} is not an integer")))
        }
        Some(other) => Err(D::Error::custom(format!("{other} is not an integer"))),
    }
}

/// A boolean, or `"true"` / `"false"` (any case); absent or `null`: `None`.
fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(other) => Err(D::Error::custom(format!("{other} is not a boolean"))),
    }
}

/// Whether `FunctionResponseTypes` (a list, or a single string) names `ReportBatchItemFailures`.
fn reports_batch_item_failures<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(match Option::<Value>::deserialize(deserializer)? {
        Some(Value::Array(items)) => items.iter().any(|t| t == "ReportBatchItemFailures"),
        Some(Value::String(s)) => s == "ReportBatchItemFailures",
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::Template;
    use crate::template::{Resolved, Resolver};

    /// A function's `Events` of `template.yaml`, resolved as the provisioner would, with every
    /// resource standing for itself (`!GetAtt Q.Arn` is an SQS ARN named `Q`, a `StreamArn` a
    /// stream of table `T`).
    fn events_of(function: &str) -> FunctionEvents {
        events_with(function, &HashMap::new())
    }

    /// The same, with parameter overrides (which resolve to strings, as `--parameter-overrides`
    /// gives them).
    fn events_with(function: &str, overrides: &HashMap<String, String>) -> FunctionEvents {
        let template = Template::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml")).expect("loads");
        let mut resolver =
            Resolver::new(&template, "order-saga", "us-east-1", "000000000000", overrides).expect("resolver");
        for id in template.resources.keys() {
            let attributes = BTreeMap::from([
                ("Arn".to_owned(), format!("arn:aws:sqs:us-east-1:000000000000:{id}")),
                ("StreamArn".to_owned(), format!("arn:aws:dynamodb:us-east-1:000000000000:table/{id}/stream/2024")),
            ]);
            resolver.resources.insert(id.clone(), Resolved { reference: id.clone(), attributes });
        }
        let resource = template.resources.get(function).expect("the function is in the template");
        let events = resolver.resolve(&resource.properties["Events"]).expect("its events resolve");
        FunctionEvents::deserialize(&json!({ "Events": events })).expect("its events read")
    }

    #[test]
    fn the_saga_starters_stream_mapping_reads_from_the_template() {
        // Given the saga starter's DynamoDB event of template.yaml
        let events = events_of("SagaStarterFunction");
        let (name, source) = events.events.iter().find(|(_, e)| e.kind() == "DynamoDB").expect("a DynamoDB event");

        // When its properties are read
        let stream: StreamProperties = source.read().expect("reads");

        // Then each one the runner models has the template's value
        assert!(source.enabled().expect("Enabled"), "{name}");
        assert_eq!(stream.stream, "arn:aws:dynamodb:us-east-1:000000000000:table/EventsTable/stream/2024");
        assert_eq!(stream.starting_position, StartingPosition::TrimHorizon);
        assert_eq!(stream.common.batch_size(100).expect("BatchSize"), 10);
        assert_eq!(stream.parallelization_factor().expect("ParallelizationFactor"), 4);
        assert_eq!(stream.max_retry_attempts(), 10);
        assert!(stream.common.report_batch_item_failures);
        let filters = crate::filter::Filters::from_criteria(stream.common.filter_criteria.as_ref()).expect("filters");
        assert_eq!(filters.len(), 1);
        assert_eq!(stream.on_failure(), Some("arn:aws:sqs:us-east-1:000000000000:SagaStarterDlq"));
    }

    #[test]
    fn a_step_queues_mapping_reads_its_concurrency_from_a_parameter() {
        // Given the reserve-inventory step's queue, whose MaximumConcurrency is
        // `!Ref StepMaximumConcurrency` (default 5), as deployed and with an override
        let read = |overrides: &[(&str, &str)]| {
            let overrides = overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
            let events = events_with("ReserveInventoryFunction", &overrides);
            // When its properties are read
            let source = events.events.get("Commands").expect("the Commands event");
            assert_eq!(source.kind(), "SQS");
            source.read::<SqsProperties>().expect("reads")
        };
        let deployed = read(&[]);
        let overridden = read(&[("StepMaximumConcurrency", "7")]);

        // Then the pollers follow the parameter, a number or a string
        assert_eq!(deployed.concurrency(), 5);
        assert_eq!(overridden.concurrency(), 7);
        assert_eq!(deployed.queue, "arn:aws:sqs:us-east-1:000000000000:ReserveInventoryQueue");
        assert_eq!(deployed.common.batch_size(10).expect("BatchSize"), 10);
        assert_eq!(deployed.window(), Duration::ZERO);
        assert!(deployed.common.report_batch_item_failures);
    }

    #[test]
    fn every_queue_mapping_of_the_template_reads() {
        // Given every SQS event of template.yaml
        let template = Template::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml")).expect("loads");
        let functions = template.resources.values().filter(|r| r.kind == "AWS::Serverless::Function");
        let mut read = 0;
        for function in functions {
            for (name, source) in events_of(&function.logical_id).events.iter().filter(|(_, e)| e.kind() == "SQS") {
                // When its properties are read
                let sqs: SqsProperties = source.read().unwrap_or_else(|e| panic!("{name}: {e}"));

                // Then the queue is an SQS ARN, the batch a valid size, and the pollers at least 2
                Arn::parse(&sqs.queue, "sqs").unwrap_or_else(|e| panic!("{name}: {e}"));
                assert!((1..=10).contains(&sqs.common.batch_size(10).expect("BatchSize")), "{name}");
                assert!(sqs.concurrency() >= 2, "{name}");
                assert!(sqs.common.report_batch_item_failures, "{name}: every queue reports batch item failures");
                read += 1;
            }
        }
        assert!(read >= 10, "the template's queues were read: {read}");
    }

    #[test]
    fn numbers_and_booleans_may_be_strings_and_defaults_apply() {
        // Given SQS properties as a resolved `!Ref` leaves them: numbers as strings
        let source = EventSource {
            kind: Some("SQS".into()),
            properties: json!({
                "Queue": "arn:aws:sqs:us-east-1:000000000000:work",
                "BatchSize": " 5 ",
                "MaximumBatchingWindowInSeconds": "900",
                "ScalingConfig": { "MaximumConcurrency": "1" },
                "FunctionResponseTypes": "ReportBatchItemFailures",
                "Enabled": "FALSE",
            }),
        };

        // When they are read
        let sqs: SqsProperties = source.read().expect("reads");

        // Then the strings are numbers, and out-of-range values are clamped as Lambda does
        assert_eq!(sqs.common.batch_size(10).expect("BatchSize"), 5);
        assert_eq!(sqs.window(), Duration::from_secs(300));
        assert_eq!(sqs.concurrency(), 2);
        assert!(sqs.common.report_batch_item_failures);
        assert!(!source.enabled().expect("Enabled"));

        // And without them, the defaults
        let bare: SqsProperties = serde_json::from_value(json!({ "Queue": "arn:aws:sqs:r:1:q" })).expect("reads");
        assert_eq!(bare.common.batch_size(10).expect("BatchSize"), 10);
        assert_eq!((bare.window(), bare.concurrency()), (Duration::ZERO, 2));
        assert!(!bare.common.report_batch_item_failures);
        assert!(bare.common.filter_criteria.is_none());
    }

    #[test]
    fn invalid_properties_are_refused() {
        // Given stream properties, each with one mistake, when they are read and checked
        let stream = |extra: Value| {
            let mut p = json!({ "Stream": "arn:aws:dynamodb:r:1:table/t/stream/s", "StartingPosition": "LATEST" });
            p.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
            serde_json::from_value::<StreamProperties>(p)
        };
        let message = |extra: Value| stream(extra).expect_err("refused").to_string();

        // Then each is refused, saying why
        assert!(message(json!({ "StartingPosition": "AT_TIMESTAMP" })).contains("AT_TIMESTAMP"));
        assert!(message(json!({ "BatchSize": "x" })).contains("\"x\" is not an integer"));
        assert!(message(json!({ "BatchSize": 2.5 })).contains("2.5 is not an integer"));
        let missing = serde_json::from_value::<StreamProperties>(json!({ "StartingPosition": "LATEST" }));
        assert!(missing.expect_err("refused").to_string().contains("Stream"));
        let out_of_range = stream(json!({ "BatchSize": 0, "ParallelizationFactor": 11 })).expect("reads");
        assert!(out_of_range.common.batch_size(100).is_err());
        assert!(out_of_range.parallelization_factor().is_err());
        let enabled = EventSource { kind: None, properties: json!({ "Enabled": "sometimes" }) };
        assert!(enabled.enabled().is_err());
        assert_eq!(enabled.kind(), "(no Type)");

        // And the defaults hold where nothing is said
        let bare = stream(json!({})).expect("reads");
        assert_eq!((bare.max_retry_attempts(), bare.on_failure()), (-1, None));
        assert_eq!(bare.parallelization_factor().expect("factor"), 1);
        assert_eq!(ShardIteratorType::from(bare.starting_position), ShardIteratorType::Latest);
        let retries = stream(json!({ "MaximumRetryAttempts": -5 })).expect("reads");
        assert_eq!(retries.max_retry_attempts(), -1);
    }

    #[test]
    fn arns_parse() {
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
    }
}
