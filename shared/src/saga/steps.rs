//! The logic of each saga step and compensation, over the repository and the external
//! services. Each returns its outcome from the aggregates' state, so running it again (a
//! redelivery, a retry by the state machine) gives the same outcome with no second effect.

use serde_json::json;

use super::errors::*;
use super::{StepError, StepFailure, StepMessage, StepOutcome};
use crate::aggregate::{CommandContext, Repository};
use crate::domain::inventory::{Inventory, InventoryCommand, Reservation};
use crate::domain::order::{Order, OrderCommand, OrderStatus};
use crate::domain::payment::{Payment, PaymentCommand};
use crate::domain::services::{
    Carrier, ChargeOutcome, Notifier, NotifyOutcome, PaymentGateway, ShipmentOutcome, Unavailable,
};
use crate::domain::shipment::{Shipment, ShipmentCommand};
use crate::eventstore::EventStore;

fn context(msg: &StepMessage) -> CommandContext {
    CommandContext {
        idempotency_key: None,
        correlation_id: Some(msg.order.order_id.to_string()),
        causation_id: Some(format!("{:?}", msg.step)),
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
    let mut short = Vec::new();
    for line in &msg.order.lines {
        let cmd = InventoryCommand::Reserve { order_id: order_id.clone(), quantity: line.quantity };
        let (_, inventory) = repo.execute_with_state::<Inventory>(line.sku.as_str(), &cmd, &ctx).await?;
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
    let mut released = 0;
    for line in &msg.order.lines {
        let cmd = InventoryCommand::Release { order_id: msg.order.order_id.clone() };
        if let crate::aggregate::Executed::Appended { .. } =
            repo.execute::<Inventory>(line.sku.as_str(), &cmd, &ctx).await?
        {
            released += 1;
        }
    }
    Ok(released)
}

/// Compensation of `reserve_inventory`: returns every unit this order holds. Nothing held is
/// not an error.
pub async fn release_inventory<S: EventStore>(
    repo: &Repository<S>,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let released = release_all(repo, msg).await?;
    Ok(Ok(json!({ "releasedLines": released })))
}

/// Asks the gateway about a recorded charge request (idempotent: the same key gives the same
/// answer, so a lost answer is found again) and records the answer.
async fn resolve_charge<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    msg: &StepMessage,
    amount: crate::domain::Money,
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
    Ok(Ok(repo.execute_with_state::<Payment>(order.order_id.as_str(), &command, &context(msg)).await?.1))
}

/// Records the request, asks the gateway, records its answer.
pub async fn charge_payment<S: EventStore, G: PaymentGateway>(
    repo: &Repository<S>,
    gateway: &G,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let request = PaymentCommand::Request { order_id: order.order_id.clone(), amount: order.total };
    let (_, mut payment) = repo.execute_with_state::<Payment>(order.order_id.as_str(), &request, &context(msg)).await?;
    if let Payment::Requested { amount } = payment {
        payment = match resolve_charge(repo, gateway, msg, amount).await? {
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
    let mut payment = repo.load::<Payment>(id).await?.state;
    if let Payment::Requested { amount } = payment {
        payment = match resolve_charge(repo, gateway, msg, amount).await? {
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
            repo.execute::<Payment>(id, &cmd, &context(msg)).await?;
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
    Ok(Ok(repo.execute_with_state::<Shipment>(order.order_id.as_str(), &command, &context(msg)).await?.1))
}

/// Records the request, books with the carrier, records its answer.
pub async fn create_shipment<S: EventStore, C: Carrier>(
    repo: &Repository<S>,
    carrier: &C,
    msg: &StepMessage,
) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let request = ShipmentCommand::Request { order_id: order.order_id.clone() };
    let (_, mut shipment) =
        repo.execute_with_state::<Shipment>(order.order_id.as_str(), &request, &context(msg)).await?;
    if shipment == Shipment::Requested {
        shipment = match resolve_booking(repo, carrier, msg).await? {
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
    let mut shipment = repo.load::<Shipment>(id).await?.state;
    if shipment == Shipment::Requested {
        shipment = match resolve_booking(repo, carrier, msg).await? {
            Ok(s) => s,
            Err(e) => return Ok(unavailable(e)),
        };
    }
    match shipment {
        Shipment::Created { shipment_id, .. } => {
            if let Err(e) = carrier.cancel_shipment(&format!("cancel-{id}"), &shipment_id).await {
                return Ok(unavailable(e));
            }
            repo.execute::<Shipment>(
                id,
                &ShipmentCommand::RecordCancelled { order_id: order.order_id.clone() },
                &context(msg),
            )
            .await?;
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
    if repo.load::<Order>(id).await?.state.notified {
        return Ok(Ok(json!({ "notified": true })));
    }
    let text = format!("Your order {id} of {} is confirmed and on its way.", order.total);
    match notifier.notify(&format!("notify-{id}"), order.customer_id.as_str(), &text).await {
        Err(e) => Ok(unavailable(e)),
        Ok(NotifyOutcome::Undeliverable { reason }) => Ok(Err(StepFailure::new(NOTIFICATION_UNDELIVERABLE, reason))),
        Ok(NotifyOutcome::Sent { message_id }) => {
            let cmd = OrderCommand::RecordNotification { channel: "email".into(), message_id: message_id.clone() };
            repo.execute::<Order>(id, &cmd, &context(msg)).await?;
            Ok(Ok(json!({ "notified": true, "messageId": message_id })))
        }
    }
}

/// The end of the happy path: reserved stock leaves the warehouse, the order completes.
pub async fn complete_order<S: EventStore>(repo: &Repository<S>, msg: &StepMessage) -> Result<StepOutcome, StepError> {
    let order = &msg.order;
    let id = order.order_id.as_str();
    let ctx = context(msg);
    for line in &order.lines {
        repo.execute::<Inventory>(
            line.sku.as_str(),
            &InventoryCommand::Commit { order_id: order.order_id.clone() },
            &ctx,
        )
        .await?;
    }
    let payment_id = match repo.load::<Payment>(id).await?.state {
        Payment::Charged { payment_id, .. } => payment_id,
        other => return Err(StepError::Permanent(format!("completing an order whose payment is {other:?}"))),
    };
    let shipment_id = match repo.load::<Shipment>(id).await?.state {
        Shipment::Created { shipment_id, .. } => shipment_id,
        other => return Err(StepError::Permanent(format!("completing an order whose shipment is {other:?}"))),
    };
    let cmd = OrderCommand::Complete { payment_id: payment_id.clone(), shipment_id: shipment_id.clone() };
    repo.execute::<Order>(id, &cmd, &ctx).await?;
    Ok(Ok(json!({ "status": "Completed", "paymentId": payment_id, "shipmentId": shipment_id })))
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
    let (_, order) = repo.execute_with_state::<Order>(msg.order.order_id.as_str(), &cmd, &context(msg)).await?;
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
    let (_, order) = repo.execute_with_state::<Order>(msg.order.order_id.as_str(), &cmd, &context(msg)).await?;
    if order.status != OrderStatus::NeedsManualAction {
        return Err(StepError::Permanent(format!("order is {:?}, not flagged", order.status)));
    }
    Ok(Ok(json!({ "status": "NeedsManualAction", "failedStep": failed_step, "error": error })))
}
