//! Domain and adapters shared by every function, laid out as ports and adapters.
//!
//! The core knows no AWS type; its traits are the ports:
//! - [`domain`]: the order domain (Order, Inventory, Payment, Shipment), money, and the external
//!   services it calls (traits).
//! - [`aggregate`]: typed events, aggregates, snapshots and command execution over the store.
//! - [`eventstore`]: the immutable, per-stream event log: its port, and an in-memory store for
//!   unit tests.
//! - [`saga`]: the order saga's step contract and each step's logic.
//! - [`readmodel`]: the read models (CQRS query side) and how events change them.
//! - [`retry`], [`deadline`], [`ratelimit`], [`resilience`]: policies (backoff with jitter, the
//!   invocation's deadline, a sliding-window limiter, timeouts, bulkhead, hedging, breaker).
//! - [`auth`], [`config`], [`text`], [`telemetry`], [`metrics`]: the caller's identity,
//!   configuration from the environment, bounded text, JSON logs and EMF metrics.
//!
//! At the edge:
//! - [`adapters`]: DynamoDB, SQS, Step Functions, the SDK configuration, the HTTP providers.
//! - [`lambda`]: the batch loop of every SQS and stream consumer, and the step and projection
//!   Lambdas built on it.

pub mod adapters;
pub mod aggregate;
pub mod auth;
pub mod config;
pub mod deadline;
pub mod domain;
pub mod eventstore;
pub mod lambda;
pub mod metrics;
pub mod ratelimit;
pub mod readmodel;
#[cfg(feature = "providers")]
pub mod resilience;
pub mod retry;
pub mod saga;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod text;
