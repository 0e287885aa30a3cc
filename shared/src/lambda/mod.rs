//! The Lambda edge: how an invocation's batch is worked through (one SQS and one stream batch
//! processor), and the step and projection Lambdas built on it.

pub mod batch;
pub mod projections;
pub mod steps;
#[cfg(feature = "streams")]
pub mod streams;
