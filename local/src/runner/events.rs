//! What the mappings send: SQS messages and DynamoDB stream records as Lambda delivers them, the
//! views their filters are matched against, and the record of a skipped stream batch.

use aws_lambda_events::encodings::Base64Data;
use aws_lambda_events::event::dynamodb::{Event as DynamoDbEvent, EventRecord};
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage, SqsMessageAttribute};
use serde_json::{Value, json};

/// Lambda's event for a batch of SQS messages.
pub(super) fn sqs_event(records: Vec<SqsMessage>) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = records;
    event
}

/// Lambda's event for a batch of stream records.
pub(super) fn stream_event(records: Vec<EventRecord>) -> DynamoDbEvent {
    let mut event = DynamoDbEvent::default();
    event.records = records;
    event
}

/// An SQS message as Lambda delivers it.
pub(super) fn sqs_record(msg: aws_sdk_sqs::types::Message, queue_arn: &str, region: &str) -> SqsMessage {
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

fn base64_data(bytes: aws_sdk_sqs::primitives::Blob) -> Base64Data {
    let mut data = Base64Data::default();
    data.0 = bytes.into_inner();
    data
}

fn sqs_attribute(value: aws_sdk_sqs::types::MessageAttributeValue) -> SqsMessageAttribute {
    let mut attribute = SqsMessageAttribute::default();
    attribute.string_value = value.string_value;
    attribute.binary_value = value.binary_value.map(base64_data);
    attribute.string_list_values = value.string_list_values.unwrap_or_default();
    attribute.binary_list_values = value.binary_list_values.unwrap_or_default().into_iter().map(base64_data).collect();
    attribute.data_type = Some(value.data_type);
    attribute
}

/// What an SQS filter is matched against: the message, with a JSON body parsed.
pub(super) fn sqs_filter_view(record: &SqsMessage) -> Value {
    let mut view = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(parsed) = record.body.as_deref().and_then(|b| serde_json::from_str::<Value>(b).ok()) {
        view["body"] = parsed;
    }
    view
}

/// (messageId, receiptHandle) of each record.
pub(super) fn receipts(records: &[SqsMessage]) -> Vec<(String, String)> {
    records
        .iter()
        .map(|r| (r.message_id.clone().unwrap_or_default(), r.receipt_handle.clone().unwrap_or_default()))
        .collect()
}

/// A stream record as Lambda delivers it.
pub(super) fn stream_record(
    record: aws_sdk_dynamodbstreams::types::Record,
    stream_arn: &str,
    region: &str,
) -> EventRecord {
    shared::lambda::streams::lambda_record(record, stream_arn, region)
}

/// What a stream filter is matched against: the record as Lambda delivers it.
pub(super) fn stream_filter_view(record: &EventRecord) -> Value {
    serde_json::to_value(record).unwrap_or(Value::Null)
}

/// A stream batch given up on after `MaximumRetryAttempts`.
pub(super) struct SkippedBatch<'a> {
    pub function_arn: &'a str,
    pub stream_arn: &'a str,
    pub shard_id: &'a str,
    /// Invocations made.
    pub attempts: u32,
    /// Its records' sequence numbers, in order.
    pub sequences: &'a [String],
    /// Its records' approximate arrivals (RFC 3339), in order.
    pub arrivals: &'a [String],
}

impl SkippedBatch<'_> {
    /// What Lambda sends to an `OnFailure` destination: the batch's position, not its records.
    pub(super) fn failure_record(&self) -> Value {
        let now = aws_sdk_sqs::primitives::DateTime::from(std::time::SystemTime::now());
        json!({
            "requestContext": {
                "requestId": format!("local-{:016x}", fastrand::u64(..)),
                "functionArn": self.function_arn,
                "condition": "RetryAttemptsExhausted",
                "approximateInvokeCount": self.attempts,
            },
            "responseContext": { "statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled" },
            "version": "1.0",
            "timestamp": now.fmt(aws_sdk_sqs::primitives::DateTimeFormat::DateTime).unwrap_or_default(),
            "DDBStreamBatchInfo": {
                "shardId": self.shard_id,
                "startSequenceNumber": self.sequences.first(),
                "endSequenceNumber": self.sequences.last(),
                "approximateArrivalOfFirstRecord": self.arrivals.first(),
                "approximateArrivalOfLastRecord": self.arrivals.last(),
                "batchSize": self.sequences.len(),
                "streamArn": self.stream_arn,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::filter::Filters;

    #[test]
    fn a_stream_record_converts_to_lambdas_shape() {
        use aws_sdk_dynamodbstreams::primitives::DateTime;
        use aws_sdk_dynamodbstreams::types::{AttributeValue, OperationType, Record, StreamRecord, StreamViewType};
        let change = StreamRecord::builder()
            .approximate_creation_date_time(DateTime::from_secs(1_700_000_000))
            .keys("pk", AttributeValue::S("a".into()))
            .new_image("pk", AttributeValue::S("a".into()))
            .new_image("n", AttributeValue::N("5".into()))
            .new_image("m", AttributeValue::M(HashMap::from([("x".into(), AttributeValue::Bool(true))])))
            .sequence_number("100")
            .size_bytes(42)
            .stream_view_type(StreamViewType::NewImage)
            .build();
        let record = Record::builder().event_id("e1").event_name(OperationType::Insert).dynamodb(change).build();
        let converted = stream_record(record, "arn:aws:dynamodb:r:1:table/t/stream/s", "us-east-1");
        let json = stream_filter_view(&converted);
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
        assert_eq!(receipts(std::slice::from_ref(&record)), vec![("m1".to_owned(), "r1".to_owned())]);
        let filters =
            Filters::from_criteria(Some(&json!({ "Filters": [{ "Pattern": r#"{"body":{"kind":["order"]}}"# }] })))
                .expect("filters");
        assert!(filters.matches(&sqs_filter_view(&record)));
    }

    #[test]
    fn a_skipped_batch_is_recorded_by_its_position() {
        // Given a batch of two records given up on after three invocations
        let sequences = ["100".to_owned(), "200".to_owned()];
        let arrivals = ["2024-01-01T00:00:00Z".to_owned(), "2024-01-01T00:00:01Z".to_owned()];
        let batch = SkippedBatch {
            function_arn: "arn:aws:lambda:us-east-1:000000000000:function:f",
            stream_arn: "arn:aws:dynamodb:us-east-1:000000000000:table/t/stream/s",
            shard_id: "shard-1",
            attempts: 3,
            sequences: &sequences,
            arrivals: &arrivals,
        };

        // When it is recorded
        let record = batch.failure_record();

        // Then the record names its position, as Lambda's does
        assert_eq!(record["requestContext"]["condition"], "RetryAttemptsExhausted");
        assert_eq!(record["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(record["requestContext"]["functionArn"], batch.function_arn);
        let info = &record["DDBStreamBatchInfo"];
        assert_eq!((&info["startSequenceNumber"], &info["endSequenceNumber"]), (&json!("100"), &json!("200")));
        assert_eq!(info["approximateArrivalOfLastRecord"], "2024-01-01T00:00:01Z");
        assert_eq!((&info["batchSize"], &info["shardId"]), (&json!(2), &json!("shard-1")));
        assert_eq!(info["streamArn"], batch.stream_arn);
    }
}
