use serde_json::json;

use super::*;

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

fn order_events() -> Vec<RecordedEvent> {
    vec![
        event(
            "Order-o1",
            1,
            "OrderPlaced",
            json!({ "orderId": "o1", "customerId": "c1", "currency": "EUR", "lines": [{"sku": "A"}], "total": { "amountMinor": 500, "currency": "EUR" } }),
            "2026-11-22T10:00:00.000Z",
        ),
        event("Payment-o1", 1, "PaymentRequested", json!({}), "2026-11-22T10:00:01.000Z"),
        event("Payment-o1", 2, "PaymentCharged", json!({ "paymentId": "pay_1" }), "2026-11-22T10:00:02.000Z"),
        event(
            "Shipment-o1",
            1,
            "ShipmentCreated",
            json!({ "shipmentId": "shp_1", "carrier": "sim" }),
            "2026-11-22T10:00:03.000Z",
        ),
        event("Order-o1", 2, "OrderCompleted", json!({}), "2026-11-22T10:00:04.000Z"),
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
    for (v, t, q) in [
        (1, "InventoryRestocked", 10),
        (2, "InventoryReserved", 3),
        (3, "InventoryReleased", 1),
        (4, "InventoryCommitted", 2),
    ] {
        level.apply_next(&event("Inventory-SKU-1", v, t, json!({ "quantity": q }), "2026-11-22T10:00:00Z"));
    }
    assert_eq!((level.sku.as_str(), level.available, level.reserved), ("SKU-1", 8, 0));
}

#[test]
fn daily_sales_count_orders_and_revenue_of_completed_ones() {
    let all = order_events();
    let mut day = DailySales::default();
    for e in &all {
        if let Some(delta) = SalesDelta::of(e, Some(&all[0])) {
            day.add(&delta);
        }
    }
    assert_eq!((day.day.as_str(), day.placed, day.completed, day.cancelled), ("2026-11-22", 1, 1, 0));
    assert_eq!(day.revenue_minor["EUR"], 500);
}

#[test]
fn a_flagged_order_s_view_names_every_step_that_kept_failing_whatever_the_event_s_schema() {
    // Given an order flagged in today's schema, naming two steps that kept failing
    let placed = order_events().remove(0);
    let mut flagged = event(
        "Order-o1",
        2,
        "OrderFlaggedForManualAction",
        json!({ "failures": [
            { "step": "CancelShipment", "error": "ServiceUnavailable: carrier down" },
            { "step": "RefundPayment", "error": "ServiceUnavailable: refund of pay_1 failed" },
        ] }),
        "2026-11-22T10:00:05.000Z",
    );
    flagged.schema_version = 2;
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
    let steps = |v: &OrderView| v.failed_actions.iter().map(|f| f.step.clone()).collect::<Vec<_>>();
    assert_eq!(steps(&new_view), ["CancelShipment", "RefundPayment"]);
    assert_eq!(new_view.failed_actions[1].error, "ServiceUnavailable: refund of pay_1 failed");
    assert_eq!(new_view.failed_step.as_deref(), Some("CancelShipment"));
    // And the old event reads as a list of one
    assert_eq!(old_view.status, "NeedsManualAction");
    assert_eq!(old_view.failed_actions, [FailedAction::new("RefundPayment", "ServiceUnavailable: refund failed")]);
    assert_eq!(old_view.failed_step.as_deref(), Some("RefundPayment"));
}

#[test]
fn a_parked_refund_shows_until_when_it_waits_and_clears_once_settled() {
    // Given an order whose refund is parked
    let parked = |order: &str| {
        let stream = format!("Payment-{order}");
        vec![
            event(&stream, 1, "PaymentRequested", json!({}), "2026-11-23T10:00:01.000Z"),
            event(
                &stream,
                2,
                "RefundPostponed",
                json!({ "retryUntil": "2026-11-23T11:00:00Z" }),
                "2026-11-23T10:00:02.000Z",
            ),
        ]
    };
    let mut view = OrderView::default();
    parked("o1").iter().for_each(|e| view.apply(e));
    // Then the view says until when it waits
    assert_eq!(view.refund_pending_until.as_deref(), Some("2026-11-23T11:00:00Z"));
    // When the refund is made, then nothing waits any more
    let mut refunded = view.clone();
    refunded.apply(&event("Payment-o1", 3, "PaymentRefunded", json!({ "refundId": "r1" }), "2026-11-23T10:00:03.000Z"));
    assert_eq!((refunded.refund_pending_until, refunded.refund_id.as_deref()), (None, Some("r1")));
    // And when the lost charge is settled as never made (voided), nothing waits either
    view.apply(&event("Payment-o1", 3, "PaymentDeclined", json!({ "reason": "voided" }), "2026-11-23T10:00:03.000Z"));
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
    let parked = event(
        "Payment-o1",
        1,
        "PaymentPostponed",
        json!({ "retryUntil": "2026-11-22T11:00:00Z" }),
        "2026-11-22T10:00:01.000Z",
    );
    let view = project(&[parked, all[0].clone()], &all);
    assert_eq!(view.status, ViewStatus::PaymentPending);
    assert_eq!(
        serde_json::to_value(view.status).expect("serializes"),
        json!("PaymentPending"),
        "stored and served by name"
    );
}
