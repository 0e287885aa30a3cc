//! Every saga step and compensation (`steps`), one at a time, as its Lambda runs it: the command
//! goes in as an SQS message through the step Lambdas' edge (`runtime::process_batch`), the step
//! works over the in-memory event store and scripted external services, and its answer to the
//! state machine is recorded.
//!
//! Each test reads given / when / then: given the streams (events appended before) and the
//! services' answers (queued per call: a call with none queued fails the test); when a command
//! is delivered, or delivered again (SQS redelivers the same message, with the same task token);
//! then these events are in these streams at these versions, the services were called so, and
//! the state machine was told this. Error names are checked against the state machine's own
//! definition (`statemachine/order-saga.asl.json`): the Catch that takes them, whether a Retry
//! does first, and whether they end in manual action.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_lambda_events::event::sqs::SqsEvent;
use serde_json::{Value, json};

use crate::aggregate::{Aggregate, Repository, decode_event, encode_event};
use crate::deadline::Deadline;
use crate::domain::inventory::{Inventory, InventoryEvent};
use crate::domain::order::{Address, FailedAction, LineRequest, Order, OrderEvent, OrderRequest, PlaceOrder};
use crate::domain::payment::{Payment, PaymentEvent};
use crate::domain::services::{
    Carrier, ChargeOutcome, Notifier, NotifyOutcome, PaymentGateway, RefundOutcome, ShipmentOutcome, Unavailable, Why,
};
use crate::domain::shipment::{Shipment, ShipmentEvent};
use crate::domain::{Currency, Money, OrderId, Sku};
use crate::eventstore::{EventStore, InMemoryEventStore, NewEvent, StreamId};
use crate::lambda::batch::KeptDeadLetters;
use crate::lambda::steps::{CallbackError, Delivery, TaskCallback, process_batch};
use crate::retry::RetryPolicy;
use crate::saga::errors::*;
use crate::saga::steps::{self, Parking};
use crate::saga::{Failure, Step, StepError, StepMessage, StepOutcome};

// ---------------------------------------------------------------------------------------------
// Scripted external services: one double per service trait.

/// A call an external service received, as its double saw it (with its idempotency key).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Charge { key: String, amount: Money, token: String },
    Void { key: String, charge_key: String },
    Refund { key: String, payment_id: String, amount: Money },
    Book { key: String, items: u32 },
    CancelBooking { key: String, shipment_id: String },
    Notify { key: String, customer: String },
}

/// Answers queued for one operation, taken one per call. A call with no answer queued fails the
/// test: a step that calls a service it should not have (a redelivery charging again) is caught.
struct Script<T>(Mutex<VecDeque<T>>);

impl<T> Default for Script<T> {
    fn default() -> Self {
        Self(Mutex::new(VecDeque::new()))
    }
}

impl<T> Script<T> {
    fn then(&self, answer: T) {
        self.0.lock().expect("lock").push_back(answer);
    }

    fn next(&self, operation: &str) -> T {
        let answer = self.0.lock().expect("lock").pop_front();
        answer.unwrap_or_else(|| panic!("unexpected call: no answer scripted for {operation}"))
    }

    fn left(&self) -> usize {
        self.0.lock().expect("lock").len()
    }
}

#[derive(Default)]
struct Calls(Mutex<Vec<Call>>);

impl Calls {
    fn push(&self, call: Call) {
        self.0.lock().expect("lock").push(call);
    }

    fn all(&self) -> Vec<Call> {
        self.0.lock().expect("lock").clone()
    }
}

#[derive(Default)]
struct ScriptedGateway {
    charges: Script<Result<ChargeOutcome, Unavailable>>,
    voids: Script<Result<ChargeOutcome, Unavailable>>,
    refunds: Script<Result<RefundOutcome, Unavailable>>,
    calls: Calls,
}

impl PaymentGateway for ScriptedGateway {
    async fn charge(&self, key: &str, amount: Money, token: &str) -> Result<ChargeOutcome, Unavailable> {
        self.calls.push(Call::Charge { key: key.into(), amount, token: token.into() });
        self.charges.next("charge")
    }

    async fn refund(&self, key: &str, payment_id: &str, amount: Money) -> Result<RefundOutcome, Unavailable> {
        self.calls.push(Call::Refund { key: key.into(), payment_id: payment_id.into(), amount });
        self.refunds.next("refund")
    }

    async fn void_charge(&self, key: &str, charge_key: &str) -> Result<ChargeOutcome, Unavailable> {
        self.calls.push(Call::Void { key: key.into(), charge_key: charge_key.into() });
        self.voids.next("void_charge")
    }
}

#[derive(Default)]
struct ScriptedCarrier {
    bookings: Script<Result<ShipmentOutcome, Unavailable>>,
    cancellations: Script<Result<(), Unavailable>>,
    calls: Calls,
}

impl Carrier for ScriptedCarrier {
    async fn create_shipment(&self, key: &str, _address: &Address, items: u32) -> Result<ShipmentOutcome, Unavailable> {
        self.calls.push(Call::Book { key: key.into(), items });
        self.bookings.next("create_shipment")
    }

    async fn cancel_shipment(&self, key: &str, shipment_id: &str) -> Result<(), Unavailable> {
        self.calls.push(Call::CancelBooking { key: key.into(), shipment_id: shipment_id.into() });
        self.cancellations.next("cancel_shipment")
    }
}

#[derive(Default)]
struct ScriptedNotifier {
    notifications: Script<Result<NotifyOutcome, Unavailable>>,
    calls: Calls,
}

impl Notifier for ScriptedNotifier {
    async fn notify(&self, key: &str, customer: &str, _message: &str) -> Result<NotifyOutcome, Unavailable> {
        self.calls.push(Call::Notify { key: key.into(), customer: customer.into() });
        self.notifications.next("notify")
    }
}

fn down(service: &'static str) -> Unavailable {
    Unavailable::new(service, Why::Failed, "503 Service Unavailable")
}

fn timed_out(service: &'static str) -> Unavailable {
    Unavailable::new(service, Why::TimedOut, "no answer in 2s")
}

// ---------------------------------------------------------------------------------------------
// The recording task callback (Step Functions' SendTaskSuccess / SendTaskFailure).

/// An answer sent to the state machine.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Succeeded { token: String, output: Value },
    Failed { token: String, error: String, cause: String },
}

impl Answer {
    fn output(&self) -> &Value {
        match self {
            Answer::Succeeded { output, .. } => output,
            Answer::Failed { error, cause, .. } => panic!("expected a success, the step failed: {error}: {cause}"),
        }
    }

    fn failure(&self) -> (&str, &str) {
        match self {
            Answer::Failed { error, cause, .. } => (error, cause),
            Answer::Succeeded { output, .. } => panic!("expected a failure, the step succeeded: {output}"),
        }
    }
}

#[derive(Default)]
struct RecordingCallback {
    answers: Mutex<Vec<Answer>>,
    /// Tasks that have ended: answering them is tolerated (`AlreadyClosed`).
    closed: Mutex<HashSet<String>>,
}

impl RecordingCallback {
    fn delivery(&self, token: &str) -> Delivery {
        if self.closed.lock().expect("lock").contains(token) { Delivery::AlreadyClosed } else { Delivery::Delivered }
    }
}

impl TaskCallback for RecordingCallback {
    async fn succeed(&self, token: &str, output: &Value) -> Result<Delivery, CallbackError> {
        self.answers.lock().expect("lock").push(Answer::Succeeded { token: token.into(), output: output.clone() });
        Ok(self.delivery(token))
    }

    async fn fail(&self, token: &str, error: &str, cause: &str) -> Result<Delivery, CallbackError> {
        let answer = Answer::Failed { token: token.into(), error: error.into(), cause: cause.into() };
        self.answers.lock().expect("lock").push(answer);
        Ok(self.delivery(token))
    }
}

// ---------------------------------------------------------------------------------------------
// The world a step runs in, and how a command is delivered to it.

const ORDER: &str = "ord-1";
const RED: &str = "SKU-RED";
const BLUE: &str = "SKU-BLUE";
const TRACE: &str = "Root=1-6740d3c0-5f2b7e9a1c3d4e5f6a7b8c9d;Parent=3f1e2d4c5b6a7980;Sampled=1";

/// Two of SKU-RED at 12.50 and one SKU-BLUE at 9.99: 34.99 EUR, three items.
fn order() -> PlaceOrder {
    OrderRequest {
        order_id: ORDER.into(),
        customer_id: "cust-1".into(),
        currency: "EUR".into(),
        lines: vec![
            LineRequest { sku: RED.into(), quantity: 2, unit_price_minor: 1_250 },
            LineRequest { sku: BLUE.into(), quantity: 1, unit_price_minor: 999 },
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
    .validate()
    .expect("a valid order")
}

fn total() -> Money {
    Money::new(3_499, Currency::EUR)
}

/// The command the state machine's task for `step` sends, with its task token.
fn command(step: Step) -> StepMessage {
    StepMessage {
        task_token: format!("token-{step:?}"),
        step,
        order: order(),
        failed_step: None,
        failure: None,
        failures: BTreeMap::new(),
        correlation_id: Some("corr-1".into()),
        trace_header: Some(TRACE.into()),
    }
}

/// The same step as a later task of the same execution (after a Wait, say): another token.
fn next_task(msg: &StepMessage, n: u32) -> StepMessage {
    StepMessage { task_token: format!("{}-{n}", msg.task_token), ..msg.clone() }
}

struct World {
    repo: Repository<InMemoryEventStore>,
    gateway: ScriptedGateway,
    carrier: ScriptedCarrier,
    notifier: ScriptedNotifier,
    callback: RecordingCallback,
    dead_letters: KeptDeadLetters,
    parking: Parking,
    deliveries: AtomicUsize,
}

fn world() -> World {
    // Conflicts are retried quickly: a test's time is not spent in backoff.
    let retry =
        RetryPolicy { max_attempts: 5, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(2) };
    World {
        repo: Repository::new(InMemoryEventStore::new()).with_retry(retry),
        gateway: ScriptedGateway::default(),
        carrier: ScriptedCarrier::default(),
        notifier: ScriptedNotifier::default(),
        callback: RecordingCallback::default(),
        dead_letters: KeptDeadLetters::default(),
        parking: Parking { limit: Duration::from_secs(3_600), retry: Duration::from_secs(5) },
        deliveries: AtomicUsize::new(0),
    }
}

impl World {
    /// Given: `events` appended to `A`'s stream `id`, after what it holds.
    async fn given<A: Aggregate>(&self, id: &str, events: impl IntoIterator<Item = A::Event>) {
        let events: Vec<NewEvent> = events.into_iter().map(|e| encode_event(&e).expect("encodes")).collect();
        self.append(&StreamId::new(A::CATEGORY, id).expect("stream id"), events).await;
    }

    async fn append(&self, stream: &StreamId, events: Vec<NewEvent>) {
        if events.is_empty() {
            return;
        }
        let head = self.repo.store().head_version(stream).await.expect("head");
        self.repo.store().append(stream, head, events, None).await.expect("given events appended");
    }

    /// SKU-RED and SKU-BLUE with this stock.
    async fn given_stock(&self, red: u32, blue: u32) {
        self.given::<Inventory>(RED, [restocked(RED, red)]).await;
        self.given::<Inventory>(BLUE, [restocked(BLUE, blue)]).await;
    }

    /// The order's lines reserved (stock 5 and 3).
    async fn given_reserved(&self) {
        self.given::<Inventory>(RED, [restocked(RED, 5), reserved(2)]).await;
        self.given::<Inventory>(BLUE, [restocked(BLUE, 3), reserved(1)]).await;
    }

    /// When: `msg` is delivered to its step's Lambda, as one SQS message. Its answer to the state
    /// machine, or none when the message was left on the queue for redelivery.
    async fn deliver(&self, msg: &StepMessage) -> Option<Answer> {
        let n = self.deliveries.fetch_add(1, Ordering::SeqCst) + 1;
        let body = serde_json::to_string(msg).expect("serializes");
        let event: SqsEvent = serde_json::from_value(json!({
            "Records": [{ "messageId": format!("m{n}"), "body": body, "eventSource": "aws:sqs" }]
        }))
        .expect("an SQS event");
        let before = self.answers().len();
        let response =
            process_batch(event, &Deadline::never(), &[msg.step], &self.callback, &self.dead_letters, |msg| {
                self.run(msg)
            })
            .await;
        assert!(self.dead_letters.reasons().is_empty(), "dead-lettered: {:?}", self.dead_letters.reasons());
        let answers = self.answers();
        let left_on_queue = !response.batch_item_failures.is_empty();
        match &answers[before..] {
            [] => {
                assert!(left_on_queue, "neither answered nor left for redelivery");
                None
            }
            [answer] => {
                assert!(!left_on_queue, "answered, and still left for redelivery");
                Some(answer.clone())
            }
            more => panic!("answered {} times: {more:?}", more.len()),
        }
    }

    /// Delivers `msg` and expects an answer (not a redelivery), to the task of its token.
    async fn answer(&self, msg: &StepMessage) -> Answer {
        let answer = self.deliver(msg).await.expect("an answer to the state machine, not a redelivery");
        let token = match &answer {
            Answer::Succeeded { token, .. } | Answer::Failed { token, .. } => token,
        };
        assert_eq!(token, &msg.task_token, "answered another task");
        answer
    }

    /// The step Lambdas' wiring (`functions/*/src/lib.rs`): each step with its services.
    async fn run(&self, msg: StepMessage) -> Result<StepOutcome, StepError> {
        let (repo, parking) = (&self.repo, &self.parking);
        match msg.step {
            Step::ReserveInventory => steps::reserve_inventory(repo, &msg).await,
            Step::ChargePayment => steps::charge_payment(repo, &self.gateway, parking, &msg).await,
            Step::CreateShipment => steps::create_shipment(repo, &self.carrier, &msg).await,
            Step::SendNotification => steps::send_notification(repo, &self.notifier, &msg).await,
            Step::ReleaseInventory => steps::release_inventory(repo, &msg).await,
            Step::RefundPayment => steps::refund_payment(repo, &self.gateway, parking, &msg).await,
            Step::CancelShipment => steps::cancel_shipment(repo, &self.carrier, &msg).await,
            Step::CompleteOrder => steps::complete_order(repo, &msg).await,
            Step::CancelOrder => steps::cancel_order(repo, &msg).await,
            Step::FlagForManualAction => steps::flag_for_manual_action(repo, &msg).await,
        }
    }

    fn answers(&self) -> Vec<Answer> {
        self.callback.answers.lock().expect("lock").clone()
    }

    /// Then: the events of `A`'s stream `id`, with their versions.
    async fn events<A: Aggregate>(&self, id: &str) -> Vec<(u64, A::Event)> {
        let stream = StreamId::new(A::CATEGORY, id).expect("stream id");
        let recorded = self.repo.store().load(&stream, 0).await.expect("load");
        recorded.iter().map(|r| (r.version, decode_event::<A::Event>(r).expect("decodes"))).collect()
    }

    /// The events of the stream from `version` on (what the step appended after the givens).
    async fn events_from<A: Aggregate>(&self, id: &str, version: u64) -> Vec<(u64, A::Event)> {
        self.events::<A>(id).await.into_iter().filter(|(v, _)| *v >= version).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Events, in the order's terms.

fn order_id() -> OrderId {
    OrderId::parse(ORDER).expect("order id")
}

fn restocked(sku: &str, quantity: u32) -> InventoryEvent {
    InventoryEvent::InventoryRestocked { sku: Sku::parse(sku).expect("sku"), quantity }
}

fn reserved(quantity: u32) -> InventoryEvent {
    InventoryEvent::InventoryReserved { order_id: order_id(), quantity }
}

fn released(quantity: u32) -> InventoryEvent {
    InventoryEvent::InventoryReleased { order_id: order_id(), quantity }
}

fn committed(quantity: u32) -> InventoryEvent {
    InventoryEvent::InventoryCommitted { order_id: order_id(), quantity }
}

fn payment_requested() -> PaymentEvent {
    PaymentEvent::PaymentRequested { order_id: order_id(), amount: total() }
}

fn payment_charged(payment_id: &str) -> PaymentEvent {
    PaymentEvent::PaymentCharged { order_id: order_id(), payment_id: payment_id.into(), amount: total() }
}

fn payment_declined(reason: &str) -> PaymentEvent {
    PaymentEvent::PaymentDeclined { order_id: order_id(), reason: reason.into() }
}

fn payment_refunded(payment_id: &str, refund_id: &str) -> PaymentEvent {
    PaymentEvent::PaymentRefunded {
        order_id: order_id(),
        payment_id: payment_id.into(),
        refund_id: refund_id.into(),
        amount: total(),
    }
}

fn shipment_requested() -> ShipmentEvent {
    ShipmentEvent::ShipmentRequested { order_id: order_id() }
}

fn shipment_created(shipment_id: &str) -> ShipmentEvent {
    ShipmentEvent::ShipmentCreated { order_id: order_id(), shipment_id: shipment_id.into(), carrier: "DHL".into() }
}

fn order_placed() -> OrderEvent {
    OrderEvent::OrderPlaced(order())
}

fn charge_call() -> Call {
    Call::Charge { key: "charge-ord-1".into(), amount: total(), token: "tok_visa".into() }
}

fn refund_call(payment_id: &str) -> Call {
    Call::Refund { key: "refund-ord-1".into(), payment_id: payment_id.into(), amount: total() }
}

fn booking_call() -> Call {
    Call::Book { key: "ship-ord-1".into(), items: 3 }
}

fn succeeded(msg: &StepMessage, output: Value) -> Answer {
    Answer::Succeeded { token: msg.task_token.clone(), output }
}

fn failed(msg: &StepMessage, error: &str, cause: &str) -> Answer {
    Answer::Failed { token: msg.task_token.clone(), error: error.into(), cause: cause.into() }
}

// ---------------------------------------------------------------------------------------------
// The state machine's definition: what it does with a task's error.

fn asl() -> Value {
    serde_json::from_str(include_str!("../../../statemachine/order-saga.asl.json")).expect("the state machine")
}

fn matches_error(errors: &Value, error: &str) -> bool {
    errors.as_array().expect("ErrorEquals").iter().any(|e| e == error || e == "States.ALL")
}

/// What task `state` does when it fails with `error`: whether a Retry takes it first, then the
/// Catch that takes it (its `Next` and `ResultPath`).
#[derive(Debug, PartialEq)]
struct Route {
    retried: bool,
    next: String,
    result_path: String,
}

fn route(state: &str, error: &str) -> Route {
    let asl = asl();
    let task = &asl["States"][state];
    assert_eq!(task["Type"], "Task", "{state} is a task of the state machine");
    let retried =
        task["Retry"].as_array().is_some_and(|retries| retries.iter().any(|r| matches_error(&r["ErrorEquals"], error)));
    let catch = task["Catch"]
        .as_array()
        .and_then(|catches| catches.iter().find(|c| matches_error(&c["ErrorEquals"], error)))
        .unwrap_or_else(|| panic!("{state} catches no {error}"));
    Route {
        retried,
        next: catch["Next"].as_str().expect("Next").into(),
        result_path: catch["ResultPath"].as_str().expect("ResultPath").into(),
    }
}

/// The business answer `error` of task `state` is caught (not retried) and goes to `next`.
#[track_caller]
fn assert_caught(state: &str, error: &str, next: &str) {
    assert_eq!(
        route(state, error),
        Route { retried: false, next: next.into(), result_path: "$.failure".into() },
        "how the state machine takes {error} from {state}"
    );
}

/// The error `error` of task `state`, once its retries are spent, is recorded as the step's
/// failure and the order ends flagged for manual action (at once, or after the remaining
/// compensations, by the `AnyCompensationFailed` choice).
#[track_caller]
fn assert_routes_to_manual_action(state: &str, error: &str, retried: bool) {
    let route = route(state, error);
    assert_eq!(route.retried, retried, "whether {state} retries {error}");
    assert_eq!(route.result_path, format!("$.compensationFailures.{state}"), "{state} records {error}");
    if route.next == "FlagForManualAction" {
        return;
    }
    // The next compensations run, then the choice flags the order if this one failed.
    let asl = asl();
    let choice = &asl["States"]["AnyCompensationFailed"]["Choices"][0];
    assert_eq!(choice["Next"], "FlagForManualAction");
    let flagged = choice["Or"].as_array().expect("Or").iter().any(|c| c["Variable"] == route.result_path.as_str());
    assert!(flagged, "AnyCompensationFailed flags on {}", route.result_path);
}

// ---------------------------------------------------------------------------------------------
// ReserveInventory

#[tokio::test]
async fn reserve_inventory_reserves_every_line_on_its_sku_stream() {
    // Given stock for both lines
    let w = world();
    w.given_stock(5, 3).await;
    // When the order's stock is reserved
    let msg = command(Step::ReserveInventory);
    let answer = w.answer(&msg).await;
    // Then each SKU's stream records its line's reservation, after the restock
    assert_eq!(w.events::<Inventory>(RED).await, [(1, restocked(RED, 5)), (2, reserved(2))]);
    assert_eq!(w.events::<Inventory>(BLUE).await, [(1, restocked(BLUE, 3)), (2, reserved(1))]);
    // And the state machine is told the lines reserved
    assert_eq!(answer, succeeded(&msg, json!({ "reserved": 2 })));
}

#[tokio::test]
async fn reserve_inventory_short_of_stock_gives_back_what_it_took_and_fails_inventory_unavailable() {
    // Given one SKU-RED in stock, where the order wants two
    let w = world();
    w.given_stock(1, 3).await;
    // When the order's stock is reserved
    let msg = command(Step::ReserveInventory);
    let answer = w.answer(&msg).await;
    // Then SKU-RED records the rejection, and SKU-BLUE's reservation is released again
    let rejected = InventoryEvent::InventoryReservationRejected { order_id: order_id(), requested: 2, available: 1 };
    assert_eq!(w.events::<Inventory>(RED).await, [(1, restocked(RED, 1)), (2, rejected)]);
    assert_eq!(w.events::<Inventory>(BLUE).await, [(1, restocked(BLUE, 3)), (2, reserved(1)), (3, released(1))]);
    // And the step fails with the business error the state machine catches: nothing to
    // compensate, the order is cancelled
    assert_eq!(answer, failed(&msg, INVENTORY_UNAVAILABLE, "insufficient stock: SKU-RED: 2 requested, 1 available"));
    assert_caught("ReserveInventory", INVENTORY_UNAVAILABLE, "ReserveInventoryFailed");
    assert_eq!(asl()["States"]["ReserveInventoryFailed"]["Next"], "CancelOrder");
}

#[tokio::test]
async fn reserve_inventory_redelivered_reserves_once_and_answers_the_same() {
    // Given an order whose stock was reserved
    let w = world();
    w.given_stock(5, 3).await;
    let msg = command(Step::ReserveInventory);
    let first = w.answer(&msg).await;
    // When the same command is delivered again
    let second = w.answer(&msg).await;
    // Then nothing more is reserved, and the answer is the same
    assert_eq!(w.events::<Inventory>(RED).await, [(1, restocked(RED, 5)), (2, reserved(2))]);
    assert_eq!(w.events::<Inventory>(BLUE).await, [(1, restocked(BLUE, 3)), (2, reserved(1))]);
    assert_eq!(second, first);
}

#[tokio::test]
async fn reserve_inventory_redelivered_after_a_shortage_fails_again_and_takes_nothing() {
    // Given an order refused for want of SKU-RED, and SKU-RED restocked since
    let w = world();
    w.given_stock(1, 3).await;
    let msg = command(Step::ReserveInventory);
    w.answer(&msg).await;
    w.given::<Inventory>(RED, [restocked(RED, 10)]).await;
    // When the same command is delivered again
    let again = w.answer(&msg).await;
    // Then the rejection stands: nothing is reserved or released anew
    assert_eq!(w.events_from::<Inventory>(RED, 3).await, [(3, restocked(RED, 10))]);
    assert_eq!(w.events::<Inventory>(BLUE).await.len(), 3);
    // And it fails the same way (its cause names the released line too)
    let (error, cause) = again.failure();
    assert_eq!(error, INVENTORY_UNAVAILABLE);
    assert!(cause.starts_with("insufficient stock: SKU-RED: 2 requested"), "{cause}");
}

#[tokio::test]
async fn a_step_s_events_carry_the_saga_s_correlation_its_step_and_the_trace() {
    // Given stock
    let w = world();
    w.given_stock(5, 3).await;
    // When the order's stock is reserved
    w.answer(&command(Step::ReserveInventory)).await;
    // Then the reservation is recorded with the saga's correlation id, the step that caused
    // it, and the X-Ray trace the order was placed in
    let stream = StreamId::new("Inventory", RED).expect("stream");
    let recorded = w.repo.store().load(&stream, 1).await.expect("load");
    let [reservation] = &recorded[..] else { panic!("one reservation: {recorded:?}") };
    assert_eq!(
        (reservation.correlation_id.as_str(), reservation.causation_id.as_deref(), reservation.trace_header.as_deref()),
        ("corr-1", Some("ReserveInventory"), Some(TRACE))
    );
}

// ---------------------------------------------------------------------------------------------
// ChargePayment

#[tokio::test]
async fn charge_payment_records_the_request_then_the_charge() {
    // Given a gateway that charges
    let w = world();
    w.gateway.charges.then(Ok(ChargeOutcome::Charged { payment_id: "pay-1".into() }));
    // When the order is charged
    let msg = command(Step::ChargePayment);
    let answer = w.answer(&msg).await;
    // Then the request is recorded before the charge, on the order's payment stream
    assert_eq!(w.events::<Payment>(ORDER).await, [(1, payment_requested()), (2, payment_charged("pay-1"))]);
    // And the gateway was asked once, for the total, under the order's charge key
    assert_eq!(w.gateway.calls.all(), [charge_call()]);
    assert_eq!(answer, succeeded(&msg, json!({ "paymentId": "pay-1", "amountMinor": 3_499 })));
}

#[tokio::test]
async fn charge_payment_declined_records_the_decline_and_fails_payment_declined() {
    // Given a gateway that declines the card
    let w = world();
    w.gateway.charges.then(Ok(ChargeOutcome::Declined { reason: "card declined".into() }));
    // When the order is charged
    let msg = command(Step::ChargePayment);
    let answer = w.answer(&msg).await;
    // Then the decline is recorded
    assert_eq!(w.events::<Payment>(ORDER).await, [(1, payment_requested()), (2, payment_declined("card declined"))]);
    // And the step fails with the business error the state machine catches: only the stock is
    // given back (nothing was charged)
    assert_eq!(answer, failed(&msg, PAYMENT_DECLINED, "card declined"));
    assert_caught("ChargePayment", PAYMENT_DECLINED, "ChargePaymentFailed");
    assert_eq!(asl()["States"]["ChargePaymentFailed"]["Next"], "ReleaseInventory");
    // And a redelivery declines again without asking the gateway
    assert_eq!(w.answer(&msg).await, answer);
    assert_eq!(w.gateway.calls.all(), [charge_call()]);
    assert_eq!(w.events::<Payment>(ORDER).await.len(), 2);
}

#[tokio::test]
async fn charge_payment_redelivered_charges_once_and_answers_the_same() {
    // Given an order charged
    let w = world();
    w.gateway.charges.then(Ok(ChargeOutcome::Charged { payment_id: "pay-1".into() }));
    let msg = command(Step::ChargePayment);
    let first = w.answer(&msg).await;
    // When the same command is delivered again (no second answer is scripted: a second charge
    // would fail the test)
    let second = w.answer(&msg).await;
    // Then the gateway was asked once, the charge recorded once, and the answer is the same
    assert_eq!(w.gateway.calls.all(), [charge_call()]);
    assert_eq!(w.events::<Payment>(ORDER).await, [(1, payment_requested()), (2, payment_charged("pay-1"))]);
    assert_eq!(second, first);
}

#[tokio::test]
async fn charge_payment_while_the_gateway_is_down_parks_the_order_then_charges_with_the_same_key() {
    // Given a gateway that is down, then charges
    let w = world();
    w.gateway.charges.then(Err(down("payment gateway")));
    w.gateway.charges.then(Ok(ChargeOutcome::Charged { payment_id: "pay-1".into() }));
    // When the order is charged
    let msg = command(Step::ChargePayment);
    let parked = w.answer(&msg).await;
    // Then the payment is recorded as postponed, with the time it may wait until
    let events = w.events::<Payment>(ORDER).await;
    let [(1, requested), (2, PaymentEvent::PaymentPostponed { reason, retry_until, .. })] = &events[..] else {
        panic!("requested, then postponed: {events:?}")
    };
    assert_eq!(requested, &payment_requested());
    assert_eq!(reason, "payment gateway unavailable: 503 Service Unavailable");
    // And the state machine is told to wait (the retry interval, with up to a quarter of
    // jitter) and try again: the choice after the task reads `pending`
    let output = parked.output();
    assert_eq!((&output["pending"], &output["retryUntil"]), (&json!(true), &json!(retry_until)));
    let wait = output["retryInSeconds"].as_u64().expect("retryInSeconds");
    assert!((5..=6).contains(&wait), "waits {wait}s");
    let until = time::OffsetDateTime::parse(retry_until, &time::format_description::well_known::Rfc3339)
        .expect("an RFC 3339 deadline");
    assert!(until > time::OffsetDateTime::now_utc() + Duration::from_secs(3_500), "{retry_until}");
    assert_eq!(asl()["States"]["WaitForPaymentProvider"]["SecondsPath"], "$.results.payment.retryInSeconds");

    // When the state machine tries again (a new task) and the gateway is back
    let retry = next_task(&msg, 2);
    let answer = w.answer(&retry).await;
    // Then the charge is recorded after the postponement, and was made with the same key
    assert_eq!(w.events_from::<Payment>(ORDER, 3).await, [(3, payment_charged("pay-1"))]);
    assert_eq!(w.gateway.calls.all(), [charge_call(), charge_call()]);
    assert_eq!(answer, succeeded(&retry, json!({ "paymentId": "pay-1", "amountMinor": 3_499 })));
}

#[tokio::test]
async fn charge_payment_with_the_gateway_s_breaker_open_waits_for_its_recovery_time() {
    // Given a gateway whose circuit breaker is open for 30 s more (the gateway is not called)
    let w = world();
    let open =
        Unavailable::new("payment gateway", Why::CircuitOpen, "circuit open").retry_after(Duration::from_secs(30));
    w.gateway.charges.then(Err(open));
    // When the order is charged
    let msg = command(Step::ChargePayment);
    let answer = w.answer(&msg).await;
    // Then the order is parked, and waits the breaker's recovery time (with up to a quarter of
    // jitter), not the retry interval
    assert!(matches!(&w.events::<Payment>(ORDER).await[..], [(1, _), (2, PaymentEvent::PaymentPostponed { .. })]));
    let wait = answer.output()["retryInSeconds"].as_u64().expect("retryInSeconds");
    assert!((30..=37).contains(&wait), "waits {wait}s");
}

#[tokio::test]
async fn charge_payment_whose_answer_was_lost_asks_the_gateway_again_with_the_same_key() {
    // Given a charge requested, whose answer was never recorded (the handler died)
    let w = world();
    w.given::<Payment>(ORDER, [payment_requested()]).await;
    w.gateway.charges.then(Ok(ChargeOutcome::Charged { payment_id: "pay-1".into() }));
    // When the command is redelivered
    let msg = command(Step::ChargePayment);
    let answer = w.answer(&msg).await;
    // Then the gateway is asked under the same key (it answers the charge it made), and the
    // charge is recorded after the request, not requested twice
    assert_eq!(w.gateway.calls.all(), [charge_call()]);
    assert_eq!(w.events::<Payment>(ORDER).await, [(1, payment_requested()), (2, payment_charged("pay-1"))]);
    assert_eq!(answer.output()["paymentId"], "pay-1");
}

#[tokio::test]
async fn charge_payment_parked_past_its_limit_fails_payment_provider_unavailable_and_is_compensated() {
    // Given an order parked until a time now past, and a gateway that still does not answer
    let w = world();
    let postponed = PaymentEvent::PaymentPostponed {
        order_id: order_id(),
        amount: total(),
        reason: "payment gateway unavailable".into(),
        retry_until: "2020-01-01T00:00:00Z".into(),
    };
    w.given::<Payment>(ORDER, [payment_requested(), postponed]).await;
    w.gateway.charges.then(Err(timed_out("payment gateway")));
    // When the state machine tries the charge again
    let msg = command(Step::ChargePayment);
    let answer = w.answer(&msg).await;
    // Then the step gives up with the error for a gateway that stayed away, nothing recorded
    assert_eq!(
        answer,
        failed(
            &msg,
            PAYMENT_PROVIDER_UNAVAILABLE,
            "payment gateway unavailable: no answer in 2s; the order waited for the gateway until 2020-01-01T00:00:00Z"
        )
    );
    assert_eq!(w.events::<Payment>(ORDER).await.len(), 2);
    // And the state machine does not retry it: the charge may have been made, so it is
    // compensated from the refund (which settles it with the gateway)
    let route = route("ChargePayment", PAYMENT_PROVIDER_UNAVAILABLE);
    assert_eq!((route.retried, route.next.as_str()), (false, "ChargePaymentUncertain"));
    assert_eq!(asl()["States"]["ChargePaymentUncertain"]["Next"], "RefundPayment");
}

// ---------------------------------------------------------------------------------------------
// CreateShipment

#[tokio::test]
async fn create_shipment_records_the_request_then_the_booking() {
    // Given a carrier that books
    let w = world();
    w.carrier.bookings.then(Ok(ShipmentOutcome::Created { shipment_id: "ship-1".into(), carrier: "DHL".into() }));
    // When the order's shipment is created
    let msg = command(Step::CreateShipment);
    let answer = w.answer(&msg).await;
    // Then the request is recorded before the booking, on the order's shipment stream
    assert_eq!(w.events::<Shipment>(ORDER).await, [(1, shipment_requested()), (2, shipment_created("ship-1"))]);
    // And the carrier was asked once, for the order's three items, under its key
    assert_eq!(w.carrier.calls.all(), [booking_call()]);
    assert_eq!(answer, succeeded(&msg, json!({ "shipmentId": "ship-1", "carrier": "DHL" })));
}

#[tokio::test]
async fn create_shipment_rejected_records_the_rejection_and_fails_shipment_rejected() {
    // Given a carrier that does not serve the address
    let w = world();
    w.carrier.bookings.then(Ok(ShipmentOutcome::Rejected { reason: "address not served".into() }));
    // When the order's shipment is created
    let msg = command(Step::CreateShipment);
    let answer = w.answer(&msg).await;
    // Then the rejection is recorded
    let rejected = ShipmentEvent::ShipmentRejected { order_id: order_id(), reason: "address not served".into() };
    assert_eq!(w.events::<Shipment>(ORDER).await, [(1, shipment_requested()), (2, rejected)]);
    // And the step fails with the business error the state machine catches: the payment and the
    // stock are compensated, not the shipment (none was booked)
    assert_eq!(answer, failed(&msg, SHIPMENT_REJECTED, "address not served"));
    assert_caught("CreateShipment", SHIPMENT_REJECTED, "CreateShipmentFailed");
    assert_eq!(asl()["States"]["CreateShipmentFailed"]["Next"], "RefundPayment");
}

#[tokio::test]
async fn create_shipment_redelivered_books_once_and_answers_the_same() {
    // Given an order's shipment booked
    let w = world();
    w.carrier.bookings.then(Ok(ShipmentOutcome::Created { shipment_id: "ship-1".into(), carrier: "DHL".into() }));
    let msg = command(Step::CreateShipment);
    let first = w.answer(&msg).await;
    // When the same command is delivered again
    let second = w.answer(&msg).await;
    // Then the carrier was asked once, the booking recorded once, and the answer is the same
    assert_eq!(w.carrier.calls.all(), [booking_call()]);
    assert_eq!(w.events::<Shipment>(ORDER).await.len(), 2);
    assert_eq!(second, first);
}

#[tokio::test]
async fn create_shipment_while_the_carrier_is_down_fails_service_unavailable_then_books_on_the_retry() {
    // Given a carrier that is down, then books
    let w = world();
    w.carrier.bookings.then(Err(down("carrier")));
    w.carrier.bookings.then(Ok(ShipmentOutcome::Created { shipment_id: "ship-1".into(), carrier: "DHL".into() }));
    // When the order's shipment is created
    let msg = command(Step::CreateShipment);
    let answer = w.answer(&msg).await;
    // Then only the request is recorded, and the step fails with the transient error the state
    // machine retries
    assert_eq!(w.events::<Shipment>(ORDER).await, [(1, shipment_requested())]);
    assert_eq!(answer, failed(&msg, SERVICE_UNAVAILABLE, "carrier unavailable: 503 Service Unavailable"));
    assert!(route("CreateShipment", SERVICE_UNAVAILABLE).retried);
    // When the state machine retries (a new task) and the carrier is back
    let retry = next_task(&msg, 2);
    let answer = w.answer(&retry).await;
    // Then the booking is recorded after the one request, asked for with the same key
    assert_eq!(w.events::<Shipment>(ORDER).await, [(1, shipment_requested()), (2, shipment_created("ship-1"))]);
    assert_eq!(w.carrier.calls.all(), [booking_call(), booking_call()]);
    assert_eq!(answer, succeeded(&retry, json!({ "shipmentId": "ship-1", "carrier": "DHL" })));
}

// ---------------------------------------------------------------------------------------------
// SendNotification

#[tokio::test]
async fn send_notification_tells_the_customer_and_records_it_on_the_order() {
    // Given a placed order, and a notifier that delivers
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    w.notifier.notifications.then(Ok(NotifyOutcome::Sent { message_id: "msg-1".into() }));
    // When the customer is notified
    let msg = command(Step::SendNotification);
    let answer = w.answer(&msg).await;
    // Then the notification is recorded on the order, after its placing
    let notified = OrderEvent::CustomerNotified { channel: "email".into(), message_id: "msg-1".into() };
    assert_eq!(w.events::<Order>(ORDER).await, [(1, order_placed()), (2, notified)]);
    assert_eq!(w.notifier.calls.all(), [Call::Notify { key: "notify-ord-1".into(), customer: "cust-1".into() }]);
    assert_eq!(answer, succeeded(&msg, json!({ "notified": true, "messageId": "msg-1" })));
}

#[tokio::test]
async fn send_notification_to_an_unreachable_customer_fails_notification_undeliverable() {
    // Given a placed order whose customer has no contact channel
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    w.notifier.notifications.then(Ok(NotifyOutcome::Undeliverable { reason: "no contact channel".into() }));
    // When the customer is notified
    let msg = command(Step::SendNotification);
    let answer = w.answer(&msg).await;
    // Then nothing is recorded, and the step fails with the business error the state machine
    // catches: everything before it is compensated, from the shipment on
    assert_eq!(w.events::<Order>(ORDER).await, [(1, order_placed())]);
    assert_eq!(answer, failed(&msg, NOTIFICATION_UNDELIVERABLE, "no contact channel"));
    assert_caught("SendNotification", NOTIFICATION_UNDELIVERABLE, "SendNotificationFailed");
    assert_eq!(asl()["States"]["SendNotificationFailed"]["Next"], "CancelShipment");
}

#[tokio::test]
async fn send_notification_while_the_notifier_times_out_fails_service_unavailable_and_records_nothing() {
    // Given a placed order, and a notifier that does not answer
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    w.notifier.notifications.then(Err(timed_out("notifier")));
    // When the customer is notified
    let msg = command(Step::SendNotification);
    let answer = w.answer(&msg).await;
    // Then nothing is recorded, and the step fails with the error the state machine retries
    assert_eq!(w.events::<Order>(ORDER).await.len(), 1);
    assert_eq!(answer, failed(&msg, SERVICE_UNAVAILABLE, "notifier unavailable: no answer in 2s"));
    assert!(route("SendNotification", SERVICE_UNAVAILABLE).retried);
}

#[tokio::test]
async fn send_notification_redelivered_notifies_once() {
    // Given a customer notified
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    w.notifier.notifications.then(Ok(NotifyOutcome::Sent { message_id: "msg-1".into() }));
    let msg = command(Step::SendNotification);
    w.answer(&msg).await;
    // When the same command is delivered again
    let again = w.answer(&msg).await;
    // Then the customer is not told twice, nothing more is recorded, and the step succeeds
    // (the replay's output does not repeat the message id: the order keeps only that it was
    // notified, and the state machine reads neither)
    assert_eq!(w.notifier.calls.all().len(), 1);
    assert_eq!(w.events::<Order>(ORDER).await.len(), 2);
    assert_eq!(again.output()["notified"], true);
}

#[tokio::test]
async fn send_notification_redelivered_after_the_order_was_cancelled_does_not_tell_the_customer() {
    // Given an order the saga cancelled (its notification failed, and was compensated), and a
    // notifier that would deliver
    let w = world();
    let cancelled = OrderEvent::OrderCancelled {
        reason: "ServiceUnavailable: notifier down".into(),
        failed_step: "SendNotification".into(),
    };
    w.given::<Order>(ORDER, [order_placed(), cancelled]).await;
    w.notifier.notifications.then(Ok(NotifyOutcome::Sent { message_id: "msg-1".into() }));
    // When the notification's command is delivered late (its task long closed)
    let msg = command(Step::SendNotification);
    w.callback.closed.lock().expect("lock").insert(msg.task_token.clone());
    let answer = w.answer(&msg).await;
    // Then the customer is not told the cancelled order is on its way, nothing is recorded, and
    // the step fails permanently
    assert!(w.notifier.calls.all().is_empty(), "notified: {:?}", w.notifier.calls.all());
    assert_eq!(w.events::<Order>(ORDER).await.len(), 2);
    assert_eq!(answer.failure().0, STEP_FAILED);
}

// ---------------------------------------------------------------------------------------------
// CompleteOrder

/// An order through every step: reserved, charged, booked and notified.
async fn given_a_fulfilled_order(w: &World) {
    w.given::<Order>(ORDER, [order_placed()]).await;
    w.given_reserved().await;
    w.given::<Payment>(ORDER, [payment_requested(), payment_charged("pay-1")]).await;
    w.given::<Shipment>(ORDER, [shipment_requested(), shipment_created("ship-1")]).await;
}

#[tokio::test]
async fn complete_order_commits_the_stock_and_completes_the_order() {
    // Given an order through every step
    let w = world();
    given_a_fulfilled_order(&w).await;
    // When it is completed
    let msg = command(Step::CompleteOrder);
    let answer = w.answer(&msg).await;
    // Then each line's stock is committed, and the order completed with its payment and shipment
    assert_eq!(w.events_from::<Inventory>(RED, 3).await, [(3, committed(2))]);
    assert_eq!(w.events_from::<Inventory>(BLUE, 3).await, [(3, committed(1))]);
    let completed = OrderEvent::OrderCompleted { payment_id: "pay-1".into(), shipment_id: "ship-1".into() };
    assert_eq!(w.events::<Order>(ORDER).await, [(1, order_placed()), (2, completed)]);
    let expected = json!({ "status": "Completed", "paymentId": "pay-1", "shipmentId": "ship-1" });
    assert_eq!(answer, succeeded(&msg, expected));
}

#[tokio::test]
async fn complete_order_redelivered_completes_once_and_answers_the_same() {
    // Given an order completed
    let w = world();
    given_a_fulfilled_order(&w).await;
    let msg = command(Step::CompleteOrder);
    let first = w.answer(&msg).await;
    // When the same command is delivered again
    let second = w.answer(&msg).await;
    // Then nothing more is committed or recorded, and the answer is the same
    assert_eq!(w.events::<Inventory>(RED).await.len(), 3);
    assert_eq!(w.events::<Inventory>(BLUE).await.len(), 3);
    assert_eq!(w.events::<Order>(ORDER).await.len(), 2);
    assert_eq!(second, first);
}

#[tokio::test]
async fn complete_order_whose_payment_was_not_charged_fails_step_failed_and_is_flagged() {
    // Given an order whose payment was declined (an invariant broken: the saga completes only
    // charged orders)
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    w.given_reserved().await;
    w.given::<Payment>(ORDER, [payment_requested(), payment_declined("card declined")]).await;
    w.given::<Shipment>(ORDER, [shipment_requested(), shipment_created("ship-1")]).await;
    // When it is completed
    let msg = command(Step::CompleteOrder);
    let answer = w.answer(&msg).await;
    // Then the order is not completed, and the step fails permanently
    assert_eq!(w.events::<Order>(ORDER).await, [(1, order_placed())]);
    let (error, cause) = answer.failure();
    assert_eq!(error, STEP_FAILED);
    assert!(cause.starts_with("completing an order whose payment is Declined"), "{cause}");
    // And the state machine, its retries spent, flags the order for manual action
    assert_routes_to_manual_action("CompleteOrder", STEP_FAILED, true);
}

// ---------------------------------------------------------------------------------------------
// ReleaseInventory (compensates ReserveInventory)

#[tokio::test]
async fn release_inventory_gives_the_reserved_stock_back() {
    // Given the order's lines reserved
    let w = world();
    w.given_reserved().await;
    // When the reservation is compensated
    let msg = command(Step::ReleaseInventory);
    let answer = w.answer(&msg).await;
    // Then each SKU's stream records its line released
    assert_eq!(w.events_from::<Inventory>(RED, 3).await, [(3, released(2))]);
    assert_eq!(w.events_from::<Inventory>(BLUE, 3).await, [(3, released(1))]);
    assert_eq!(answer, succeeded(&msg, json!({ "releasedLines": 2 })));
}

#[tokio::test]
async fn release_inventory_of_nothing_reserved_is_a_no_op_success() {
    // Given SKU-RED without this order's reservation and SKU-BLUE never stocked
    let w = world();
    w.given::<Inventory>(RED, [restocked(RED, 5)]).await;
    // When the reservation is compensated
    let msg = command(Step::ReleaseInventory);
    let answer = w.answer(&msg).await;
    // Then nothing is appended anywhere, and the compensation succeeds
    assert_eq!(w.events::<Inventory>(RED).await, [(1, restocked(RED, 5))]);
    assert!(w.events::<Inventory>(BLUE).await.is_empty());
    assert_eq!(answer, succeeded(&msg, json!({ "releasedLines": 0 })));
}

#[tokio::test]
async fn release_inventory_redelivered_releases_once() {
    // Given the order's stock released
    let w = world();
    w.given_reserved().await;
    let msg = command(Step::ReleaseInventory);
    w.answer(&msg).await;
    // When the same command is delivered again
    let again = w.answer(&msg).await;
    // Then nothing more is released, and the compensation succeeds again (counting the lines it
    // released this time: none)
    assert_eq!(w.events::<Inventory>(RED).await.len(), 3);
    assert_eq!(w.events::<Inventory>(BLUE).await.len(), 3);
    assert_eq!(again, succeeded(&msg, json!({ "releasedLines": 0 })));
}

#[tokio::test]
async fn release_inventory_losing_every_race_is_left_on_the_queue_then_answers_once_it_wins() {
    // Given the order's lines reserved, and every append losing to a concurrent writer
    let w = world();
    w.given_reserved().await;
    w.repo.store().inject_conflicts(1_000);
    // When the reservation is compensated
    let msg = command(Step::ReleaseInventory);
    let answer = w.deliver(&msg).await;
    // Then the state machine is not answered: the message is left on the queue, nothing appended
    assert_eq!(answer, None);
    assert_eq!((w.events::<Inventory>(RED).await.len(), w.events::<Inventory>(BLUE).await.len()), (2, 2));
    // (Should that go on past the task's timeout, the state machine retries, then records it and
    // flags the order once the other compensations have run.)
    assert_routes_to_manual_action("ReleaseInventory", "States.Timeout", true);
    // When the message is redelivered and the races are won
    w.repo.store().inject_conflicts(0);
    let answer = w.answer(&msg).await;
    // Then the stock is released once, and the state machine answered
    assert_eq!(w.events_from::<Inventory>(RED, 3).await, [(3, released(2))]);
    assert_eq!(w.events_from::<Inventory>(BLUE, 3).await, [(3, released(1))]);
    assert_eq!(answer, succeeded(&msg, json!({ "releasedLines": 2 })));
}

#[tokio::test]
async fn release_inventory_that_cannot_read_its_stock_fails_step_failed_and_is_flagged() {
    // Given a SKU-RED stream holding an event this code cannot read
    let w = world();
    let stream = StreamId::new("Inventory", RED).expect("stream");
    w.append(&stream, vec![NewEvent::new("InventoryReserved", 1, json!({ "orderId": 7 }))]).await;
    w.given::<Inventory>(BLUE, [restocked(BLUE, 3), reserved(1)]).await;
    // When the reservation is compensated
    let msg = command(Step::ReleaseInventory);
    let answer = w.answer(&msg).await;
    // Then the compensation fails permanently (a redelivery would not read it either), and
    // nothing is appended to SKU-RED
    let (error, cause) = answer.failure();
    assert_eq!(error, STEP_FAILED);
    assert!(cause.contains("does not decode"), "{cause}");
    assert_eq!(w.repo.store().head_version(&stream).await.expect("head"), 1);
    // And the state machine, its retries spent, records it and flags the order once the other
    // compensations have run
    assert_routes_to_manual_action("ReleaseInventory", STEP_FAILED, true);
}

// ---------------------------------------------------------------------------------------------
// RefundPayment (compensates ChargePayment)

#[tokio::test]
async fn refund_payment_refunds_the_charge_and_records_it() {
    // Given a charged order, and a gateway that refunds
    let w = world();
    w.given::<Payment>(ORDER, [payment_requested(), payment_charged("pay-1")]).await;
    w.gateway.refunds.then(Ok(RefundOutcome::Refunded { refund_id: "ref-1".into() }));
    // When the charge is compensated
    let msg = command(Step::RefundPayment);
    let answer = w.answer(&msg).await;
    // Then the charge was refunded in full under the order's refund key, and that is recorded
    assert_eq!(w.gateway.calls.all(), [refund_call("pay-1")]);
    assert_eq!(w.events_from::<Payment>(ORDER, 3).await, [(3, payment_refunded("pay-1", "ref-1"))]);
    assert_eq!(answer, succeeded(&msg, json!({ "refundId": "ref-1" })));
}

#[tokio::test]
async fn refund_payment_of_nothing_charged_is_a_no_op_success() {
    for given in [vec![], vec![payment_requested(), payment_declined("card declined")]] {
        // Given an order never charged (no payment, or a declined one)
        let w = world();
        w.given::<Payment>(ORDER, given.clone()).await;
        // When the charge is compensated
        let msg = command(Step::RefundPayment);
        let answer = w.answer(&msg).await;
        // Then the gateway is not called, nothing is appended, and the compensation succeeds
        assert!(w.gateway.calls.all().is_empty(), "given {given:?}");
        assert_eq!(w.events::<Payment>(ORDER).await.len(), given.len());
        assert_eq!(answer, succeeded(&msg, json!({ "refunded": false, "reason": "nothing was charged" })));
    }
}

#[tokio::test]
async fn refund_payment_redelivered_refunds_once_and_answers_the_same() {
    // Given a charge refunded
    let w = world();
    w.given::<Payment>(ORDER, [payment_requested(), payment_charged("pay-1")]).await;
    w.gateway.refunds.then(Ok(RefundOutcome::Refunded { refund_id: "ref-1".into() }));
    let msg = command(Step::RefundPayment);
    let first = w.answer(&msg).await;
    // When the same command is delivered again
    let second = w.answer(&msg).await;
    // Then the gateway refunded once, the refund is recorded once, and the answer is the same
    assert_eq!(w.gateway.calls.all(), [refund_call("pay-1")]);
    assert_eq!(w.events::<Payment>(ORDER).await.len(), 3);
    assert_eq!(second, first);
}

#[tokio::test]
async fn refund_payment_refused_fails_refund_refused_and_is_flagged() {
    // Given a charged order, and a gateway that refuses its refund for good
    let w = world();
    w.given::<Payment>(ORDER, [payment_requested(), payment_charged("pay-1")]).await;
    w.gateway.refunds.then(Ok(RefundOutcome::Refused { reason: "charge disputed".into() }));
    // When the charge is compensated
    let msg = command(Step::RefundPayment);
    let answer = w.answer(&msg).await;
    // Then nothing is recorded, and the compensation fails with the refusal
    assert_eq!(w.events::<Payment>(ORDER).await.len(), 2);
    assert_eq!(answer, failed(&msg, REFUND_REFUSED, "charge disputed"));
    // And the state machine does not retry it: it records it, runs the other compensations,
    // and flags the order for manual action
    assert_routes_to_manual_action("RefundPayment", REFUND_REFUSED, false);
}

#[tokio::test]
async fn refund_payment_of_a_charge_whose_answer_was_lost_settles_it_with_the_gateway_first() {
    // Given a charge requested whose answer was lost, and made by the gateway after all
    let w = world();
    w.given::<Payment>(ORDER, [payment_requested()]).await;
    w.gateway.voids.then(Ok(ChargeOutcome::Charged { payment_id: "pay-1".into() }));
    w.gateway.refunds.then(Ok(RefundOutcome::Refunded { refund_id: "ref-1".into() }));
    // When the charge is compensated
    let msg = command(Step::RefundPayment);
    let answer = w.answer(&msg).await;
    // Then the gateway is asked to void the charge's key, answers the charge it made, and that
    // charge is recorded and refunded
    let void = Call::Void { key: "void-ord-1".into(), charge_key: "charge-ord-1".into() };
    assert_eq!(w.gateway.calls.all(), [void, refund_call("pay-1")]);
    assert_eq!(
        w.events_from::<Payment>(ORDER, 2).await,
        [(2, payment_charged("pay-1")), (3, payment_refunded("pay-1", "ref-1"))]
    );
    assert_eq!(answer, succeeded(&msg, json!({ "refundId": "ref-1" })));
}

#[tokio::test]
async fn refund_payment_of_a_lost_charge_never_made_voids_it_and_refunds_nothing() {
    // Given a charge requested whose answer was lost, never made by the gateway
    let w = world();
    w.given::<Payment>(ORDER, [payment_requested()]).await;
    w.gateway.voids.then(Ok(ChargeOutcome::Declined { reason: "voided".into() }));
    // When the charge is compensated
    let msg = command(Step::RefundPayment);
    let answer = w.answer(&msg).await;
    // Then the key is voided (recorded as a decline), and there is nothing to refund
    assert_eq!(w.gateway.calls.all(), [Call::Void { key: "void-ord-1".into(), charge_key: "charge-ord-1".into() }]);
    assert_eq!(w.events_from::<Payment>(ORDER, 2).await, [(2, payment_declined("voided"))]);
    assert_eq!(answer, succeeded(&msg, json!({ "refunded": false, "reason": "nothing was charged" })));
}

#[tokio::test]
async fn refund_payment_while_the_gateway_is_down_parks_the_refund_then_refunds() {
    // Given a charged order, and a gateway that is down, then refunds
    let w = world();
    w.given::<Payment>(ORDER, [payment_requested(), payment_charged("pay-1")]).await;
    w.gateway.refunds.then(Err(down("payment gateway")));
    w.gateway.refunds.then(Ok(RefundOutcome::Refunded { refund_id: "ref-1".into() }));
    // When the charge is compensated
    let msg = command(Step::RefundPayment);
    let parked = w.answer(&msg).await;
    // Then the refund is recorded as postponed, and the state machine told to wait and try again
    let events = w.events_from::<Payment>(ORDER, 3).await;
    let [(3, PaymentEvent::RefundPostponed { retry_until, .. })] = &events[..] else {
        panic!("the refund postponed: {events:?}")
    };
    assert_eq!((&parked.output()["pending"], &parked.output()["retryUntil"]), (&json!(true), &json!(retry_until)));
    assert_eq!(asl()["States"]["WaitToRefund"]["SecondsPath"], "$.compensations.payment.retryInSeconds");
    // When the state machine tries again (a new task) and the gateway is back
    let retry = next_task(&msg, 2);
    let answer = w.answer(&retry).await;
    // Then the refund is recorded, asked for twice with the same key
    assert_eq!(w.gateway.calls.all(), [refund_call("pay-1"), refund_call("pay-1")]);
    assert_eq!(w.events_from::<Payment>(ORDER, 4).await, [(4, payment_refunded("pay-1", "ref-1"))]);
    assert_eq!(answer, succeeded(&retry, json!({ "refundId": "ref-1" })));
}

#[tokio::test]
async fn refund_payment_parked_past_its_limit_fails_payment_provider_unavailable_and_is_flagged() {
    // Given a refund parked until a time now past, and a gateway still down
    let w = world();
    let parked = PaymentEvent::RefundPostponed {
        order_id: order_id(),
        reason: "payment gateway unavailable".into(),
        retry_until: "2020-01-01T00:00:00Z".into(),
    };
    w.given::<Payment>(ORDER, [payment_requested(), payment_charged("pay-1"), parked]).await;
    w.gateway.refunds.then(Err(down("payment gateway")));
    // When the state machine tries the refund again
    let msg = command(Step::RefundPayment);
    let answer = w.answer(&msg).await;
    // Then it gives up, nothing recorded, with the error for a gateway that stayed away
    assert_eq!(w.events::<Payment>(ORDER).await.len(), 3);
    let (error, cause) = answer.failure();
    assert_eq!(error, PAYMENT_PROVIDER_UNAVAILABLE);
    assert!(cause.ends_with("the refund waited for the gateway until 2020-01-01T00:00:00Z"), "{cause}");
    // And the state machine records it and flags the order for manual action
    assert_routes_to_manual_action("RefundPayment", PAYMENT_PROVIDER_UNAVAILABLE, false);
}

// ---------------------------------------------------------------------------------------------
// CancelShipment (compensates CreateShipment)

#[tokio::test]
async fn cancel_shipment_cancels_the_booking_and_records_it() {
    // Given a booked shipment, and a carrier that cancels
    let w = world();
    w.given::<Shipment>(ORDER, [shipment_requested(), shipment_created("ship-1")]).await;
    w.carrier.cancellations.then(Ok(()));
    // When the shipment is compensated
    let msg = command(Step::CancelShipment);
    let answer = w.answer(&msg).await;
    // Then the carrier cancelled that booking under the order's cancel key, and that is recorded
    let cancel = Call::CancelBooking { key: "cancel-ord-1".into(), shipment_id: "ship-1".into() };
    assert_eq!(w.carrier.calls.all(), [cancel]);
    let cancelled = ShipmentEvent::ShipmentCancelled { order_id: order_id(), shipment_id: "ship-1".into() };
    assert_eq!(w.events_from::<Shipment>(ORDER, 3).await, [(3, cancelled)]);
    assert_eq!(answer, succeeded(&msg, json!({ "cancelled": "ship-1" })));
}

#[tokio::test]
async fn cancel_shipment_of_nothing_booked_is_a_no_op_success() {
    let rejected = ShipmentEvent::ShipmentRejected { order_id: order_id(), reason: "address not served".into() };
    for given in [vec![], vec![shipment_requested(), rejected]] {
        // Given no shipment, or a rejected one
        let w = world();
        w.given::<Shipment>(ORDER, given.clone()).await;
        // When the shipment is compensated
        let msg = command(Step::CancelShipment);
        let answer = w.answer(&msg).await;
        // Then the carrier is not called, nothing is appended, and the compensation succeeds
        assert!(w.carrier.calls.all().is_empty(), "given {given:?}");
        assert_eq!(w.events::<Shipment>(ORDER).await.len(), given.len());
        assert_eq!(answer, succeeded(&msg, json!({ "cancelled": false, "reason": "nothing was booked" })));
    }
}

#[tokio::test]
async fn cancel_shipment_redelivered_cancels_once_and_answers_the_same() {
    // Given a shipment cancelled
    let w = world();
    w.given::<Shipment>(ORDER, [shipment_requested(), shipment_created("ship-1")]).await;
    w.carrier.cancellations.then(Ok(()));
    let msg = command(Step::CancelShipment);
    let first = w.answer(&msg).await;
    // When the same command is delivered again
    let second = w.answer(&msg).await;
    // Then the carrier cancelled once, the cancellation is recorded once, and the answer is the
    // same
    assert_eq!(w.carrier.calls.all().len(), 1);
    assert_eq!(w.events::<Shipment>(ORDER).await.len(), 3);
    assert_eq!(second, first);
}

#[tokio::test]
async fn cancel_shipment_while_the_carrier_is_down_fails_service_unavailable_and_is_flagged() {
    // Given a booked shipment, and a carrier that is down
    let w = world();
    w.given::<Shipment>(ORDER, [shipment_requested(), shipment_created("ship-1")]).await;
    w.carrier.cancellations.then(Err(down("carrier")));
    // When the shipment is compensated
    let msg = command(Step::CancelShipment);
    let answer = w.answer(&msg).await;
    // Then nothing is recorded, and the compensation fails with the transient error
    assert_eq!(w.events::<Shipment>(ORDER).await.len(), 2);
    assert_eq!(answer, failed(&msg, SERVICE_UNAVAILABLE, "carrier unavailable: 503 Service Unavailable"));
    // And the state machine retries it, then records it, runs the other compensations and flags
    // the order for manual action
    assert_routes_to_manual_action("CancelShipment", SERVICE_UNAVAILABLE, true);
}

#[tokio::test]
async fn cancel_shipment_of_a_booking_whose_answer_was_lost_asks_the_carrier_then_cancels() {
    // Given a booking requested whose answer was lost, and made by the carrier after all
    let w = world();
    w.given::<Shipment>(ORDER, [shipment_requested()]).await;
    w.carrier.bookings.then(Ok(ShipmentOutcome::Created { shipment_id: "ship-1".into(), carrier: "DHL".into() }));
    w.carrier.cancellations.then(Ok(()));
    // When the shipment is compensated
    let msg = command(Step::CancelShipment);
    let answer = w.answer(&msg).await;
    // Then the carrier is asked under the booking's key (answering the booking it made), and
    // that booking is recorded and cancelled
    let cancel = Call::CancelBooking { key: "cancel-ord-1".into(), shipment_id: "ship-1".into() };
    assert_eq!(w.carrier.calls.all(), [booking_call(), cancel]);
    let cancelled = ShipmentEvent::ShipmentCancelled { order_id: order_id(), shipment_id: "ship-1".into() };
    assert_eq!(w.events_from::<Shipment>(ORDER, 2).await, [(2, shipment_created("ship-1")), (3, cancelled)]);
    assert_eq!(answer, succeeded(&msg, json!({ "cancelled": "ship-1" })));
}

// ---------------------------------------------------------------------------------------------
// CancelOrder (after the compensations)

fn cancel_command() -> StepMessage {
    StepMessage {
        failed_step: Some("ChargePayment".into()),
        failure: Some(Failure { error: PAYMENT_DECLINED.into(), cause: "card declined".into() }),
        ..command(Step::CancelOrder)
    }
}

#[tokio::test]
async fn cancel_order_cancels_with_the_step_that_failed_and_why() {
    // Given a placed order whose payment was declined
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    // When it is cancelled
    let msg = cancel_command();
    let answer = w.answer(&msg).await;
    // Then the cancellation is recorded with the failed step and its error
    let cancelled = OrderEvent::OrderCancelled {
        reason: "PaymentDeclined: card declined".into(),
        failed_step: "ChargePayment".into(),
    };
    assert_eq!(w.events::<Order>(ORDER).await, [(1, order_placed()), (2, cancelled)]);
    let expected =
        json!({ "status": "Cancelled", "failedStep": "ChargePayment", "reason": "PaymentDeclined: card declined" });
    assert_eq!(answer, succeeded(&msg, expected));
}

#[tokio::test]
async fn cancel_order_redelivered_cancels_once_and_answers_the_same() {
    // Given an order cancelled
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    let msg = cancel_command();
    let first = w.answer(&msg).await;
    // When the same command is delivered again, its task already closed
    w.callback.closed.lock().expect("lock").insert(msg.task_token.clone());
    let second = w.answer(&msg).await;
    // Then nothing more is recorded, and the same answer is sent (and its closed task tolerated)
    assert_eq!(w.events::<Order>(ORDER).await.len(), 2);
    assert_eq!(second, first);
}

#[tokio::test]
async fn cancel_order_of_a_completed_order_fails_step_failed_and_is_flagged() {
    // Given an order already completed
    let w = world();
    let completed = OrderEvent::OrderCompleted { payment_id: "pay-1".into(), shipment_id: "ship-1".into() };
    w.given::<Order>(ORDER, [order_placed(), completed]).await;
    // When it is cancelled
    let msg = cancel_command();
    let answer = w.answer(&msg).await;
    // Then nothing is recorded, and the step fails permanently
    assert_eq!(w.events::<Order>(ORDER).await.len(), 2);
    assert_eq!(answer, failed(&msg, STEP_FAILED, "command rejected: order is Completed: cannot cancel"));
    // And the state machine, its retries spent, flags the order for manual action
    assert_routes_to_manual_action("CancelOrder", STEP_FAILED, true);
}

// ---------------------------------------------------------------------------------------------
// FlagForManualAction

fn flag_command() -> StepMessage {
    let failures = [
        ("CancelOrder", Failure { error: STEP_FAILED.into(), cause: "store down".into() }),
        ("RefundPayment", Failure { error: REFUND_REFUSED.into(), cause: "charge disputed".into() }),
        ("CancelShipment", Failure { error: SERVICE_UNAVAILABLE.into(), cause: "carrier down".into() }),
    ];
    StepMessage {
        failures: failures.into_iter().map(|(step, failure)| (step.to_owned(), failure)).collect(),
        ..command(Step::FlagForManualAction)
    }
}

fn flagged_failures() -> Vec<FailedAction> {
    vec![
        FailedAction::new("CancelShipment", "ServiceUnavailable: carrier down"),
        FailedAction::new("RefundPayment", "RefundRefused: charge disputed"),
        FailedAction::new("CancelOrder", "StepFailed: store down"),
    ]
}

#[tokio::test]
async fn flag_for_manual_action_records_every_failed_step_in_the_order_the_saga_ran_them() {
    // Given a placed order whose shipment cancellation, refund and cancellation kept failing
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    // When it is flagged for manual action
    let msg = flag_command();
    let answer = w.answer(&msg).await;
    // Then the flag names each failed step with its error, in saga order
    let flagged = OrderEvent::OrderFlaggedForManualAction { failures: flagged_failures() };
    assert_eq!(w.events::<Order>(ORDER).await, [(1, order_placed()), (2, flagged)]);
    let expected = json!({ "status": "NeedsManualAction", "failures": flagged_failures() });
    assert_eq!(answer, succeeded(&msg, expected));
}

#[tokio::test]
async fn flag_for_manual_action_redelivered_flags_once_and_answers_the_same() {
    // Given an order flagged
    let w = world();
    w.given::<Order>(ORDER, [order_placed()]).await;
    let msg = flag_command();
    let first = w.answer(&msg).await;
    // When the same command is delivered again
    let second = w.answer(&msg).await;
    // Then nothing more is recorded, and the answer is the same
    assert_eq!(w.events::<Order>(ORDER).await.len(), 2);
    assert_eq!(second, first);
}

#[tokio::test]
async fn flag_for_manual_action_of_a_completed_order_fails_step_failed_and_is_still_reported() {
    // Given an order already completed
    let w = world();
    let completed = OrderEvent::OrderCompleted { payment_id: "pay-1".into(), shipment_id: "ship-1".into() };
    w.given::<Order>(ORDER, [order_placed(), completed]).await;
    // When it is flagged
    let msg = flag_command();
    let answer = w.answer(&msg).await;
    // Then nothing is recorded, and the step fails permanently
    assert_eq!(w.events::<Order>(ORDER).await.len(), 2);
    assert_eq!(
        answer,
        failed(&msg, STEP_FAILED, "command rejected: order is Completed: cannot flag for manual action")
    );
    // And the state machine still reports the case to a person (the manual-action queue)
    let route = route("FlagForManualAction", STEP_FAILED);
    assert_eq!((route.retried, route.next.as_str()), (true, "ReportManualAction"));
}

// ---------------------------------------------------------------------------------------------
// The doubles themselves: an unscripted call fails the test.

#[tokio::test]
#[should_panic(expected = "no answer scripted for charge")]
async fn a_service_call_nobody_scripted_fails_the_test() {
    let w = world();
    w.answer(&command(Step::ChargePayment)).await;
}

#[test]
fn every_scripted_answer_is_taken_in_order() {
    let script = Script::default();
    script.then(1);
    script.then(2);
    assert_eq!((script.next("op"), script.next("op"), script.left()), (1, 2, 0));
}
