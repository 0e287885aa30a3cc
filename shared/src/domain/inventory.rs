//! Inventory per SKU (stream `Inventory-<SKU>`): available and reserved stock, and what happened
//! to each order's reservation. Keeping the per-order outcome makes every command idempotent by
//! state: a redelivered Reserve after a Release does not reserve again, a second Release does
//! nothing, and a rejected reservation stays rejected.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ids::{OrderId, Sku};
use crate::aggregate::{Aggregate, DomainEvent};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reservation {
    Reserved(u32),
    /// Not enough stock when the order asked.
    Rejected(u32),
    Released(u32),
    /// Shipped: the stock has left the warehouse.
    Committed(u32),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inventory {
    pub sku: Option<Sku>,
    pub available: u64,
    pub reserved: u64,
    pub reservations: BTreeMap<OrderId, Reservation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all_fields = "camelCase")]
pub enum InventoryEvent {
    InventoryRestocked { sku: Sku, quantity: u32 },
    InventoryReserved { order_id: OrderId, quantity: u32 },
    InventoryReservationRejected { order_id: OrderId, requested: u32, available: u64 },
    InventoryReleased { order_id: OrderId, quantity: u32 },
    InventoryCommitted { order_id: OrderId, quantity: u32 },
}

impl DomainEvent for InventoryEvent {}

#[derive(Debug, Clone)]
pub enum InventoryCommand {
    Restock { sku: Sku, quantity: u32 },
    Reserve { order_id: OrderId, quantity: u32 },
    Release { order_id: OrderId },
    Commit { order_id: OrderId },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InventoryError {
    #[error("restock quantity must be positive")]
    NothingToRestock,
    #[error("order {0} has no reservation to commit")]
    NoReservation(String),
    #[error("order {0}'s reservation was released; it cannot be committed")]
    AlreadyReleased(String),
}

impl Inventory {
    pub fn reservation(&self, order_id: &OrderId) -> Option<Reservation> {
        self.reservations.get(order_id).copied()
    }
}

impl Aggregate for Inventory {
    const CATEGORY: &'static str = "Inventory";
    type Event = InventoryEvent;
    type Command = InventoryCommand;
    type Error = InventoryError;

    fn apply(&mut self, event: &InventoryEvent) {
        match event {
            InventoryEvent::InventoryRestocked { sku, quantity } => {
                self.sku = Some(sku.clone());
                self.available += u64::from(*quantity);
            }
            InventoryEvent::InventoryReserved { order_id, quantity } => {
                self.available = self.available.saturating_sub(u64::from(*quantity));
                self.reserved += u64::from(*quantity);
                self.reservations.insert(order_id.clone(), Reservation::Reserved(*quantity));
            }
            InventoryEvent::InventoryReservationRejected { order_id, requested, .. } => {
                self.reservations.insert(order_id.clone(), Reservation::Rejected(*requested));
            }
            InventoryEvent::InventoryReleased { order_id, quantity } => {
                self.reserved = self.reserved.saturating_sub(u64::from(*quantity));
                self.available += u64::from(*quantity);
                self.reservations.insert(order_id.clone(), Reservation::Released(*quantity));
            }
            InventoryEvent::InventoryCommitted { order_id, quantity } => {
                self.reserved = self.reserved.saturating_sub(u64::from(*quantity));
                self.reservations.insert(order_id.clone(), Reservation::Committed(*quantity));
            }
        }
    }

    fn decide(&self, command: &InventoryCommand) -> Result<Vec<InventoryEvent>, InventoryError> {
        match command {
            InventoryCommand::Restock { quantity: 0, .. } => Err(InventoryError::NothingToRestock),
            InventoryCommand::Restock { sku, quantity } => {
                Ok(vec![InventoryEvent::InventoryRestocked { sku: sku.clone(), quantity: *quantity }])
            }
            InventoryCommand::Reserve { order_id, quantity } => match self.reservation(order_id) {
                // Whatever happened to this order's reservation already stands.
                Some(_) => Ok(vec![]),
                None if self.available >= u64::from(*quantity) => {
                    Ok(vec![InventoryEvent::InventoryReserved { order_id: order_id.clone(), quantity: *quantity }])
                }
                None => Ok(vec![InventoryEvent::InventoryReservationRejected {
                    order_id: order_id.clone(),
                    requested: *quantity,
                    available: self.available,
                }]),
            },
            InventoryCommand::Release { order_id } => match self.reservation(order_id) {
                Some(Reservation::Reserved(quantity)) => {
                    Ok(vec![InventoryEvent::InventoryReleased { order_id: order_id.clone(), quantity }])
                }
                // Never reserved, rejected, or already released: nothing is held for this order.
                _ => Ok(vec![]),
            },
            InventoryCommand::Commit { order_id } => match self.reservation(order_id) {
                Some(Reservation::Reserved(quantity)) => {
                    Ok(vec![InventoryEvent::InventoryCommitted { order_id: order_id.clone(), quantity }])
                }
                Some(Reservation::Committed(_)) => Ok(vec![]),
                Some(Reservation::Released(_)) => Err(InventoryError::AlreadyReleased(order_id.to_string())),
                _ => Err(InventoryError::NoReservation(order_id.to_string())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::testing::given;

    fn order(id: &str) -> OrderId {
        OrderId::parse(id).unwrap()
    }

    fn restocked(quantity: u32) -> InventoryEvent {
        InventoryEvent::InventoryRestocked { sku: Sku::parse("SKU-1").unwrap(), quantity }
    }

    fn reserve(id: &str, quantity: u32) -> InventoryCommand {
        InventoryCommand::Reserve { order_id: order(id), quantity }
    }

    fn reserved(id: &str, quantity: u32) -> InventoryEvent {
        InventoryEvent::InventoryReserved { order_id: order(id), quantity }
    }

    fn release(id: &str) -> InventoryCommand {
        InventoryCommand::Release { order_id: order(id) }
    }

    fn commit(id: &str) -> InventoryCommand {
        InventoryCommand::Commit { order_id: order(id) }
    }

    #[test]
    fn reserving_moves_stock_and_is_idempotent_per_order() {
        let inv = given::<Inventory>([restocked(5)])
            .when(reserve("a", 3))
            .then_expect([reserved("a", 3)])
            .when(reserve("a", 3))
            .then_nothing()
            .into_state();
        assert_eq!((inv.available, inv.reserved), (2, 3));
    }

    #[test]
    fn a_reservation_beyond_stock_is_rejected_and_stays_rejected() {
        let rejected =
            InventoryEvent::InventoryReservationRejected { order_id: order("a"), requested: 3, available: 2 };
        let inv = given::<Inventory>([restocked(2), rejected, restocked(10)]).when(reserve("a", 3)).then_nothing();
        assert_eq!(inv.state().reservation(&order("a")), Some(Reservation::Rejected(3)));
        given::<Inventory>([restocked(2)]).when(reserve("a", 3)).then_expect([
            InventoryEvent::InventoryReservationRejected { order_id: order("a"), requested: 3, available: 2 },
        ]);
    }

    #[test]
    fn release_returns_stock_once_and_a_late_reserve_does_not_take_it_again() {
        let inv = given::<Inventory>([restocked(4), reserved("a", 4)])
            .when(release("a"))
            .then_expect([InventoryEvent::InventoryReleased { order_id: order("a"), quantity: 4 }])
            .when(release("a"))
            .then_nothing()
            .when(reserve("a", 4))
            .then_nothing()
            .when(release("never"))
            .then_nothing()
            .into_state();
        assert_eq!((inv.available, inv.reserved), (4, 0));
    }

    #[test]
    fn commit_takes_reserved_stock_out_for_good() {
        let inv = given::<Inventory>([restocked(4), reserved("a", 1)])
            .when(commit("a"))
            .then_expect([InventoryEvent::InventoryCommitted { order_id: order("a"), quantity: 1 }])
            .when(commit("a"))
            .then_nothing()
            .when(commit("b"))
            .then_error(InventoryError::NoReservation("b".into()))
            .into_state();
        assert_eq!((inv.available, inv.reserved), (3, 0));
        let released = InventoryEvent::InventoryReleased { order_id: order("a"), quantity: 1 };
        given::<Inventory>([restocked(4), reserved("a", 1), released])
            .when(commit("a"))
            .then_error(InventoryError::AlreadyReleased("a".into()));
    }
}
