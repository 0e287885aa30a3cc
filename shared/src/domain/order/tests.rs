use super::*;

pub(crate) fn request() -> OrderRequest {
    OrderRequest {
        order_id: "ord-1".into(),
        customer_id: "cust-1".into(),
        currency: "EUR".into(),
        lines: vec![
            LineRequest { sku: "SKU-RED".into(), quantity: 2, unit_price_minor: 1_250 },
            LineRequest { sku: "SKU-BLUE".into(), quantity: 1, unit_price_minor: 999 },
        ],
        payment_token: "tok_visa".into(),
        shipping_address: Address {
            name: "Ada".into(),
            line1: "1 Main St".into(),
            city: "Berlin".into(),
            postal_code: "10115".into(),
            country: "DE".into(),
        },
    }
}

#[test]
fn a_valid_request_becomes_an_order_with_an_integer_total() {
    let order = request().validate().expect("valid");
    assert_eq!(order.total, Money::new(2 * 1_250 + 999, Currency::EUR));
    assert_eq!(order.lines.len(), 2);
}

#[test]
fn every_problem_is_reported_with_its_field() {
    let mut bad = request();
    bad.order_id = "has space".into();
    bad.currency = "XYZ".into();
    bad.lines[0].quantity = 0;
    bad.lines[1].unit_price_minor = -5;
    bad.lines.push(LineRequest { sku: "SKU-RED".into(), quantity: 1, unit_price_minor: 1 });
    bad.shipping_address.country = "germany".into();
    let errors = bad.validate().expect_err("invalid");
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    for expected in [
        "orderId",
        "currency",
        "lines[0].quantity",
        "lines[1].unitPriceMinor",
        "lines[2].sku",
        "shippingAddress.country",
    ] {
        assert!(fields.contains(&expected), "{expected} missing from {fields:?}");
    }
}

#[test]
fn line_count_and_quantity_are_bounded() {
    let mut empty = request();
    empty.lines.clear();
    assert!(empty.validate().is_err());
    let mut huge = request();
    huge.lines[0].quantity = i64::from(MAX_QUANTITY) + 1;
    assert!(huge.validate().is_err());
    let mut many = request();
    many.lines =
        (0..=MAX_LINES).map(|i| LineRequest { sku: format!("SKU-{i}"), quantity: 1, unit_price_minor: 1 }).collect();
    assert!(many.validate().is_err());
}

#[test]
fn unknown_fields_are_refused_not_ignored() {
    let mut json = serde_json::to_value(request()).unwrap();
    json["priceOverride"] = serde_json::json!(0);
    assert!(serde_json::from_value::<OrderRequest>(json).is_err());
}

fn placed() -> Order {
    let mut order = Order::default();
    order.apply(&OrderEvent::OrderPlaced(request().validate().unwrap()));
    order
}

#[test]
fn placing_twice_is_a_retry_and_placing_differently_is_an_error() {
    let p = request().validate().unwrap();
    let order = placed();
    assert_eq!(order.decide(&OrderCommand::Place(p.clone())), Ok(vec![]));
    let mut other = p;
    other.payment_token = "tok_other".into();
    assert!(matches!(order.decide(&OrderCommand::Place(other)), Err(OrderError::AlreadyPlacedDifferently(_))));
}

#[test]
fn an_order_ends_once() {
    let mut order = placed();
    let cancel = OrderCommand::Cancel { reason: "no stock".into(), failed_step: "ReserveInventory".into() };
    let events = order.decide(&cancel).unwrap();
    order.apply(&events[0]);
    assert_eq!(order.status, OrderStatus::Cancelled);
    assert_eq!(order.decide(&cancel), Ok(vec![]), "cancelling again changes nothing");
    let complete = OrderCommand::Complete { payment_id: "p".into(), shipment_id: "s".into() };
    assert!(matches!(order.decide(&complete), Err(OrderError::InvalidTransition { .. })));
    assert_eq!(
        order.decide(&flag(&["CancelOrder"])).unwrap().len(),
        1,
        "a cancelled order can still need manual action"
    );
}

#[test]
fn a_flagged_order_ends_cancelled_once_its_compensations_go_through_or_resolved_by_a_person() {
    // Given an order flagged for manual action
    let mut flagged = placed();
    let events = flagged.decide(&flag(&["RefundPayment"])).unwrap();
    flagged.apply(&events[0]);
    // When its compensations are retried and go through, it is cancelled
    let mut retried = flagged.clone();
    let cancel = OrderCommand::Cancel { reason: "retried by ana".into(), failed_step: "RefundPayment".into() };
    let events = retried.decide(&cancel).unwrap();
    retried.apply(&events[0]);
    assert_eq!(retried.status, OrderStatus::Cancelled);
    // Or when a person resolves it by hand, it is resolved, once
    let resolve = OrderCommand::ResolveManualAction { by: "ana".into(), note: "refunded by bank transfer".into() };
    let events = flagged.decide(&resolve).unwrap();
    assert!(matches!(&events[..], [OrderEvent::OrderManualActionResolved { by, .. }] if by == "ana"));
    flagged.apply(&events[0]);
    assert_eq!(flagged.status, OrderStatus::ManuallyResolved);
    assert_eq!(flagged.decide(&resolve), Ok(vec![]));
    assert!(matches!(flagged.decide(&cancel), Err(OrderError::InvalidTransition { .. })), "final");
    // And an order nobody flagged is not resolved by hand
    assert!(matches!(placed().decide(&resolve), Err(OrderError::InvalidTransition { .. })));
}

fn flag(steps: &[&str]) -> OrderCommand {
    OrderCommand::FlagForManualAction {
        failures: steps.iter().map(|s| FailedAction::new(*s, "ServiceUnavailable: down")).collect(),
    }
}

#[test]
fn flagging_names_every_step_that_kept_failing_and_only_new_failures_flag_again() {
    // Given a placed order whose refund and stock release kept failing
    let mut order = placed();
    // When it is flagged for manual action
    let events = order.decide(&flag(&["RefundPayment", "ReleaseInventory"])).unwrap();
    // Then the event names both steps, each with its error
    assert_eq!(
        events,
        [OrderEvent::OrderFlaggedForManualAction {
            failures: vec![
                FailedAction::new("RefundPayment", "ServiceUnavailable: down"),
                FailedAction::new("ReleaseInventory", "ServiceUnavailable: down"),
            ],
        }]
    );
    order.apply(&events[0]);
    assert_eq!(order.status, OrderStatus::NeedsManualAction);
    assert_eq!(order.failed_actions.len(), 2);
    // And flagging it again for the same steps (a redelivery, or a retry that failed alike)
    // changes nothing, while other steps failing on a retry is recorded
    assert_eq!(order.decide(&flag(&["RefundPayment", "ReleaseInventory"])), Ok(vec![]));
    assert_eq!(order.decide(&flag(&["RefundPayment"])).unwrap().len(), 1);
    // And a flag naming no step is refused
    assert_eq!(placed().decide(&flag(&[])), Err(OrderError::NothingFailed));
}

#[test]
fn a_flag_event_stored_in_the_first_schema_decodes_as_a_list_of_one() {
    use crate::aggregate::{decode_event, encode_event};
    use crate::eventstore::RecordedEvent;
    // Given an OrderFlaggedForManualAction stored as schema v1 (one `failedStep` and its `error`)
    let stored = RecordedEvent {
        stream_id: "Order-ord-1".into(),
        version: 5,
        event_id: "e5".into(),
        event_type: "OrderFlaggedForManualAction".into(),
        schema_version: 1,
        payload: serde_json::json!({ "failedStep": "RefundPayment", "error": "ServiceUnavailable: refund failed" }),
        correlation_id: "c".into(),
        causation_id: None,
        idempotency_key: None,
        trace_header: None,
        recorded_at: "2026-11-22T10:00:00Z".into(),
    };
    // When it is decoded
    let event = decode_event::<OrderEvent>(&stored).expect("upcast and decoded");
    // Then it names that one step, with its error
    assert_eq!(
        event,
        OrderEvent::OrderFlaggedForManualAction {
            failures: vec![FailedAction::new("RefundPayment", "ServiceUnavailable: refund failed")],
        }
    );
    // And an order replaying it is flagged
    let mut order = placed();
    order.apply(&event);
    assert_eq!(order.status, OrderStatus::NeedsManualAction);
    // And new flag events are written as schema v2, and decode back
    let encoded = encode_event(&event).expect("encodes");
    assert_eq!(
        (encoded.schema_version, &encoded.payload["failures"][0]["step"]),
        (2, &serde_json::json!("RefundPayment"))
    );
    let v2 = RecordedEvent { schema_version: 2, payload: encoded.payload, ..stored.clone() };
    assert_eq!(decode_event::<OrderEvent>(&v2).expect("decodes"), event);
    // And a v1 payload missing its step does not pass as a flag of nothing
    let broken = RecordedEvent { payload: serde_json::json!({ "error": "x" }), ..stored };
    assert!(decode_event::<OrderEvent>(&broken).is_err());
}
