//! DynamoDB: the event store, the read models and their queries, and the counters and breaker
//! state kept in the commands table.

#[cfg(feature = "providers")]
mod breaker;
mod counters;
mod eventstore;
pub mod queries;
pub mod readmodels;
pub mod size;

#[cfg(feature = "providers")]
pub use breaker::{DynamoBreakerStore, SharedBreaker};
pub use counters::DynamoCounters;
pub use eventstore::{DynamoEventStore, EventStoreConfig, PayloadEncoding};
pub use readmodels::{ProjectionError, ReadModelStore};
