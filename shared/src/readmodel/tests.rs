use serde_dynamo::aws_sdk_dynamodb_1::from_item;
use serde_json::{Value, json};
use tracing_subscriber::fmt::MakeWriter;

use super::*;
use crate::adapters::dynamodb::ReadModelStore;
use crate::aggregate::encode_event;
use crate::domain::inventory::InventoryEvent;
use crate::domain::order::OrderRequest;
use crate::domain::payment::PaymentEvent;
use crate::domain::shipment::ShipmentEvent;
use crate::domain::{OrderId, Sku};

fn event(stream: &str, version: u64, event_type: &str, payload: Value, at: &str) -> RecordedEvent {
    RecordedEvent {
        stream_id: stream.into(),
        version,
        event_id: format!("{stream}-{version}"),
        event_type: event_type.into(),
        schema_version: 1,
        payload,
        correlation_id: "c".into(),
        causation_id: None,
        idempotency_key: None,
        trace_header: None,
        recorded_at: at.into(),
    }
}

/// A domain event as the store records it (its encoding, at its current schema).
fn recorded(stream: &str, version: u64, domain_event: &impl DomainEvent, at: &str) -> RecordedEvent {
    let new = encode_event(domain_event).expect("encodes");
    RecordedEvent { schema_version: new.schema_version, ..event(stream, version, &new.event_type, new.payload, at) }
}

fn placed(order_id: &str) -> OrderEvent {
    let request: OrderRequest = serde_json::from_value(json!({
        "orderId": order_id, "customerId": "c1", "currency": "EUR", "paymentToken": "tok_visa",
        "lines": [{ "sku": "SKU-A", "quantity": 2, "unitPriceMinor": 250 }],
        "shippingAddress": { "name": "Ada", "line1": "1 Main St", "city": "Berlin", "postalCode": "10115", "country": "DE" },
    }))
    .expect("a request");
    OrderEvent::OrderPlaced(request.validate().expect("valid"))
}

fn order_id() -> OrderId {
    OrderId::parse("o1").expect("an id")
}

fn eur(amount_minor: i64) -> Money {
    Money::new(amount_minor, Currency::EUR)
}

fn order_events() -> Vec<RecordedEvent> {
    let requested = PaymentEvent::PaymentRequested { order_id: order_id(), amount: eur(500) };
    vec![
        recorded("Order-o1", 1, &placed("o1"), "2026-11-22T10:00:00.000Z"),
        recorded("Payment-o1", 1, &requested, "2026-11-22T10:00:01.000Z"),
        recorded(
            "Payment-o1",
            2,
            &PaymentEvent::PaymentCharged { order_id: order_id(), payment_id: "pay_1".into(), amount: eur(500) },
            "2026-11-22T10:00:02.000Z",
        ),
        recorded(
            "Shipment-o1",
            1,
            &ShipmentEvent::ShipmentCreated {
                order_id: order_id(),
                shipment_id: "shp_1".into(),
                carrier: "sim".into(),
            },
            "2026-11-22T10:00:03.000Z",
        ),
        recorded(
            "Order-o1",
            2,
            &OrderEvent::OrderCompleted { payment_id: "pay_1".into(), shipment_id: "shp_1".into() },
            "2026-11-22T10:00:04.000Z",
        ),
    ]
}

/// Feeds events as a consumer would: a gap is filled from `all` (the store), then retried.
fn project(order: &[RecordedEvent], all: &[RecordedEvent]) -> OrderView {
    let mut view = OrderView::default();
    for e in order {
        if let Applied::Gap { applied } = view.apply_next(e) {
            for missing in
                all.iter().filter(|m| m.stream_id == e.stream_id && m.version > applied && m.version <= e.version)
            {
                view.apply_next(missing);
            }
        }
    }
    view
}

#[test]
fn duplicates_and_out_of_order_delivery_end_identical_to_a_clean_run() {
    let all = order_events();
    let clean = project(&all, &all);
    assert_eq!(clean.status, "Completed");
    assert_eq!(clean.payment_id.as_deref(), Some("pay_1"));
    assert_eq!(clean.timeline.len(), 5);
    let mut shuffled = all.clone();
    shuffled.reverse();
    shuffled.extend(all.clone());
    assert_eq!(project(&shuffled, &all), clean);
}

#[test]
fn an_older_or_repeated_event_changes_nothing_and_a_gap_is_reported() {
    let all = order_events();
    let mut view = OrderView::default();
    assert_eq!(view.apply_next(&all[0]), Applied::Applied);
    assert_eq!(view.apply_next(&all[0]), Applied::AlreadyApplied);
    assert_eq!(view.apply_next(&all[2]), Applied::Gap { applied: 0 });
    assert_eq!(view.versions["Order-o1"], 1);
}

#[test]
fn inventory_levels_follow_reservations() {
    let mut level = InventoryLevel::default();
    let o = order_id;
    for (v, e) in [
        InventoryEvent::InventoryRestocked { sku: Sku::parse("SKU-1").expect("a sku"), quantity: 10 },
        InventoryEvent::InventoryReserved { order_id: o(), quantity: 3 },
        InventoryEvent::InventoryReservationRejected { order_id: o(), requested: 9, available: 7 },
        InventoryEvent::InventoryReleased { order_id: o(), quantity: 1 },
        InventoryEvent::InventoryCommitted { order_id: o(), quantity: 2 },
    ]
    .iter()
    .enumerate()
    {
        level.apply_next(&recorded("Inventory-SKU-1", v as u64 + 1, e, "2026-11-22T10:00:00Z"));
    }
    let versions = BTreeMap::from([("Inventory-SKU-1".to_owned(), 5)]);
    assert_eq!(level, InventoryLevel { sku: "SKU-1".into(), available: 8, reserved: 0, versions });
}

#[test]
fn daily_sales_count_orders_and_revenue_of_completed_ones() {
    let mut all = order_events();
    all.push(recorded(
        "Order-o2",
        2,
        &OrderEvent::OrderCancelled { reason: "declined".into(), failed_step: "ChargePayment".into() },
        "2026-11-22T11:00:00.000Z",
    ));
    let mut day = DailySales::default();
    for mut delta in all.iter().filter_map(SalesDelta::of) {
        if delta.completed > 0 {
            delta.revenue = placed_total(&all);
        }
        day.add(&delta);
    }
    let revenue_minor = BTreeMap::from([("EUR".to_owned(), 500)]);
    assert_eq!(day, DailySales { day: "2026-11-22".into(), placed: 1, completed: 1, cancelled: 1, revenue_minor });
}

/// Every field a view reads from an event is asserted here, from events built with the domain's
/// types and encoded as the store encodes them: a field renamed in an event breaks the build
/// (the views destructure it) or this test, never a view silently. The JSON the table stores
/// and the query API serves keeps its shape.
#[test]
fn views_hold_what_the_domain_s_events_say_in_the_json_shape_they_are_stored_and_served_in() {
    // Given a completed order's events, and a second order cancelled
    let all = order_events();
    let cancelled = recorded(
        "Order-o2",
        2,
        &OrderEvent::OrderCancelled { reason: "PaymentDeclined: card".into(), failed_step: "ChargePayment".into() },
        "2026-11-22T10:00:05.000Z",
    );
    // When they are projected
    let view = project(&all, &all);
    let mut listed = CustomerOrder::default();
    all.iter().filter(|e| e.stream_id.starts_with("Order-")).for_each(|e| _ = listed.apply_next(e));
    let mut cancelled_view = OrderView::default();
    cancelled_view.apply_next(&recorded("Order-o2", 1, &placed("o2"), "2026-11-22T10:00:00.000Z"));
    cancelled_view.apply_next(&cancelled);

    // Then every field of the views is the events'
    let line = OrderLine { sku: Sku::parse("SKU-A").expect("a sku"), quantity: 2, unit_price_minor: 250 };
    let entry = |e: &RecordedEvent| TimelineEntry {
        at: e.recorded_at.clone(),
        event: e.event_type.clone(),
        stream: e.stream_id.clone(),
        version: e.version,
    };
    let versions = |pairs: &[(&str, u64)]| pairs.iter().map(|(s, v)| ((*s).to_owned(), *v)).collect();
    let expected = OrderView {
        order_id: "o1".into(),
        customer_id: "c1".into(),
        status: ViewStatus::Completed,
        lines: vec![line],
        total: Some(eur(500)),
        payment_id: Some("pay_1".into()),
        refund_id: None,
        shipment_id: Some("shp_1".into()),
        carrier: Some("sim".into()),
        cancellation_reason: None,
        failed_step: None,
        failed_actions: vec![],
        payment_pending_until: None,
        refund_pending_until: None,
        placed_at: "2026-11-22T10:00:00.000Z".into(),
        updated_at: "2026-11-22T10:00:04.000Z".into(),
        timeline: all.iter().map(entry).collect(),
        versions: versions(&[("Order-o1", 2), ("Payment-o1", 2), ("Shipment-o1", 1)]),
    };
    assert_eq!(view, expected);
    assert_eq!(
        (cancelled_view.status, cancelled_view.cancellation_reason.as_deref(), cancelled_view.failed_step.as_deref()),
        (ViewStatus::Cancelled, Some("PaymentDeclined: card"), Some("ChargePayment"))
    );
    assert_eq!(
        listed,
        CustomerOrder {
            order_id: "o1".into(),
            customer_id: "c1".into(),
            status: ViewStatus::Completed,
            total: Some(eur(500)),
            placed_at: "2026-11-22T10:00:00.000Z".into(),
            gsi1pk: Some("CUSTOMER#c1".into()),
            gsi1sk: Some("2026-11-22T10:00:00.000Z#o1".into()),
            versions: versions(&[("Order-o1", 2)]),
        }
    );
    // And the JSON is as before: camelCase, the total as `totalMinor` and `currency`
    let mut json = serde_json::to_value(&view).expect("serializes");
    let timeline = json.as_object_mut().and_then(|o| o.remove("timeline")).expect("a timeline");
    assert_eq!(
        timeline[4],
        json!({ "at": "2026-11-22T10:00:04.000Z", "event": "OrderCompleted", "stream": "Order-o1", "version": 2 })
    );
    assert_eq!(
        json,
        json!({
            "orderId": "o1", "customerId": "c1", "status": "Completed",
            "lines": [{ "sku": "SKU-A", "quantity": 2, "unitPriceMinor": 250 }], "totalMinor": 500, "currency": "EUR",
            "paymentId": "pay_1", "refundId": null, "shipmentId": "shp_1", "carrier": "sim",
            "cancellationReason": null, "failedStep": null, "failedActions": [],
            "placedAt": "2026-11-22T10:00:00.000Z", "updatedAt": "2026-11-22T10:00:04.000Z",
            "versions": { "Order-o1": 2, "Payment-o1": 2, "Shipment-o1": 1 },
        })
    );
    assert_eq!(
        serde_json::to_value(&listed).expect("serializes"),
        json!({
            "orderId": "o1", "customerId": "c1", "status": "Completed", "totalMinor": 500, "currency": "EUR",
            "placedAt": "2026-11-22T10:00:00.000Z", "gsi1pk": "CUSTOMER#c1", "gsi1sk": "2026-11-22T10:00:00.000Z#o1",
            "versions": { "Order-o1": 2 },
        })
    );
    // And a view not placed yet keeps `0` and `""`
    let pending = OrderView::default();
    let json = serde_json::to_value(&pending).expect("serializes");
    assert_eq!((&json["totalMinor"], &json["currency"]), (&json!(0), &json!("")));
    // And each reads back from its DynamoDB item (with its keys and revision) as it was written
    for view in [&view, &pending] {
        let item = ReadModelStore::item(&order_key("o1"), view, 3).expect("an item");
        assert_eq!(&from_item::<OrderView>(item).expect("reads back"), view);
    }
    let item = ReadModelStore::item(&customer_order_key("o1"), &listed, 2).expect("an item");
    assert_eq!(from_item::<CustomerOrder>(item).expect("reads back"), listed);
}

#[test]
fn an_event_that_does_not_decode_or_is_unknown_changes_no_field_of_a_view() {
    // Given a placed order
    let all = order_events();
    let mut view = OrderView::default();
    view.apply_next(&all[0]);
    // When a payment event arrives whose payload is not the domain's, and an unknown event
    let mut damaged = all[2].clone();
    damaged.payload = json!({ "payment": "pay_1" });
    let unknown = event("Payment-o1", 3, "PaymentAudited", json!({}), "2026-11-22T10:00:03.000Z");
    let mut after = view.clone();
    let logs: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::default());
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(|| logs.make_writer()).finish();
    tracing::subscriber::with_default(subscriber, || {
        for e in [&all[1], &damaged, &unknown] {
            assert_eq!(after.apply_next(e), Applied::Applied, "skipped, never a failure");
        }
    });
    // Then the one that does not decode is logged with its stream and version, the unknown one not
    let logs = String::from_utf8(logs.lock().expect("logs").clone()).expect("text");
    assert!(logs.contains("stream=Payment-o1 version=2") && logs.contains("does not decode"), "{logs}");
    assert_eq!(logs.lines().count(), 1, "{logs}");
    // And the view only records that they were seen
    assert_eq!(after.timeline.len(), 4);
    assert_eq!(after.versions["Payment-o1"], 3);
    (after.timeline, after.versions, after.updated_at) =
        (view.timeline.clone(), view.versions.clone(), view.updated_at.clone());
    assert_eq!(after, view);
}

#[test]
fn a_flagged_order_s_view_names_every_step_that_kept_failing_whatever_the_event_s_schema() {
    // Given an order flagged in today's schema, naming two steps that kept failing
    let placed = order_events().remove(0);
    let failures = vec![
        FailedAction::new("CancelShipment", "ServiceUnavailable: carrier down"),
        FailedAction::new("RefundPayment", "ServiceUnavailable: refund of pay_1 failed"),
    ];
    let flagged = recorded(
        "Order-o1",
        2,
        &OrderEvent::OrderFlaggedForManualAction { failures: failures.clone() },
        "2026-11-22T10:00:05.000Z",
    );
    assert_eq!(flagged.schema_version, 2);
    // And one flagged in the first schema (one `failedStep`), stored before the saga ran the rest
    let mut old = flagged.clone();
    (old.stream_id, old.schema_version) = ("Order-o2".into(), 1);
    old.payload = json!({ "failedStep": "RefundPayment", "error": "ServiceUnavailable: refund failed" });

    // When each is projected
    let view = |events: &[&RecordedEvent]| {
        let mut view = OrderView::default();
        for e in events {
            view.apply_next(e);
        }
        view
    };
    let mut old_placed = placed.clone();
    old_placed.stream_id = "Order-o2".into();
    let (new_view, old_view) = (view(&[&placed, &flagged]), view(&[&old_placed, &old]));

    // Then the view shows every failed step with its error, the first as the failed step
    assert_eq!(new_view.status, "NeedsManualAction");
    assert_eq!(new_view.failed_actions, failures);
    assert_eq!(new_view.failed_step.as_deref(), Some("CancelShipment"));
    // And the old event reads as a list of one
    assert_eq!(old_view.status, "NeedsManualAction");
    assert_eq!(old_view.failed_actions, [FailedAction::new("RefundPayment", "ServiceUnavailable: refund failed")]);
    assert_eq!(old_view.failed_step.as_deref(), Some("RefundPayment"));
}

#[test]
fn a_parked_refund_shows_until_when_it_waits_and_clears_once_settled() {
    // Given an order whose refund is parked
    let o = order_id;
    let mut view = OrderView::default();
    for (v, e) in [
        PaymentEvent::PaymentRequested { order_id: o(), amount: eur(500) },
        PaymentEvent::RefundPostponed {
            order_id: o(),
            reason: "breaker open".into(),
            retry_until: "2026-11-23T11:00:00Z".into(),
        },
    ]
    .iter()
    .enumerate()
    {
        view.apply(&recorded("Payment-o1", v as u64 + 1, e, "2026-11-23T10:00:02.000Z"));
    }
    // Then the view says until when it waits
    assert_eq!(view.refund_pending_until.as_deref(), Some("2026-11-23T11:00:00Z"));
    // When the refund is made, then nothing waits any more
    let mut refunded = view.clone();
    let refund = PaymentEvent::PaymentRefunded {
        order_id: o(),
        payment_id: "p1".into(),
        refund_id: "r1".into(),
        amount: eur(500),
    };
    refunded.apply(&recorded("Payment-o1", 3, &refund, "2026-11-23T10:00:03.000Z"));
    assert_eq!((refunded.refund_pending_until, refunded.refund_id.as_deref()), (None, Some("r1")));
    // And when the lost charge is settled as never made (voided), nothing waits either
    view.apply(&recorded(
        "Payment-o1",
        3,
        &PaymentEvent::PaymentDeclined { order_id: o(), reason: "voided".into() },
        "2026-11-23T10:00:03.000Z",
    ));
    assert_eq!(view.refund_pending_until, None);
}

/// Any event a projection may be handed (known types with damaged payloads, unknown types, odd
/// stream ids), in any order: applied without a panic, and the view still serializes.
mod properties {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::readmodel::dead_letters::DeadLetterView;

    fn payload() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(|n| json!(n)),
            ".{0,20}".prop_map(Value::String),
            Just(json!([{ "sku": "A", "quantity": 1 }])),
            Just(json!({ "amountMinor": 1, "currency": "EUR" })),
        ];
        let key = prop::sample::select(vec![
            "orderId",
            "customerId",
            "currency",
            "lines",
            "total",
            "reason",
            "failedStep",
            "failures",
            "retryUntil",
            "paymentId",
            "refundId",
            "shipmentId",
            "sku",
            "quantity",
            "available",
            "deadLetterId",
            "status",
        ]);
        prop::collection::btree_map(key, leaf, 0..6)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
    }

    fn any_event() -> impl Strategy<Value = RecordedEvent> {
        let event_type = prop_oneof![
            prop::sample::select(vec![
                "OrderPlaced",
                "OrderCompleted",
                "OrderCancelled",
                "OrderFlaggedForManualAction",
                "OrderManualActionResolved",
                "PaymentPostponed",
                "PaymentCharged",
                "PaymentDeclined",
                "PaymentRefunded",
                "RefundPostponed",
                "ShipmentCreated",
                "InventoryReserved",
                "InventoryReleased",
                "InventoryRestocked",
                "DeadLetterRecorded",
                "DeadLetterParked",
            ])
            .prop_map(str::to_owned),
            "[A-Za-z]{0,12}",
        ];
        let stream = prop_oneof![
            Just("Order-o1".to_owned()),
            Just("Payment-o1".to_owned()),
            Just("Inventory-A".to_owned()),
            Just("DeadLetter-d1".to_owned()),
            ".{0,12}",
        ];
        (stream, 0u64..5, event_type, payload(), any::<u32>()).prop_map(|(stream, version, event_type, payload, at)| {
            event(&stream, version, &event_type, payload, &format!("2026-11-23T10:00:{:02}.000Z", at % 60))
        })
    }

    fn apply_all<M: ReadModel>(events: &[RecordedEvent]) -> Result<(), TestCaseError> {
        let mut model = M::default();
        for e in events {
            model.apply(e);
        }
        prop_assert!(serde_json::to_value(&model).is_ok());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_events_apply_to_every_view_without_a_panic(events in prop::collection::vec(any_event(), 0..12)) {
            apply_all::<OrderView>(&events)?;
            apply_all::<CustomerOrder>(&events)?;
            apply_all::<InventoryLevel>(&events)?;
            apply_all::<DeadLetterView>(&events)?;
        }
    }
}

#[test]
fn an_order_whose_payment_events_arrive_before_it_is_placed_shows_placed() {
    // Given the payment's and shipment's events delivered before the order's own (other streams)
    let all = order_events();
    let early: Vec<RecordedEvent> = all[1..4].iter().chain(&all[..1]).cloned().collect();
    // When the view is projected in that order
    let view = project(&early, &all);
    // Then the order shows as placed, with what the other streams said kept
    assert_eq!(view.status, ViewStatus::Placed, "not left Pending");
    assert_eq!((view.payment_id.as_deref(), view.shipment_id.as_deref()), (Some("pay_1"), Some("shp_1")));
    // And a payment parked before placement stays pending once placed
    let postponed = PaymentEvent::PaymentPostponed {
        order_id: order_id(),
        amount: eur(500),
        reason: "breaker open".into(),
        retry_until: "2026-11-22T11:00:00Z".into(),
    };
    let parked = recorded("Payment-o1", 1, &postponed, "2026-11-22T10:00:01.000Z");
    let view = project(&[parked, all[0].clone()], &all);
    assert_eq!(view.status, ViewStatus::PaymentPending);
    assert_eq!(view.payment_pending_until.as_deref(), Some("2026-11-22T11:00:00Z"));
    assert_eq!(
        serde_json::to_value(view.status).expect("serializes"),
        json!("PaymentPending"),
        "stored and served by name"
    );
}
