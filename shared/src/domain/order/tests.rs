use super::*;
use crate::aggregate::testing::given;

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
    given::<Order>([OrderEvent::OrderPlaced(request().validate().unwrap())]).into_state()
}

fn placed_event() -> OrderEvent {
    OrderEvent::OrderPlaced(request().validate().unwrap())
}

#[test]
fn placing_twice_is_a_retry_and_placing_differently_is_an_error() {
    let p = request().validate().unwrap();
    let other = PlaceOrder { payment_token: "tok_other".into(), ..p.clone() };
    given::<Order>([placed_event()])
        .when(OrderCommand::Place(p))
        .then_nothing()
        .when(OrderCommand::Place(other))
        .then_error(OrderError::AlreadyPlacedDifferently("ord-1".into()));
}

#[test]
fn an_order_ends_once() {
    let cancel = OrderCommand::Cancel { reason: "no stock".into(), failed_step: "ReserveInventory".into() };
    let complete = OrderCommand::Complete { payment_id: "p".into(), shipment_id: "s".into() };
    let cancelled = given::<Order>([placed_event()])
        .when(cancel.clone())
        .then_expect([OrderEvent::OrderCancelled { reason: "no stock".into(), failed_step: "ReserveInventory".into() }])
        // cancelling again changes nothing
        .when(cancel)
        .then_nothing()
        .when(complete)
        .then_error(OrderError::InvalidTransition { status: OrderStatus::Cancelled, action: "complete" });
    assert_eq!(cancelled.state().status, OrderStatus::Cancelled);
    // a cancelled order can still need manual action
    cancelled.when(flag(&["CancelOrder"])).then_expect([OrderEvent::OrderFlaggedForManualAction {
        failures: vec![FailedAction::new("CancelOrder", "ServiceUnavailable: down")],
    }]);
}

#[test]
fn a_flagged_order_ends_cancelled_once_its_compensations_go_through_or_resolved_by_a_person() {
    // Given an order flagged for manual action
    let flagged = given::<Order>([placed_event()]).when(flag(&["RefundPayment"])).then_expect([
        OrderEvent::OrderFlaggedForManualAction {
            failures: vec![FailedAction::new("RefundPayment", "ServiceUnavailable: down")],
        },
    ]);
    // When its compensations are retried and go through, it is cancelled
    let cancel = OrderCommand::Cancel { reason: "retried by ana".into(), failed_step: "RefundPayment".into() };
    let retried = flagged.clone().when(cancel.clone()).then_expect([OrderEvent::OrderCancelled {
        reason: "retried by ana".into(),
        failed_step: "RefundPayment".into(),
    }]);
    assert_eq!(retried.state().status, OrderStatus::Cancelled);
    // Or when a person resolves it by hand, it is resolved, once, and for good
    let resolve = OrderCommand::ResolveManualAction { by: "ana".into(), note: "refunded by bank transfer".into() };
    let resolved = flagged
        .when(resolve.clone())
        .then_expect([OrderEvent::OrderManualActionResolved {
            by: "ana".into(),
            note: "refunded by bank transfer".into(),
        }])
        .when(resolve.clone())
        .then_nothing()
        .when(cancel)
        .then_error(OrderError::InvalidTransition { status: OrderStatus::ManuallyResolved, action: "cancel" });
    assert_eq!(resolved.state().status, OrderStatus::ManuallyResolved);
    // And an order nobody flagged is not resolved by hand
    given::<Order>([placed_event()])
        .when(resolve)
        .then_error(OrderError::InvalidTransition { status: OrderStatus::Placed, action: "resolve by hand" });
}

fn flag(steps: &[&str]) -> OrderCommand {
    OrderCommand::FlagForManualAction {
        failures: steps.iter().map(|s| FailedAction::new(*s, "ServiceUnavailable: down")).collect(),
    }
}

#[test]
fn flagging_names_every_step_that_kept_failing_and_only_new_failures_flag_again() {
    // Given a placed order whose refund and stock release kept failing
    let both = flag(&["RefundPayment", "ReleaseInventory"]);
    // When it is flagged for manual action, then the event names both steps, each with its error
    let flagged =
        given::<Order>([placed_event()]).when(both.clone()).then_expect([OrderEvent::OrderFlaggedForManualAction {
            failures: vec![
                FailedAction::new("RefundPayment", "ServiceUnavailable: down"),
                FailedAction::new("ReleaseInventory", "ServiceUnavailable: down"),
            ],
        }]);
    assert_eq!(flagged.state().status, OrderStatus::NeedsManualAction);
    assert_eq!(flagged.state().failed_actions.len(), 2);
    // And flagging it again for the same steps (a redelivery, or a retry that failed alike)
    // changes nothing, while other steps failing on a retry is recorded
    flagged.when(both).then_nothing().when(flag(&["RefundPayment"])).then_expect([
        OrderEvent::OrderFlaggedForManualAction {
            failures: vec![FailedAction::new("RefundPayment", "ServiceUnavailable: down")],
        },
    ]);
    // And a flag naming no step is refused
    given::<Order>([placed_event()]).when(flag(&[])).then_error(OrderError::NothingFailed);
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
