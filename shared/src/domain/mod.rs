//! The order domain: aggregates, commands, events and the external services the saga calls.
//! Nothing here knows about AWS.

pub mod dead_letter;
pub mod ids;
pub mod inventory;
pub mod money;
pub mod order;
pub mod payment;
pub mod services;
pub mod shipment;

pub use ids::{CustomerId, FieldError, OrderId, Sku};
pub use money::{Currency, Money};
