//! Shipment per order (stream `Shipment-<orderId>`). As with payments, the request is recorded
//! before the carrier is called, so a booking whose answer was lost can still be found and
//! cancelled, and a redelivered command reuses the recorded answer.

use serde::{Deserialize, Serialize};

use super::ids::OrderId;
use crate::aggregate::{Aggregate, DomainEvent};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "camelCase", rename_all_fields = "camelCase")]
pub enum Shipment {
    #[default]
    None,
    Requested,
    Created {
        shipment_id: String,
        carrier: String,
    },
    Rejected {
        reason: String,
    },
    Cancelled {
        shipment_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all_fields = "camelCase")]
pub enum ShipmentEvent {
    ShipmentRequested { order_id: OrderId },
    ShipmentCreated { order_id: OrderId, shipment_id: String, carrier: String },
    ShipmentRejected { order_id: OrderId, reason: String },
    ShipmentCancelled { order_id: OrderId, shipment_id: String },
}

impl DomainEvent for ShipmentEvent {}

#[derive(Debug, Clone)]
pub enum ShipmentCommand {
    Request { order_id: OrderId },
    RecordCreated { order_id: OrderId, shipment_id: String, carrier: String },
    RecordRejected { order_id: OrderId, reason: String },
    RecordCancelled { order_id: OrderId },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shipment is {0}: cannot {1}")]
pub struct ShipmentError(&'static str, &'static str);

impl Aggregate for Shipment {
    const CATEGORY: &'static str = "Shipment";
    /// One order's stream: a handful of events, replayed in one Query.
    const SNAPSHOTS: bool = false;
    type Event = ShipmentEvent;
    type Command = ShipmentCommand;
    type Error = ShipmentError;

    fn apply(&mut self, event: &ShipmentEvent) {
        *self = match event {
            ShipmentEvent::ShipmentRequested { .. } => Shipment::Requested,
            ShipmentEvent::ShipmentCreated { shipment_id, carrier, .. } => {
                Shipment::Created { shipment_id: shipment_id.clone(), carrier: carrier.clone() }
            }
            ShipmentEvent::ShipmentRejected { reason, .. } => Shipment::Rejected { reason: reason.clone() },
            ShipmentEvent::ShipmentCancelled { shipment_id, .. } => {
                Shipment::Cancelled { shipment_id: shipment_id.clone() }
            }
        };
    }

    fn decide(&self, command: &ShipmentCommand) -> Result<Vec<ShipmentEvent>, ShipmentError> {
        use ShipmentCommand as C;
        let state = match self {
            Shipment::None => "not requested",
            Shipment::Requested => "requested",
            Shipment::Created { .. } => "created",
            Shipment::Rejected { .. } => "rejected",
            Shipment::Cancelled { .. } => "cancelled",
        };
        match (command, self) {
            (C::Request { order_id }, Shipment::None) => {
                Ok(vec![ShipmentEvent::ShipmentRequested { order_id: order_id.clone() }])
            }
            (C::Request { .. }, _) => Ok(vec![]),
            (C::RecordCreated { order_id, shipment_id, carrier }, Shipment::Requested) => {
                Ok(vec![ShipmentEvent::ShipmentCreated {
                    order_id: order_id.clone(),
                    shipment_id: shipment_id.clone(),
                    carrier: carrier.clone(),
                }])
            }
            (C::RecordRejected { order_id, reason }, Shipment::Requested) => {
                Ok(vec![ShipmentEvent::ShipmentRejected { order_id: order_id.clone(), reason: reason.clone() }])
            }
            (C::RecordCreated { .. }, Shipment::Created { .. } | Shipment::Cancelled { .. }) => Ok(vec![]),
            (C::RecordRejected { .. }, Shipment::Rejected { .. }) => Ok(vec![]),
            (C::RecordCancelled { order_id }, Shipment::Created { shipment_id, .. }) => {
                Ok(vec![ShipmentEvent::ShipmentCancelled {
                    order_id: order_id.clone(),
                    shipment_id: shipment_id.clone(),
                }])
            }
            (C::RecordCancelled { .. }, Shipment::Cancelled { .. }) => Ok(vec![]),
            (C::RecordCreated { .. }, _) => Err(ShipmentError(state, "record a created shipment")),
            (C::RecordRejected { .. }, _) => Err(ShipmentError(state, "record a rejection")),
            (C::RecordCancelled { .. }, _) => Err(ShipmentError(state, "cancel")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::testing::given;

    fn order_id() -> OrderId {
        OrderId::parse("o-1").expect("id")
    }

    fn created() -> ShipmentEvent {
        ShipmentEvent::ShipmentCreated { order_id: order_id(), shipment_id: "ship-1".into(), carrier: "DHL".into() }
    }

    #[test]
    fn a_booking_is_requested_then_answered_once_and_cancelled_once() {
        let record_created = ShipmentCommand::RecordCreated {
            order_id: order_id(),
            shipment_id: "ship-1".into(),
            carrier: "DHL".into(),
        };
        let cancel = ShipmentCommand::RecordCancelled { order_id: order_id() };
        let done = given::<Shipment>([])
            .when(ShipmentCommand::Request { order_id: order_id() })
            .then_expect([ShipmentEvent::ShipmentRequested { order_id: order_id() }])
            .when(ShipmentCommand::Request { order_id: order_id() })
            .then_nothing()
            .when(record_created.clone())
            .then_expect([created()])
            // a concurrent redelivery recording the same answer changes nothing
            .when(record_created)
            .then_nothing()
            .when(ShipmentCommand::RecordRejected { order_id: order_id(), reason: "late".into() })
            .then_error(ShipmentError("created", "record a rejection"))
            .when(cancel.clone())
            .then_expect([ShipmentEvent::ShipmentCancelled { order_id: order_id(), shipment_id: "ship-1".into() }])
            .when(cancel)
            .then_nothing();
        assert_eq!(done.into_state(), Shipment::Cancelled { shipment_id: "ship-1".into() });
    }

    #[test]
    fn nothing_booked_is_not_cancelled() {
        let cancel = ShipmentCommand::RecordCancelled { order_id: order_id() };
        given::<Shipment>([]).when(cancel.clone()).then_error(ShipmentError("not requested", "cancel"));
        let rejected = ShipmentEvent::ShipmentRejected { order_id: order_id(), reason: "address not served".into() };
        given::<Shipment>([ShipmentEvent::ShipmentRequested { order_id: order_id() }, rejected])
            .when(cancel)
            .then_error(ShipmentError("rejected", "cancel"));
    }
}
