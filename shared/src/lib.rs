//! Domain and adapters shared by every function.
//!
//! - [`eventstore`]: the immutable, per-stream event log on DynamoDB (the port and its adapter).
//! - [`aggregate`]: typed events, aggregates, snapshots and command execution over the store.
//! - [`retry`]: bounded exponential backoff with full jitter.
//! - [`config`]: configuration from the environment.

pub mod aggregate;
pub mod config;
pub mod eventstore;
pub mod retry;
