//! Lambda event filtering (`FilterCriteria`), for the subset the local runner needs.
//!
//! A pattern is a JSON object matched against the event record as Lambda sees it (for a
//! DynamoDB stream: `eventName`, `dynamodb.NewImage.<attr>.S`…, the DynamoDB-JSON shape; for SQS:
//! the message, with `body` parsed when it is JSON). Every key of a pattern must match. A nested
//! object descends into the record; a leaf is an array of alternatives, any of which may match:
//!
//! - a literal (string, number, boolean, null): equality (numbers compare numerically);
//! - `{"prefix": "ab"}`, `{"suffix": "yz"}`, `{"equals-ignore-case": "Ab"}`;
//! - `{"exists": true}` (the field is present) / `{"exists": false}` (it is absent);
//! - `{"anything-but": [..]}` (or a single literal, or `{"prefix": ".."}`): present and none of those;
//! - `{"numeric": [">", 0, "<=", 5]}` on JSON numbers.
//!
//! When the record's value is an array, the leaf matches if any element does. Several patterns
//! ([`Filters`]) are ORed; no pattern at all lets everything through. Anything else (`$or`, `cidr`,
//! `wildcard`…) is refused when the pattern is parsed, rather than silently mismatched.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("filter pattern: {0}")]
pub struct FilterError(String);

fn err<T>(message: impl Into<String>) -> Result<T, FilterError> {
    Err(FilterError(message.into()))
}

/// One compiled filter pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    root: Vec<(String, Node)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Object(Vec<(String, Node)>),
    Leaf(Vec<Matcher>),
}

#[derive(Debug, Clone, PartialEq)]
enum Matcher {
    Equals(Value),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    Exists(bool),
    AnythingBut(Vec<Value>),
    AnythingButPrefix(String),
    Numeric(Vec<(Comparison, f64)>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Comparison {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Pattern {
    /// Parses a pattern as written in `FilterCriteria.Filters[].Pattern` (a JSON string).
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let value: Value = serde_json::from_str(text).or_else(|e| err(format!("not JSON ({e}): {text}")))?;
        Self::from_value(&value)
    }

    /// Compiles a pattern already parsed as JSON.
    pub fn from_value(value: &Value) -> Result<Self, FilterError> {
        match value {
            Value::Object(map) => Ok(Self { root: object(map, "")? }),
            other => err(format!("a pattern is a JSON object, not {other}")),
        }
    }

    /// Whether the record (as Lambda would send it, in JSON) matches.
    pub fn matches(&self, record: &Value) -> bool {
        fields_match(&self.root, Some(record))
    }
}

fn object(map: &Map<String, Value>, path: &str) -> Result<Vec<(String, Node)>, FilterError> {
    map.iter()
        .map(|(key, value)| {
            let here = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            if key.starts_with('$') {
                return err(format!("{here}: {key} is not supported locally"));
            }
            let node = match value {
                Value::Object(inner) => Node::Object(object(inner, &here)?),
                Value::Array(items) if items.is_empty() => {
                    return err(format!("{here}: an empty array matches nothing"));
                }
                Value::Array(items) => Node::Leaf(items.iter().map(|m| matcher(m, &here)).collect::<Result<_, _>>()?),
                other => return err(format!("{here}: a leaf must be an array of values, not {other}")),
            };
            Ok((key.clone(), node))
        })
        .collect()
}

fn matcher(value: &Value, path: &str) -> Result<Matcher, FilterError> {
    let map = match value {
        Value::Object(map) => map,
        Value::Array(_) => return err(format!("{path}: nested arrays are not a pattern")),
        literal => return Ok(Matcher::Equals(literal.clone())),
    };
    let mut entries = map.iter();
    let (Some((operator, operand)), None) = (entries.next(), entries.next()) else {
        return err(format!("{path}: an operator object has exactly one key: {value}"));
    };
    let string = |what: &str| match operand {
        Value::String(s) => Ok(s.clone()),
        other => err(format!("{path}: {what} takes a string, not {other}")),
    };
    Ok(match operator.as_str() {
        "prefix" => Matcher::Prefix(string("prefix")?),
        "suffix" => Matcher::Suffix(string("suffix")?),
        "equals-ignore-case" => Matcher::EqualsIgnoreCase(string("equals-ignore-case")?),
        "exists" => match operand {
            Value::Bool(b) => Matcher::Exists(*b),
            other => return err(format!("{path}: exists takes true or false, not {other}")),
        },
        "anything-but" => match operand {
            Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
                Matcher::AnythingBut(items.clone())
            }
            Value::Object(inner) => match (inner.len(), inner.get("prefix")) {
                (1, Some(Value::String(p))) => Matcher::AnythingButPrefix(p.clone()),
                _ => return err(format!("{path}: anything-but supports only a prefix object, not {operand}")),
            },
            Value::Array(_) => return err(format!("{path}: anything-but takes a list of literals")),
            literal => Matcher::AnythingBut(vec![literal.clone()]),
        },
        "numeric" => Matcher::Numeric(numeric(operand, path)?),
        other => return err(format!("{path}: operator {other:?} is not supported locally")),
    })
}

fn numeric(operand: &Value, path: &str) -> Result<Vec<(Comparison, f64)>, FilterError> {
    let Some(items) = operand.as_array().filter(|i| !i.is_empty() && i.len() % 2 == 0) else {
        return err(format!("{path}: numeric takes [op, number, …] pairs, not {operand}"));
    };
    items
        .chunks(2)
        .map(|pair| {
            let op = match pair[0].as_str() {
                Some("=") => Comparison::Eq,
                Some("<") => Comparison::Lt,
                Some("<=") => Comparison::Le,
                Some(">") => Comparison::Gt,
                Some(">=") => Comparison::Ge,
                _ => return err(format!("{path}: unknown numeric operator {}", pair[0])),
            };
            let n = pair[1].as_f64().ok_or_else(|| FilterError(format!("{path}: {} is not a number", pair[1])))?;
            Ok((op, n))
        })
        .collect()
}

fn fields_match(fields: &[(String, Node)], value: Option<&Value>) -> bool {
    let object = value.and_then(Value::as_object);
    fields.iter().all(|(key, node)| node_matches(node, object.and_then(|o| o.get(key))))
}

fn node_matches(node: &Node, value: Option<&Value>) -> bool {
    match node {
        Node::Object(fields) => fields_match(fields, value),
        Node::Leaf(matchers) => matchers.iter().any(|m| leaf_matches(m, value)),
    }
}

fn leaf_matches(matcher: &Matcher, value: Option<&Value>) -> bool {
    match (matcher, value) {
        (Matcher::Exists(wanted), v) => v.is_some() == *wanted,
        (_, None) => false,
        (m, Some(Value::Array(items))) => items.iter().any(|item| scalar_matches(m, item)),
        (m, Some(v)) => scalar_matches(m, v),
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

fn scalar_matches(matcher: &Matcher, value: &Value) -> bool {
    let text = value.as_str();
    match matcher {
        Matcher::Equals(expected) => same(expected, value),
        Matcher::Prefix(p) => text.is_some_and(|t| t.starts_with(p.as_str())),
        Matcher::Suffix(s) => text.is_some_and(|t| t.ends_with(s.as_str())),
        Matcher::EqualsIgnoreCase(s) => text.is_some_and(|t| t.to_lowercase() == s.to_lowercase()),
        Matcher::Exists(wanted) => *wanted,
        Matcher::AnythingBut(excluded) => !excluded.iter().any(|e| same(e, value)),
        Matcher::AnythingButPrefix(p) => text.is_some_and(|t| !t.starts_with(p.as_str())),
        Matcher::Numeric(conditions) => {
            value.is_number()
                && value.as_f64().is_some_and(|n| {
                    conditions.iter().all(|(op, bound)| match op {
                        Comparison::Eq => n == *bound,
                        Comparison::Lt => n < *bound,
                        Comparison::Le => n <= *bound,
                        Comparison::Gt => n > *bound,
                        Comparison::Ge => n >= *bound,
                    })
                })
        }
    }
}

/// The `FilterCriteria` of one event source: patterns ORed; none at all lets everything through.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filters {
    patterns: Vec<Pattern>,
}

impl Filters {
    /// From an event's resolved `FilterCriteria` property (`{"Filters": [{"Pattern": ".."}]}`);
    /// a `Pattern` given as an object instead of a JSON string is accepted too.
    pub fn from_criteria(criteria: Option<&Value>) -> Result<Self, FilterError> {
        let Some(criteria) = criteria.filter(|c| !c.is_null()) else {
            return Ok(Self::default());
        };
        let filters = match criteria.get("Filters") {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Array(filters)) => filters,
            Some(other) => return err(format!("FilterCriteria.Filters must be a list, not {other}")),
        };
        let patterns = filters
            .iter()
            .map(|f| match f.get("Pattern") {
                Some(Value::String(text)) => Pattern::parse(text),
                Some(value @ Value::Object(_)) => Pattern::from_value(value),
                _ => err(format!("a filter needs a Pattern: {f}")),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    pub fn new(patterns: Vec<Pattern>) -> Self {
        Self { patterns }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// Whether Lambda would deliver this record.
    pub fn matches(&self, record: &Value) -> bool {
        self.patterns.is_empty() || self.patterns.iter().any(|p| p.matches(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(event_name: &str, new_image: Value) -> Value {
        json!({
            "eventID": "1",
            "eventName": event_name,
            "eventSource": "aws:dynamodb",
            "dynamodb": { "Keys": { "pk": { "S": "a" } }, "NewImage": new_image, "SequenceNumber": "100" }
        })
    }

    fn matches(pattern: &str, record: &Value) -> bool {
        Pattern::parse(pattern).expect("pattern parses").matches(record)
    }

    #[test]
    fn nested_literals_match_the_dynamodb_json_shape() {
        let pattern = r#"{"eventName":["INSERT"],"dynamodb":{"NewImage":{"kind":{"S":["wanted"]}}}}"#;
        assert!(matches(pattern, &record("INSERT", json!({ "kind": { "S": "wanted" } }))));
        assert!(!matches(pattern, &record("MODIFY", json!({ "kind": { "S": "wanted" } }))));
        assert!(!matches(pattern, &record("INSERT", json!({ "kind": { "S": "other" } }))));
        assert!(!matches(pattern, &record("INSERT", json!({ "kind": { "N": "1" } }))));
        assert!(!matches(pattern, &record("INSERT", json!({}))));
    }

    #[test]
    fn alternatives_in_a_leaf_are_ored_and_keys_are_anded() {
        let pattern = r#"{"eventName":["INSERT","MODIFY"],"eventSource":["aws:dynamodb"]}"#;
        assert!(matches(pattern, &record("INSERT", json!({}))));
        assert!(matches(pattern, &record("MODIFY", json!({}))));
        assert!(!matches(pattern, &record("REMOVE", json!({}))));
        assert!(!matches(r#"{"eventName":["INSERT"],"eventSource":["aws:sqs"]}"#, &record("INSERT", json!({}))));
        assert!(matches("{}", &record("REMOVE", json!({}))), "an empty pattern matches everything");
    }

    #[test]
    fn prefix_suffix_and_ignore_case() {
        let r = record("INSERT", json!({ "streamId": { "S": "Order-42" } }));
        assert!(matches(r#"{"dynamodb":{"NewImage":{"streamId":{"S":[{"prefix":"Order-"}]}}}}"#, &r));
        assert!(!matches(r#"{"dynamodb":{"NewImage":{"streamId":{"S":[{"prefix":"Inventory-"}]}}}}"#, &r));
        assert!(matches(r#"{"dynamodb":{"NewImage":{"streamId":{"S":[{"suffix":"-42"}]}}}}"#, &r));
        assert!(matches(r#"{"eventName":[{"equals-ignore-case":"insert"}]}"#, &r));
        // A prefix never matches a non-string
        assert!(!matches(r#"{"dynamodb":{"NewImage":{"streamId":[{"prefix":"O"}]}}}"#, &r));
    }

    #[test]
    fn exists_true_and_false() {
        let with = record("INSERT", json!({ "deletedAt": { "S": "2024" } }));
        let without = record("INSERT", json!({ "other": { "S": "x" } }));
        let exists = r#"{"dynamodb":{"NewImage":{"deletedAt":{"S":[{"exists":true}]}}}}"#;
        let absent = r#"{"dynamodb":{"NewImage":{"deletedAt":{"S":[{"exists":false}]}}}}"#;
        assert!(matches(exists, &with));
        assert!(!matches(exists, &without));
        assert!(!matches(absent, &with));
        assert!(matches(absent, &without));
        // Absence holds however far up the path stops
        assert!(matches(r#"{"nope":{"deeper":[{"exists":false}]}}"#, &without));
        assert!(!matches(r#"{"nope":{"deeper":[{"exists":true}]}}"#, &without));
    }

    #[test]
    fn anything_but_needs_the_field_and_excludes_the_values() {
        let pattern = r#"{"eventName":[{"anything-but":["REMOVE","MODIFY"]}]}"#;
        assert!(matches(pattern, &record("INSERT", json!({}))));
        assert!(!matches(pattern, &record("REMOVE", json!({}))));
        assert!(!matches(r#"{"missing":[{"anything-but":["x"]}]}"#, &record("INSERT", json!({}))));
        assert!(matches(r#"{"eventName":[{"anything-but":"REMOVE"}]}"#, &record("INSERT", json!({}))));
        assert!(!matches(r#"{"eventName":[{"anything-but":{"prefix":"INS"}}]}"#, &record("INSERT", json!({}))));
        assert!(matches(r#"{"eventName":[{"anything-but":{"prefix":"REM"}}]}"#, &record("INSERT", json!({}))));
    }

    #[test]
    fn numbers_arrays_and_null() {
        let r = json!({ "n": 5, "tags": ["a", "b"], "gone": null, "flag": true });
        assert!(matches(r#"{"n":[5.0]}"#, &r));
        assert!(!matches(r#"{"n":["5"]}"#, &r), "a string does not equal a number");
        assert!(matches(r#"{"n":[{"numeric":[">",0,"<=",5]}]}"#, &r));
        assert!(!matches(r#"{"n":[{"numeric":["<",5]}]}"#, &r));
        assert!(matches(r#"{"tags":["b"]}"#, &r), "any element of an array may match");
        assert!(!matches(r#"{"tags":["c"]}"#, &r));
        assert!(matches(r#"{"gone":[null]}"#, &r));
        assert!(matches(r#"{"gone":[{"exists":true}]}"#, &r));
        assert!(matches(r#"{"flag":[true]}"#, &r));
    }

    #[test]
    fn unsupported_or_malformed_patterns_are_refused() {
        for bad in [
            "not json",
            "[]",
            r#"{"eventName":"INSERT"}"#,
            r#"{"eventName":[]}"#,
            r#"{"eventName":[{"wildcard":"IN*"}]}"#,
            r#"{"$or":[{"a":["b"]}]}"#,
            r#"{"a":[{"prefix":"x","suffix":"y"}]}"#,
            r#"{"a":[{"exists":"yes"}]}"#,
            r#"{"a":[{"numeric":[">"]}]}"#,
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn filters_are_ored_and_none_lets_everything_through() {
        let insert = record("INSERT", json!({}));
        let remove = record("REMOVE", json!({}));
        let none = Filters::from_criteria(None).expect("no criteria");
        assert!(none.is_empty() && none.matches(&remove));
        let criteria = json!({ "Filters": [
            { "Pattern": r#"{"eventName":["INSERT"]}"# },
            { "Pattern": { "eventName": ["MODIFY"] } }
        ]});
        let filters = Filters::from_criteria(Some(&criteria)).expect("criteria");
        assert_eq!(filters.len(), 2);
        assert!(filters.matches(&insert));
        assert!(filters.matches(&record("MODIFY", json!({}))));
        assert!(!filters.matches(&remove));
        assert!(Filters::from_criteria(Some(&json!({ "Filters": [{ "Nope": 1 }] }))).is_err());
    }
}
