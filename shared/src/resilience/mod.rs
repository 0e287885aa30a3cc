//! Resilience against a failing provider: what wraps every call to an external service.
//!
//! - [`breaker`]: the circuit breaker shared by every instance of every function that calls a
//!   provider; its state lives in DynamoDB.
//! - [`timeout`]: adaptive timeouts, from the provider's recent latency (k × p99, bounded) and
//!   never past the invocation's deadline.
//! - [`hedge`]: hedged requests, a second identical request after the recent p95; the first
//!   answer wins.
//! - [`bulkhead`]: a per-instance limit of requests in flight per provider; beyond it, a call
//!   fails at once, never sent.

pub mod breaker;
pub mod bulkhead;
pub mod hedge;
pub mod timeout;
