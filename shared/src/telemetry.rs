//! Structured logs: one JSON object per line, as CloudWatch Logs Insights reads them, with the
//! fields of every enclosing span flattened to the top: `requestId` and `xrayTraceId` of the
//! invocation (the Lambda runtime's span), then `orderId`, `correlationId` and the trace of the
//! record being worked on ([`record_span`], innermost wins). So every line about an order says
//! which order, which request began its flow and which X-Ray trace it belongs to, and one
//! Logs Insights query (`filter orderId = "…"` or `correlationId = "…"`) finds the whole saga
//! across every function. The level comes from `RUST_LOG` (the template sets `info`).

use tracing::field::Empty;
use tracing_subscriber::prelude::*;

use crate::eventstore::{RecordedEvent, StreamId};

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Lambda stamps every line with its own time: no timestamp of ours.
    let mut layer = json_subscriber::JsonLayer::stdout();
    layer.with_level("level");
    layer.with_flattened_event();
    layer.with_top_level_flattened_span_list();
    let _ = tracing_subscriber::registry().with(layer.with_filter(filter)).try_init();
    // In Lambda, the metrics recorder too (EMF lines on the same stdout).
    crate::metrics::init();
}

/// What the work of a span is about; each field that is `None` is left out of the lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct About<'a> {
    pub order_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    /// The X-Ray trace header of the flow (`Root=…;Parent=…;Sampled=…`). It replaces the
    /// invocation's `xrayTraceId` in the lines: a batch mixes records of many flows, and a line
    /// about one record belongs to that record's trace.
    pub trace_header: Option<&'a str>,
}

/// A span for the work on one record (a message, a stream record, a request): its fields are on
/// every line logged inside it.
pub fn record_span(about: About<'_>) -> tracing::Span {
    let span = tracing::info_span!("record", orderId = Empty, correlationId = Empty, xrayTraceId = Empty);
    if let Some(order_id) = about.order_id {
        span.record("orderId", order_id);
    }
    if let Some(correlation_id) = about.correlation_id {
        span.record("correlationId", correlation_id);
    }
    if let Some(trace) = about.trace_header.filter(|t| !t.is_empty()) {
        span.record("xrayTraceId", trace);
    }
    span
}

/// The span for work on one stored event: its order (if it concerns one), correlation and trace.
pub fn event_span(event: &RecordedEvent) -> tracing::Span {
    let order_id = order_of(event);
    record_span(About {
        order_id: order_id.as_deref(),
        correlation_id: Some(&event.correlation_id),
        trace_header: event.trace_header.as_deref(),
    })
}

/// The order an event concerns: its payload's `orderId` (inventory, payment and shipment events
/// name it), or the id of an order's own stream.
pub fn order_of(event: &RecordedEvent) -> Option<String> {
    if let Some(id) = event.payload.get("orderId").and_then(|v| v.as_str()) {
        return Some(id.to_owned());
    }
    let stream = StreamId::parse(&event.stream_id).ok()?;
    matches!(stream.category(), "Order" | "Payment" | "Shipment").then(|| stream.id().to_owned())
}

/// The `Root=` part of a trace header: the trace's id, the same in every segment of it.
pub fn trace_root(header: &str) -> Option<&str> {
    header.split(';').find_map(|part| part.trim().strip_prefix("Root="))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(stream: &str, payload: serde_json::Value) -> RecordedEvent {
        RecordedEvent {
            stream_id: stream.into(),
            version: 1,
            event_id: "e1".into(),
            event_type: "T".into(),
            schema_version: 1,
            payload,
            correlation_id: "c".into(),
            causation_id: None,
            idempotency_key: None,
            trace_header: None,
            recorded_at: String::new(),
        }
    }

    #[test]
    fn an_event_names_its_order_by_payload_or_by_stream() {
        assert_eq!(order_of(&event("Inventory-SKU-1", json!({ "orderId": "o1", "quantity": 2 }))), Some("o1".into()));
        assert_eq!(order_of(&event("Order-o2", json!({}))), Some("o2".into()));
        assert_eq!(order_of(&event("Payment-o3", json!({ "amount": 1 }))), Some("o3".into()));
        assert_eq!(order_of(&event("Inventory-SKU-1", json!({ "quantity": 100 }))), None);
        assert_eq!(order_of(&event("DeadLetter-d1", json!({}))), None);
    }

    #[test]
    fn the_root_is_read_from_a_trace_header() {
        let header = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        assert_eq!(trace_root(header), Some("1-5759e988-bd862e3fe1be46a994272793"));
        assert_eq!(trace_root("Parent=1;Sampled=0"), None);
    }
}
