//! The logic of each saga step and compensation, over the repository and the external
//! services. Each returns its outcome from the aggregates' state, so running it again (a
//! redelivery, a retry by the state machine) gives the same outcome with no second effect.

use futures::future::{join4, try_join_all};
use serde_json::json;

use super::errors::*;
use super::{StepError, StepFailure, StepMessage, StepOutcome};
use crate::aggregate::{Aggregate, CommandContext, Executed, Repository};
use crate::domain::inventory::{Inventory, InventoryCommand, Reservation};
use crate::domain::order::{Order, OrderCommand, OrderStatus};
use crate::domain::payment::{Payment, PaymentCommand};
use crate::domain::services::{
    Carrier, ChargeOutcome, Notifier, NotifyOutcome, PaymentGateway, ShipmentOutcome, Unavailable,
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

/// Asks the gateway about a recorded charge request (idempotent: the same key gives the same
/// answer, so a lost answer is found again) and records the answer.
async fn resolve_charge<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    msg: &StepMessage,
    amount: crate::domain::Money,
    at: Option<u64>,
) -> Result<Result<Payment, Unavailable>, StepError> {
    let order = &msg.order;
    let key = format!("charge-{}", order.order_id);
    let command = match gateway.charge(&key, amount, &order.payment_token).await {
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
        Some(version) => repo.execute_from(id, Payment::Requested { amount }, version, &command, &ctx).await?.1,
        None => repo.execute_with_state::<Payment>(id, &command, &ctx).await?.1,
    }))
}

/// Records the request, asks the gateway, records its answer.
pub async fn charge_payment<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let request = PaymentCommand::Request { order_id: order.order_id.clone(), amount: order.total };
    let (executed, mut payment) =
        repo.execute_with_state::<Payment>(order.order_id.as_str(), &request, &context(msg)).await?;
    if let Payment::Requested { amount } = payment {
        payment = match resolve_charge(repo, gateway, msg, amount, executed.state_version()).await? {
            Ok(p) => p,
            Err(e) => return Ok(unavailable(e)),
        };
    }
    Ok(match payment {
        Payment::Charged { payment_id, amount } => {
            Ok(json!({ "paymentId": payment_id, "amountMinor": amount.amount_minor }))
        }
        Payment::Declined { reason } => Err(StepFailure::new(PAYMENT_DECLINED, reason)),
        Payment::Refunded { .. } => Err(StepFailure::new(PAYMENT_DECLINED, "the payment was already refunded")),
        Payment::None | Payment::Requested { .. } => {
            return Err(StepError::Retryable("payment answer not recorded".into()));
        }
    })
}

/// Compensation of `charge_payment`. A charge whose answer was never recorded is resolved
/// through the gateway first, so money taken is always given back.
pub async fn refund_payment<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let id = order.order_id.as_str();
    let loaded = repo.load::<Payment>(id).await?;
    let mut payment = loaded.state;
    if let Payment::Requested { amount } = payment {
        payment = match resolve_charge(repo, gateway, msg, amount, Some(loaded.version)).await? {
            Ok(p) => p,
            Err(e) => return Ok(unavailable(e)),
        };
    }
    match payment {
        Payment::Charged { payment_id, amount } => {
            let refund_id = match gateway.refund(&format!("refund-{id}"), &payment_id, amount).await {
                Ok(refund_id) => refund_id,
                Err(e) => return Ok(unavailable(e)),
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
        Payment::Requested { .. } => Err(StepError::Retryable("payment answer not recorded".into())),
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
    // The stock commits (one stream per SKU) and the reads of payment, shipment and order are
    // independent: they go out together, and the order completes once all are in.
    let commits = try_join_all(order.lines.iter().map(|line| {
        let cmd = InventoryCommand::Commit { order_id: order.order_id.clone() };
        let ctx = &ctx;
        async move { repo.execute::<Inventory>(line.sku.as_str(), &cmd, ctx).await }
    }));
    let (commits, payment, shipment, current) =
        join4(commits, repo.load::<Payment>(id), repo.load::<Shipment>(id), repo.load::<Order>(id)).await;
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
    record_outcome(repo, id, &executed, Outcome::Completed).await;
    Ok(Ok(json!({ "status": "Completed", "paymentId": payment_id, "shipmentId": shipment_id })))
}

/// An order reached its outcome with this command (not a redelivery, which appends nothing):
/// counted, with the time since its `OrderPlaced` (the stream's first event) when that reads.
async fn record_outcome<S: EventStore>(repo: &Repository<S>, id: &str, executed: &Executed, outcome: Outcome<'_>) {
    let Executed::Appended { committed, .. } = executed else { return };
    let placed = match StreamId::new(Order::CATEGORY, id) {
        Ok(stream) => repo.store().read_page(&stream, 0, 1).await.ok().and_then(|events| events.into_iter().next()),
        Err(_) => None,
    };
    let duration = placed.and_then(|placed| metrics::between(&placed.recorded_at, &committed.recorded_at));
    metrics::order_outcome(outcome, duration);
}

/// The failure's error code (`PaymentDeclined`, `States.Timeout`…): a metric dimension.
fn failure_code(msg: &StepMessage) -> &str {
    msg.failure.as_ref().map_or("Unknown", |f| f.error.as_str())
}

fn failure_text(msg: &StepMessage) -> (String, String) {
    let step = msg.failed_step.clone().unwrap_or_else(|| "unknown".into());
    let reason = match &msg.failure {
        Some(f) if !f.cause.is_empty() => format!("{}: {}", f.error, f.cause),
        Some(f) => f.error.clone(),
        None => "no reason given".into(),
    };
    (step, reason)
}

/// After the compensations: the order is cancelled, with the step that failed and why.
pub async fn cancel_order<S: EventStore>(repo: &Repository<S>, msg: &StepMessage) -> Result<StepOutcome, StepError> {
    let (failed_step, reason) = failure_text(msg);
    let cmd = OrderCommand::Cancel { reason: reason.clone(), failed_step: failed_step.clone() };
    let id = msg.order.order_id.as_str();
    let (executed, order) = repo.execute_with_state::<Order>(id, &cmd, &context(msg)).await?;
    record_outcome(repo, id, &executed, Outcome::Cancelled(failure_code(msg))).await;
    Ok(Ok(
        json!({ "status": "Cancelled", "failedStep": failed_step, "reason": order.cancellation_reason.unwrap_or(reason) }),
    ))
}

/// A compensation failed after its retries: recorded on the order for someone to act on.
pub async fn flag_for_manual_action<S: EventStore>(
    repo: &Repository<S>,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let (failed_step, error) = failure_text(msg);
    let cmd = OrderCommand::FlagForManualAction { failed_step: failed_step.clone(), error: error.clone() };
    let id = msg.order.order_id.as_str();
    let (executed, order) = repo.execute_with_state::<Order>(id, &cmd, &context(msg)).await?;
    if order.status != OrderStatus::NeedsManualAction {
        return Err(StepError::Permanent(format!("order is {:?}, not flagged", order.status)));
    }
    record_outcome(repo, id, &executed, Outcome::FlaggedForManualAction(&failed_step)).await;
    Ok(Ok(json!({ "status": "NeedsManualAction", "failedStep": failed_step, "error": error })))
}
