//! The adapters: everything that talks to AWS or to an external service over HTTP, each behind a
//! port that the core defines (the core, the rest of this crate, knows no AWS type).
//!
//! | Port (core) | Adapter |
//! | --- | --- |
//! | `eventstore::EventStore` | [`dynamodb::DynamoEventStore`] |
//! | read models (`readmodel::ReadModel`) | [`dynamodb::ReadModelStore`], its queries in [`dynamodb::queries`] |
//! | `ratelimit::WindowCounters` | [`dynamodb::DynamoCounters`] |
//! | `resilience::breaker::BreakerStore` | `dynamodb::DynamoBreakerStore` |
//! | `lambda::batch::DeadLetters` | [`sqs::SqsDeadLetters`] |
//! | `lambda::steps::TaskCallback` | [`stepfunctions`] (the Step Functions client) |
//! | `domain::services` (gateway, carrier, notifier) | `providers` (HTTP) |
//!
//! EventBridge is written to by one function only (`outbox-relay`, its `Bus` port and adapter).

pub mod aws;
pub mod dynamodb;
#[cfg(feature = "providers")]
pub mod providers;
pub mod sqs;
pub mod stepfunctions;
