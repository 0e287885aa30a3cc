//! Test helpers shared by the crates' tests (feature `testing`, for dev-dependencies only):
//! property-test strategies for what a handler reads (JSON, stream images): the envelope's attribute names, and text,
//! numbers and attributes as a stream image may hold them, sane or not.

use std::sync::Mutex;

use aws_lambda_events::event::dynamodb::EventRecord;
use proptest::prelude::*;
use serde_dynamo::{AttributeValue, Item};

use crate::lambda::batch::{DeadLetters, Source};

/// Given / when / then for an aggregate's decisions (see [`crate::aggregate::testing`]).
pub use crate::aggregate::testing::{Given, When, given};

/// Dead letters as they are parked: the sequence number (or message id) of their record, and
/// the reason.
#[derive(Debug, Default)]
pub struct Parked(pub Mutex<Vec<(String, String)>>);

impl DeadLetters for Parked {
    async fn dead_letter(&self, _body: &str, reason: &str, source: &Source<'_>) -> Result<(), String> {
        let at = source.id.unwrap_or_default().to_owned();
        self.0.lock().expect("lock").push((at, reason.to_owned()));
        Ok(())
    }
}

/// The stream record of an `INSERT` of `item`, its sequence number `sequence`.
pub fn inserted(sequence: usize, item: Item) -> EventRecord {
    let mut record = EventRecord::default();
    record.event_name = "INSERT".into();
    record.change.sequence_number = Some(sequence.to_string());
    record.change.new_image = item;
    record
}

/// The attributes of a stored event's item.
pub const NAMES: &[&str] = &[
    "streamId",
    "version",
    "eventId",
    "eventType",
    "schemaVersion",
    "payload",
    "payloadJson",
    "correlationId",
    "causationId",
    "idempotencyKey",
    "traceHeader",
    "recordedAt",
];
pub const REQUIRED: &[&str] =
    &["streamId", "version", "eventId", "eventType", "schemaVersion", "correlationId", "recordedAt"];

/// Any JSON (floats and kilobytes of text included), with `keys` among its objects' keys, so
/// that a decoder fed with it goes deep.
pub fn json_with_keys(keys: &'static [&'static str]) -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 5, move |inner| {
        let key = prop_oneof![prop::sample::select(keys).prop_map(str::to_owned), "[a-zA-Z-]{0,10}"];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Short text mostly; sometimes kilobytes of it.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,40}",
        1 => (".{1,4}", 1_000usize..8_000).prop_map(|(s, n)| s.repeat(n)),
    ]
}

pub fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        bad_number(),
        ".{0,12}",
    ]
}

/// Not a `u32`.
pub fn bad_number() -> impl Strategy<Value = String> {
    prop_oneof![Just("4294967296".to_owned()), bad_u64()]
}

/// Not a `u64`.
pub fn bad_u64() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("18446744073709551616".to_owned()),
        Just("-1".to_owned()),
        Just("1e999".to_owned()),
        Just("1.5".to_owned()),
        Just(String::new()),
        "[0-9]{30,60}",
        "[a-z]{1,12}",
    ]
}

/// An envelope attribute's name, or any other.
pub fn name() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(NAMES).prop_map(str::to_owned), "[a-zA-Z]{0,8}"]
}

/// Any attribute DynamoDB can hold.
pub fn attribute() -> impl Strategy<Value = AttributeValue> {
    let leaf = prop_oneof![
        text().prop_map(AttributeValue::S),
        number().prop_map(AttributeValue::N),
        any::<bool>().prop_map(AttributeValue::Bool),
        any::<bool>().prop_map(AttributeValue::Null),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(AttributeValue::B),
        prop::collection::vec(".{0,8}", 0..4).prop_map(AttributeValue::Ss),
        prop::collection::vec(number(), 0..4).prop_map(AttributeValue::Ns),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..8), 0..3).prop_map(AttributeValue::Bs),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(AttributeValue::L),
            prop::collection::hash_map(name(), inner, 0..4).prop_map(AttributeValue::M),
        ]
    })
}

/// What DynamoDB holds and JSON reads: text, numbers, booleans, null, lists, maps.
pub fn json_attribute() -> impl Strategy<Value = AttributeValue> {
    let leaf = prop_oneof![
        text().prop_map(AttributeValue::S),
        any::<i64>().prop_map(|n| AttributeValue::N(n.to_string())),
        any::<u64>().prop_map(|n| AttributeValue::N(n.to_string())),
        any::<bool>().prop_map(AttributeValue::Bool),
        Just(AttributeValue::Null(true)),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(AttributeValue::L),
            prop::collection::hash_map(name(), inner, 0..4).prop_map(AttributeValue::M),
        ]
    })
}

/// `sample` (a stored event's item) damaged so that it is no stored event: a required attribute
/// missing, a text one not text, a version or schema version out of range, a `payloadJson` that
/// is not JSON, or not text.
pub fn not_an_event(sample: fn() -> Item) -> impl Strategy<Value = Item> {
    let not_text = prop_oneof![
        Just(AttributeValue::Bool(true)),
        Just(AttributeValue::L(vec![])),
        Just(AttributeValue::M(Default::default())),
    ];
    let text_fields = prop::sample::select(vec!["streamId", "eventId", "eventType", "correlationId", "recordedAt"]);
    prop_oneof![
        prop::sample::select(REQUIRED).prop_map(move |name| {
            let mut item = sample();
            item.remove(name);
            item
        }),
        (text_fields, not_text).prop_map(move |(name, value)| with(sample(), name, value)),
        bad_u64().prop_map(move |n| with(sample(), "version", AttributeValue::N(n))),
        bad_number().prop_map(move |n| with(sample(), "schemaVersion", AttributeValue::N(n))),
        "[^}]{0,40}".prop_map(move |s| with(sample(), "payloadJson", AttributeValue::S(format!("{{{s}")))),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(move |mut b| {
            b.insert(0, 0xff);
            with(sample(), "payloadJson", AttributeValue::B(b))
        }),
    ]
}

/// `item` with `name` set to `value`.
pub fn with(mut item: Item, name: &str, value: AttributeValue) -> Item {
    item.insert(name.to_owned(), value);
    item
}
