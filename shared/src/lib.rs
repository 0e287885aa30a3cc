//! Domain and adapters shared by every function.
//!
//! - [`eventstore`]: the immutable, per-stream event log on DynamoDB (the port and its adapter).
//! - [`aggregate`]: typed events, aggregates, snapshots and command execution over the store.
//! - [`domain`]: the order domain (Order, Inventory, Payment, Shipment) and external services.
//! - [`saga`]: the order saga's step contract, step logic and the step Lambdas' AWS edge.
//! - [`telemetry`]: structured JSON logs.
//! - [`metrics`]: business and saga metrics in CloudWatch Embedded Metric Format.
//! - [`readmodel`]: read models (CQRS query side) and their projection onto DynamoDB.
//! - [`retry`]: bounded exponential backoff with full jitter.
//! - [`ratelimit`]: rate limiting per key over a sliding window, its counters on DynamoDB.
//! - [`config`]: configuration from the environment.
//! - [`aws`]: the AWS SDK configuration, cheap at cold start (compiled-in TLS roots, lazy TLS).
//! - [`deadline`]: the invocation's deadline, for handlers working through a batch.
//! - [`batch`]: the batch loop of every SQS and DynamoDB stream consumer, and its dead letters.
//! - [`text`]: percent-decoding for HTTP paths and query strings.
//! - [`auth`]: the HTTP caller's identity, as the API's JWT authorizer verified it.

pub mod aggregate;
pub mod auth;
pub mod aws;
pub mod batch;
pub mod config;
pub mod deadline;
pub mod domain;
pub mod eventstore;
pub mod metrics;
#[cfg(feature = "providers")]
pub mod providers;
pub mod ratelimit;
pub mod readmodel;
#[cfg(feature = "providers")]
pub mod resilience;
pub mod retry;
pub mod saga;
#[cfg(feature = "streams")]
pub mod streams;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod text;
