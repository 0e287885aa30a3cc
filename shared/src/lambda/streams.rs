//! DynamoDB stream records in the shape Lambda delivers them (`aws_lambda_events`' DynamoDB
//! event), from what the DynamoDB Streams API returns: for whatever reads a stream the way an
//! event source mapping does (the local runner; the dead-letter handler replaying a skipped
//! batch).

use std::collections::HashMap;

use aws_lambda_events::event::dynamodb::{EventRecord, StreamRecord, UserIdentity};
use serde_json::{Value, json};

/// A stream record as Lambda delivers it.
pub fn lambda_record(record: aws_sdk_dynamodbstreams::types::Record, stream_arn: &str, region: &str) -> EventRecord {
    let mut converted = EventRecord::default();
    converted.aws_region = region.to_owned();
    converted.event_id = record.event_id.unwrap_or_default();
    converted.event_name = record.event_name.map(|n| n.as_str().to_owned()).unwrap_or_default();
    converted.event_source = Some("aws:dynamodb".to_owned());
    converted.event_version = Some(record.event_version.unwrap_or_else(|| "1.1".to_owned()));
    converted.event_source_arn = Some(stream_arn.to_owned());
    converted.user_identity = record.user_identity.map(|i| {
        let mut identity = UserIdentity::default();
        identity.type_ = i.r#type.unwrap_or_default();
        identity.principal_id = i.principal_id.unwrap_or_default();
        identity
    });
    if let Some(change) = record.dynamodb {
        converted.change = stream_record(change);
    }
    converted
}

fn stream_record(change: aws_sdk_dynamodbstreams::types::StreamRecord) -> StreamRecord {
    // The timestamp type is chrono's, reached through the event's own (epoch seconds) serde.
    let created = change.approximate_creation_date_time.map(|t| t.as_secs_f64()).unwrap_or_default();
    let mut converted: StreamRecord =
        serde_json::from_value(json!({ "ApproximateCreationDateTime": created, "SizeBytes": 0 })).unwrap_or_default();
    converted.keys = item(change.keys);
    converted.new_image = item(change.new_image);
    converted.old_image = item(change.old_image);
    converted.sequence_number = change.sequence_number;
    converted.size_bytes = change.size_bytes.unwrap_or_default();
    converted.stream_view_type =
        change.stream_view_type.and_then(|v| serde_json::from_value(Value::String(v.as_str().to_owned())).ok());
    converted
}

fn item(map: Option<HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>>) -> serde_dynamo::Item {
    map.unwrap_or_default().into_iter().map(|(k, v)| (k, attribute(v))).collect::<HashMap<_, _>>().into()
}

/// Like serde_dynamo's own conversion, without its panic on a type unknown to the SDK.
fn attribute(value: aws_sdk_dynamodbstreams::types::AttributeValue) -> serde_dynamo::AttributeValue {
    use aws_sdk_dynamodbstreams::types::AttributeValue as S;
    use serde_dynamo::AttributeValue as D;
    match value {
        S::B(b) => D::B(b.into_inner()),
        S::Bool(b) => D::Bool(b),
        S::Bs(bs) => D::Bs(bs.into_iter().map(|b| b.into_inner()).collect()),
        S::L(l) => D::L(l.into_iter().map(attribute).collect()),
        S::M(m) => D::M(m.into_iter().map(|(k, v)| (k, attribute(v))).collect()),
        S::N(n) => D::N(n),
        S::Ns(ns) => D::Ns(ns),
        S::Null(n) => D::Null(n),
        S::S(s) => D::S(s),
        S::Ss(ss) => D::Ss(ss),
        other => {
            tracing::warn!(?other, "an attribute type unknown to the SDK is passed on as NULL");
            D::Null(true)
        }
    }
}
