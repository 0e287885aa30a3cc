//! The logic of each saga step and compensation, over the repository and the external
//! services. Each returns its outcome from the aggregates' state, so running it again (a
//! redelivery, a retry by the state machine) gives the same outcome with no second effect.

use futures::future::{join, join5, try_join_all};
use serde_json::json;

use super::errors::*;
use super::{StepError, StepFailure, StepMessage, StepOutcome};
use crate::aggregate::{Aggregate, CommandContext, Executed, Repository};
use crate::domain::OrderId;
use crate::domain::inventory::{Inventory, InventoryCommand, Reservation};
use crate::domain::order::{Order, OrderCommand, OrderStatus};
use crate::domain::payment::{Payment, PaymentCommand};
use crate::domain::services::{
    Carrier, ChargeOutcome, Notifier, NotifyOutcome, PaymentGateway, RefundOutcome, ShipmentOutcome, Unavailable,
};
use crate::domain::shipment::{Shipment, ShipmentCommand};
use crate::eventstore::{EventStore, StreamId};
use crate::metrics::{self, Outcome};

fn context(msg: &StepMessage) -> CommandContext {
    CommandContext {
        idempotency_key: None,
        // A command from before correlation ids were carried correlates by its order.
        correlation_id: Some(msg.correlation_id.clone().unwrap_or_else(|| msg.order.order_id.to_string())),
        causation_id: Some(format!("{:?}", msg.step)),
        trace_header: msg.trace_header.clone(),
    }
}

fn unavailable(e: Unavailable) -> StepOutcome {
    Err(StepFailure::new(SERVICE_UNAVAILABLE, e.to_string()))
}

/// Reserves every line; if any SKU is short, releases what this order holds and fails with
/// `InventoryUnavailable` (so the saga has nothing to compensate).
pub async fn reserve_inventory<S: EventStore>(
    repo: &Repository<S>,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order_id = &msg.order.order_id;
    let ctx = context(msg);
    // One Inventory stream per SKU: the lines are independent, so they go out together.
    let reserved = try_join_all(msg.order.lines.iter().map(|line| {
        let cmd = InventoryCommand::Reserve { order_id: order_id.clone(), quantity: line.quantity };
        let ctx = &ctx;
        async move { repo.execute_with_state::<Inventory>(line.sku.as_str(), &cmd, ctx).await.map(|(_, i)| i) }
    }))
    .await?;
    let mut short = Vec::new();
    for (line, inventory) in msg.order.lines.iter().zip(&reserved) {
        match inventory.reservation(order_id) {
            Some(Reservation::Reserved(_) | Reservation::Committed(_)) => {}
            Some(Reservation::Rejected(requested)) => {
                short.push(format!("{}: {requested} requested, {} available", line.sku, inventory.available));
            }
            Some(Reservation::Released(_)) | None => short.push(format!("{}: reservation already released", line.sku)),
        }
    }
    if short.is_empty() {
        return Ok(Ok(json!({ "reserved": msg.order.lines.len() })));
    }
    release_all(repo, msg).await?;
    Ok(Err(StepFailure::new(INVENTORY_UNAVAILABLE, format!("insufficient stock: {}", short.join("; ")))))
}

async fn release_all<S: EventStore>(repo: &Repository<S>, msg: &StepMessage) -> Result<u32, StepError> {
    let ctx = context(msg);
    let released = try_join_all(msg.order.lines.iter().map(|line| {
        let cmd = InventoryCommand::Release { order_id: msg.order.order_id.clone() };
        let ctx = &ctx;
        async move { repo.execute::<Inventory>(line.sku.as_str(), &cmd, ctx).await }
    }))
    .await?;
    Ok(released.iter().filter(|e| matches!(e, crate::aggregate::Executed::Appended { .. })).count() as u32)
}

/// Compensation of `reserve_inventory`: returns every unit this order holds. Nothing held is
/// not an error.
pub async fn release_inventory<S: EventStore>(
    repo: &Repository<S>,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let released = release_all(repo, msg).await?;
    // Counted when it released something: a redelivered command's replay releases nothing.
    if released > 0 {
        metrics::compensation_run("ReleaseInventory");
    }
    Ok(Ok(json!({ "releasedLines": released })))
}

/// How a recorded charge request is resolved.
#[derive(Clone, Copy)]
enum Resolve {
    /// Charge (again) with its idempotency key: the same answer if it was made, or the charge.
    Charge,
    /// Void it: its answer if it was made, or never (a compensating order is not charged now).
    Void,
}

/// Asks the gateway about a recorded charge request (idempotent: the same key gives the same
/// answer, so a lost answer is found again) and records the answer.
async fn resolve_charge<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    msg: &StepMessage,
    how: Resolve,
    amount: crate::domain::Money,
    at: Option<(Payment, u64)>,
) -> Result<Result<Payment, Unavailable>, StepError> {
    let order = &msg.order;
    let key = format!("charge-{}", order.order_id);
    let answer = match how {
        Resolve::Charge => gateway.charge(&key, amount, &order.payment_token).await,
        Resolve::Void => gateway.void_charge(&format!("void-{}", order.order_id), &key).await,
    };
    let command = match answer {
        Err(e) => return Ok(Err(e)),
        Ok(ChargeOutcome::Charged { payment_id }) => {
            PaymentCommand::RecordCharge { order_id: order.order_id.clone(), payment_id }
        }
        Ok(ChargeOutcome::Declined { reason }) => {
            PaymentCommand::RecordDecline { order_id: order.order_id.clone(), reason }
        }
    };
    let (id, ctx) = (order.order_id.as_str(), context(msg));
    // The request state is held (`at`): recording the answer needs no second load.
    Ok(Ok(match at {
        Some((state, version)) => repo.execute_from(id, state, version, &command, &ctx).await?.1,
        None => repo.execute_with_state::<Payment>(id, &command, &ctx).await?.1,
    }))
}

/// How long an order may wait for an unavailable payment gateway, and how often it asks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parking {
    /// From the first time the order is parked: past this, it is compensated.
    pub limit: std::time::Duration,
    /// Between two tries when the gateway gave no hint (an open breaker gives its recovery time).
    pub retry: std::time::Duration,
}

impl Default for Parking {
    fn default() -> Self {
        Self { limit: std::time::Duration::from_secs(3600), retry: std::time::Duration::from_secs(5) }
    }
}

impl Parking {
    /// `PAYMENT_PARKING_LIMIT_SECONDS` and `PAYMENT_RETRY_SECONDS`; unset, the defaults (an hour;
    /// five seconds).
    pub fn from_vars(vars: crate::config::Vars<'_>) -> Result<Self, crate::config::ConfigError> {
        let seconds = |name: &'static str, default: std::time::Duration| match vars(name) {
            None => Ok(default),
            Some(v) => v.trim().parse().map(std::time::Duration::from_secs).map_err(|_| {
                crate::config::ConfigError::Invalid { name, reason: format!("expected whole seconds, got {v:?}") }
            }),
        };
        let d = Self::default();
        Ok(Self {
            limit: seconds("PAYMENT_PARKING_LIMIT_SECONDS", d.limit)?,
            retry: seconds("PAYMENT_RETRY_SECONDS", d.retry)?.max(std::time::Duration::from_secs(1)),
        })
    }

    /// The wait before the next try: the gateway's hint or [`Self::retry`], plus up to a quarter
    /// more of jitter (parked orders do not all come back at once), at least a second, and no
    /// later than the deadline (`left`), so the last try happens.
    pub fn wait(&self, hint: Option<std::time::Duration>, left: std::time::Duration) -> std::time::Duration {
        let base = hint.unwrap_or(self.retry).max(std::time::Duration::from_secs(1));
        let jitter = base.mul_f64(fastrand::f64() / 4.0);
        (base + jitter).min(left).max(std::time::Duration::from_secs(1))
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// What parking a charge and parking a refund differ in.
struct Parked {
    /// The deadline of a payment already parked this way.
    until: fn(&Payment) -> Option<&String>,
    postpone: fn(OrderId, String, String) -> PaymentCommand,
    count: fn(),
    /// Who waits, for the failure's cause.
    waiting: &'static str,
}

const CHARGE_PARKED: Parked = Parked {
    until: |p| if let Payment::Postponed { retry_until, .. } = p { Some(retry_until) } else { None },
    postpone: |order_id, reason, retry_until| PaymentCommand::Postpone { order_id, reason, retry_until },
    count: metrics::payment_parked,
    waiting: "the order",
};

const REFUND_PARKED: Parked = Parked {
    until: |p| if let Payment::RefundPostponed { retry_until, .. } = p { Some(retry_until) } else { None },
    postpone: |order_id, reason, retry_until| PaymentCommand::PostponeRefund { order_id, reason, retry_until },
    count: metrics::refund_parked,
    waiting: "the refund",
};

/// The gateway is unavailable: the order (or, compensating, its refund) waits for it instead of
/// failing. The first time, the payment is recorded as postponed, with the deadline
/// ([`Parking::limit`] from now); each time, the state machine is told to wait (`pending`,
/// `retryInSeconds`) and try again. Past the deadline, the step fails with
/// `PaymentProviderUnavailable`: the order is compensated, or for a refund a person must act.
async fn park<S: EventStore>(
    repo: &Repository<S>,
    parking: &Parking,
    msg: &StepMessage,
    at: Option<(Payment, u64)>,
    e: Unavailable,
    how: &Parked,
) -> Result<StepOutcome, StepError> {
    let now = time::OffsetDateTime::now_utc();
    let retry_until = match at.as_ref().and_then(|(payment, _)| (how.until)(payment)).cloned() {
        Some(retry_until) => retry_until,
        None => {
            let cmd = (how.postpone)(msg.order.order_id.clone(), e.to_string(), rfc3339(now + parking.limit));
            let payment = postpone(repo, msg, at, &cmd, how.count).await?;
            let parked = (how.until)(&payment).cloned();
            parked.ok_or_else(|| StepError::Retryable(format!("payment is {payment:?}, not parked")))?
        }
    };
    wait_or_give_up(parking, now, &retry_until, e, how.waiting)
}

/// Records a postponement (from the state held, or loaded), counted once when it is recorded.
async fn postpone<S: EventStore>(
    repo: &Repository<S>,
    msg: &StepMessage,
    at: Option<(Payment, u64)>,
    cmd: &PaymentCommand,
    count: fn(),
) -> Result<Payment, StepError> {
    let (id, ctx) = (msg.order.order_id.as_str(), context(msg));
    let (executed, state) = match at {
        Some((state, version)) => repo.execute_from(id, state, version, cmd, &ctx).await?,
        None => repo.execute_with_state::<Payment>(id, cmd, &ctx).await?,
    };
    if let Executed::Appended { .. } = executed {
        count();
    }
    Ok(state)
}

/// Before `retry_until`: the answer that makes the state machine wait and try again. After it:
/// `PaymentProviderUnavailable`.
fn wait_or_give_up(
    parking: &Parking,
    now: time::OffsetDateTime,
    retry_until: &str,
    e: Unavailable,
    waiting: &str,
) -> Result<StepOutcome, StepError> {
    let deadline = time::OffsetDateTime::parse(retry_until, &time::format_description::well_known::Rfc3339)
        .map_err(|err| StepError::Permanent(format!("postponed until {retry_until:?}: {err}")))?;
    let left = std::time::Duration::try_from(deadline - now).unwrap_or_default();
    if left.is_zero() {
        let cause = format!("{e}; {waiting} waited for the gateway until {retry_until}");
        return Ok(Err(StepFailure::new(PAYMENT_PROVIDER_UNAVAILABLE, cause)));
    }
    let wait = parking.wait(e.retry_after, left);
    tracing::info!(wait_s = wait.as_secs(), %retry_until, reason = %e, "{waiting} parked: the gateway is unavailable");
    Ok(Ok(json!({
        "pending": true,
        "retryInSeconds": wait.as_secs(),
        "retryUntil": retry_until,
        "reason": e.to_string(),
    })))
}

/// Records the request, asks the gateway, records its answer. While the gateway is
/// unavailable, the order is parked (see `park`) rather than compensated.
pub async fn charge_payment<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    parking: &Parking,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let request = PaymentCommand::Request { order_id: order.order_id.clone(), amount: order.total };
    let (executed, mut payment) =
        repo.execute_with_state::<Payment>(order.order_id.as_str(), &request, &context(msg)).await?;
    if let Payment::Requested { amount } | Payment::Postponed { amount, .. } = payment {
        let requested = executed.state_version().map(|version| (payment.clone(), version));
        payment = match resolve_charge(repo, gateway, msg, Resolve::Charge, amount, requested.clone()).await? {
            Ok(p) => p,
            Err(e) => return park(repo, parking, msg, requested, e, &CHARGE_PARKED).await,
        };
    }
    Ok(match payment {
        Payment::Charged { payment_id, amount } => {
            Ok(json!({ "paymentId": payment_id, "amountMinor": amount.amount_minor }))
        }
        Payment::Declined { reason } => Err(StepFailure::new(PAYMENT_DECLINED, reason)),
        Payment::Refunded { .. } | Payment::RefundPostponed { .. } => {
            Err(StepFailure::new(PAYMENT_DECLINED, "the payment is being or was refunded"))
        }
        Payment::None | Payment::Requested { .. } | Payment::Postponed { .. } => {
            return Err(StepError::Retryable("payment answer not recorded".into()));
        }
    })
}

/// Compensation of `charge_payment`. A charge whose answer was never recorded is settled
/// through the gateway first (voided unless it was made), so money taken is always given back
/// and none is taken for an order being cancelled. While the gateway is
/// unavailable the refund is parked (see `park`); a refusal is final (`RefundRefused`).
pub async fn refund_payment<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    parking: &Parking,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let id = order.order_id.as_str();
    let loaded = repo.load::<Payment>(id).await?;
    let at = (loaded.state.clone(), loaded.version);
    let mut payment = loaded.state;
    if let Some((None, amount)) = payment.refundable() {
        payment = match resolve_charge(repo, gateway, msg, Resolve::Void, amount, Some(at.clone())).await? {
            Ok(p) => p,
            Err(e) => return park(repo, parking, msg, Some(at), e, &REFUND_PARKED).await,
        };
    }
    // (When resolving the charge moved the state on, a postponement loads it again.)
    let held = (payment == at.0).then_some(at);
    match payment {
        Payment::Charged { payment_id, amount }
        | Payment::RefundPostponed { payment_id: Some(payment_id), amount, .. } => {
            let refund_id = match gateway.refund(&format!("refund-{id}"), &payment_id, amount).await {
                Ok(RefundOutcome::Refunded { refund_id }) => refund_id,
                Ok(RefundOutcome::Refused { reason }) => return Ok(Err(StepFailure::new(REFUND_REFUSED, reason))),
                Err(e) => return park(repo, parking, msg, held, e, &REFUND_PARKED).await,
            };
            let cmd = PaymentCommand::RecordRefund { order_id: order.order_id.clone(), refund_id: refund_id.clone() };
            // Counted when this command recorded the refund (not a concurrent redelivery's replay).
            if let Executed::Appended { .. } = repo.execute::<Payment>(id, &cmd, &context(msg)).await? {
                metrics::compensation_run("RefundPayment");
            }
            Ok(Ok(json!({ "refundId": refund_id })))
        }
        Payment::Refunded { refund_id, .. } => Ok(Ok(json!({ "refundId": refund_id }))),
        Payment::None | Payment::Declined { .. } => {
            Ok(Ok(json!({ "refunded": false, "reason": "nothing was charged" })))
        }
        Payment::Requested { .. } | Payment::Postponed { .. } | Payment::RefundPostponed { payment_id: None, .. } => {
            Err(StepError::Retryable("payment answer not recorded".into()))
        }
    }
}

/// Asks the carrier about a recorded booking request (idempotent) and records the answer.
async fn resolve_booking<S: EventStore, C: Carrier>(
    repo: &Repository<S>,
    carrier: &C,
    msg: &StepMessage,
    at: Option<u64>,
) -> Result<Result<Shipment, Unavailable>, StepError> {
    let order = &msg.order;
    let items = order.lines.iter().map(|l| l.quantity).sum();
    let key = format!("ship-{}", order.order_id);
    let command = match carrier.create_shipment(&key, &order.shipping_address, items).await {
        Err(e) => return Ok(Err(e)),
        Ok(ShipmentOutcome::Created { shipment_id, carrier }) => {
            ShipmentCommand::RecordCreated { order_id: order.order_id.clone(), shipment_id, carrier }
        }
        Ok(ShipmentOutcome::Rejected { reason }) => {
            ShipmentCommand::RecordRejected { order_id: order.order_id.clone(), reason }
        }
    };
    let (id, ctx) = (order.order_id.as_str(), context(msg));
    Ok(Ok(match at {
        Some(version) => repo.execute_from(id, Shipment::Requested, version, &command, &ctx).await?.1,
        None => repo.execute_with_state::<Shipment>(id, &command, &ctx).await?.1,
    }))
}

/// Records the request, books with the carrier, records its answer.
pub async fn create_shipment<S: EventStore, C: Carrier>(
    repo: &Repository<S>,
    carrier: &C,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let request = ShipmentCommand::Request { order_id: order.order_id.clone() };
    let (executed, mut shipment) =
        repo.execute_with_state::<Shipment>(order.order_id.as_str(), &request, &context(msg)).await?;
    if shipment == Shipment::Requested {
        shipment = match resolve_booking(repo, carrier, msg, executed.state_version()).await? {
            Ok(s) => s,
            Err(e) => return Ok(unavailable(e)),
        };
    }
    Ok(match shipment {
        Shipment::Created { shipment_id, carrier } => Ok(json!({ "shipmentId": shipment_id, "carrier": carrier })),
        Shipment::Rejected { reason } => Err(StepFailure::new(SHIPMENT_REJECTED, reason)),
        Shipment::Cancelled { .. } => Err(StepFailure::new(SHIPMENT_REJECTED, "the shipment was already cancelled")),
        Shipment::None | Shipment::Requested => {
            return Err(StepError::Retryable("shipment answer not recorded".into()));
        }
    })
}

/// Compensation of `create_shipment`; a booking whose answer was lost is resolved first.
pub async fn cancel_shipment<S: EventStore, C: Carrier>(
    repo: &Repository<S>,
    carrier: &C,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let id = order.order_id.as_str();
    let loaded = repo.load::<Shipment>(id).await?;
    let mut shipment = loaded.state;
    if shipment == Shipment::Requested {
        shipment = match resolve_booking(repo, carrier, msg, Some(loaded.version)).await? {
            Ok(s) => s,
            Err(e) => return Ok(unavailable(e)),
        };
    }
    match shipment {
        Shipment::Created { shipment_id, .. } => {
            if let Err(e) = carrier.cancel_shipment(&format!("cancel-{id}"), &shipment_id).await {
                return Ok(unavailable(e));
            }
            let cancel = ShipmentCommand::RecordCancelled { order_id: order.order_id.clone() };
            // Counted when this command recorded the cancellation (not a concurrent redelivery's replay).
            if let Executed::Appended { .. } = repo.execute::<Shipment>(id, &cancel, &context(msg)).await? {
                metrics::compensation_run("CancelShipment");
            }
            Ok(Ok(json!({ "cancelled": shipment_id })))
        }
        Shipment::Cancelled { shipment_id } => Ok(Ok(json!({ "cancelled": shipment_id }))),
        Shipment::None | Shipment::Rejected { .. } => {
            Ok(Ok(json!({ "cancelled": false, "reason": "nothing was booked" })))
        }
        Shipment::Requested => Err(StepError::Retryable("shipment answer not recorded".into())),
    }
}

/// Tells the customer; a customer who cannot be reached fails the step (and the order).
pub async fn send_notification<S: EventStore, N: Notifier>(
    repo: &Repository<S>,
    notifier: &N,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let id = order.order_id.as_str();
    let current = repo.load::<Order>(id).await?;
    if current.state.notified {
        return Ok(Ok(json!({ "notified": true })));
    }
    // A late redelivery, after the saga ended the order: its customer is not told it is on its way.
    if current.state.status != OrderStatus::Placed {
        return Err(StepError::Permanent(format!("order is {:?}: not notified", current.state.status)));
    }
    let text = format!("Your order {id} of {} is confirmed and on its way.", order.total);
    match notifier.notify(&format!("notify-{id}"), order.customer_id.as_str(), &text).await {
        Err(e) => Ok(unavailable(e)),
        Ok(NotifyOutcome::Undeliverable { reason }) => Ok(Err(StepFailure::new(NOTIFICATION_UNDELIVERABLE, reason))),
        Ok(NotifyOutcome::Sent { message_id }) => {
            let cmd = OrderCommand::RecordNotification { channel: "email".into(), message_id: message_id.clone() };
            repo.execute_from(id, current.state, current.version, &cmd, &context(msg)).await?;
            Ok(Ok(json!({ "notified": true, "messageId": message_id })))
        }
    }
}

/// The end of the happy path: reserved stock leaves the warehouse, the order completes.
pub async fn complete_order<S: EventStore>(repo: &Repository<S>, msg: &StepMessage) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let id = order.order_id.as_str();
    let ctx = context(msg);
    // The stock commits (one stream per SKU) and the reads of payment, shipment, order and its
    // placing (for the metric) are independent: they go out together, and the order completes
    // once all are in.
    let commits = try_join_all(order.lines.iter().map(|line| {
        let cmd = InventoryCommand::Commit { order_id: order.order_id.clone() };
        let ctx = &ctx;
        async move { repo.execute::<Inventory>(line.sku.as_str(), &cmd, ctx).await }
    }));
    let (commits, payment, shipment, current, placed) = join5(
        commits,
        repo.load::<Payment>(id),
        repo.load::<Shipment>(id),
        repo.load::<Order>(id),
        placed_at(repo, id),
    )
    .await;
    commits?;
    let payment_id = match payment?.state {
        Payment::Charged { payment_id, .. } => payment_id,
        other => return Err(StepError::Permanent(format!("completing an order whose payment is {other:?}"))),
    };
    let shipment_id = match shipment?.state {
        Shipment::Created { shipment_id, .. } => shipment_id,
        other => return Err(StepError::Permanent(format!("completing an order whose shipment is {other:?}"))),
    };
    let current = current?;
    let cmd = OrderCommand::Complete { payment_id: payment_id.clone(), shipment_id: shipment_id.clone() };
    let (executed, _) = repo.execute_from(id, current.state, current.version, &cmd, &ctx).await?;
    record_outcome(&executed, placed, Outcome::Completed);
    Ok(Ok(json!({ "status": "Completed", "paymentId": payment_id, "shipmentId": shipment_id })))
}

/// When the order was placed (its stream's first event), if that reads: read beside the command
/// that ends the order, so the metric adds no round trip to the step.
async fn placed_at<S: EventStore>(repo: &Repository<S>, id: &str) -> Option<String> {
    let stream = StreamId::new(Order::CATEGORY, id).ok()?;
    let first = repo.store().read_page(&stream, 0, 1).await.ok()?;
    first.into_iter().next().map(|placed| placed.recorded_at)
}

/// An order reached its outcome with this command (not a redelivery, which appends nothing):
/// counted, with the time since it was placed when that is known.
fn record_outcome(executed: &Executed, placed: Option<String>, outcome: Outcome<'_>) {
    let Executed::Appended { committed, .. } = executed else { return };
    let duration = placed.and_then(|placed| metrics::between(&placed, &committed.recorded_at));
    metrics::order_outcome(outcome, duration);
}

/// The failure's error code (`PaymentDeclined`, `States.Timeout`…): a metric dimension.
fn failure_code(msg: &StepMessage) -> &str {
    msg.failure.as_ref().map_or("Unknown", |f| f.error.as_str())
}

fn failure_text(msg: &StepMessage) -> (String, String) {
    let step = msg.failed_step.clone().unwrap_or_else(|| "unknown".into());
    let reason = msg.failure.as_ref().map_or_else(|| "no reason given".into(), super::Failure::describe);
    (step, reason)
}

/// After the compensations: the order is cancelled, with the step that failed and why.
pub async fn cancel_order<S: EventStore>(repo: &Repository<S>, msg: &StepMessage) -> Result<StepOutcome, StepError> {
    let (failed_step, reason) = failure_text(msg);
    let cmd = OrderCommand::Cancel { reason: reason.clone(), failed_step: failed_step.clone() };
    let id = msg.order.order_id.as_str();
    let (executed, placed) = join(repo.execute_with_state::<Order>(id, &cmd, &context(msg)), placed_at(repo, id)).await;
    let (executed, order) = executed?;
    record_outcome(&executed, placed, Outcome::Cancelled(failure_code(msg)));
    Ok(Ok(
        json!({ "status": "Cancelled", "failedStep": failed_step, "reason": order.cancellation_reason.unwrap_or(reason) }),
    ))
}

/// Steps failed after their retries (the saga ran the other compensations all the same):
/// recorded on the order, every one of them, for someone to act on.
pub async fn flag_for_manual_action<S: EventStore>(
    repo: &Repository<S>,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let failures = msg.failed_actions();
    let cmd = OrderCommand::FlagForManualAction { failures: failures.clone() };
    let id = msg.order.order_id.as_str();
    let (executed, placed) = join(repo.execute_with_state::<Order>(id, &cmd, &context(msg)), placed_at(repo, id)).await;
    let (executed, order) = executed?;
    if order.status != OrderStatus::NeedsManualAction {
        return Err(StepError::Permanent(format!("order is {:?}, not flagged", order.status)));
    }
    let steps = failures.iter().map(|f| f.step.as_str()).collect::<Vec<_>>().join("+");
    record_outcome(&executed, placed, Outcome::FlaggedForManualAction(&steps));
    Ok(Ok(json!({ "status": "NeedsManualAction", "failures": failures })))
}
