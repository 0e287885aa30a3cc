//! Run-time fault injection: latency, random errors and outages, per service or per operation.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::model::{Operation, Service};

/// Latency percentiles in milliseconds; samples follow the log-normal through both.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

/// z of the 99th percentile of the standard normal.
const Z99: f64 = 2.326_348;

impl Latency {
    pub fn sample(&self) -> Duration {
        // Log-normal: median p50, and sigma such that p50 * e^(sigma * z99) = p99. Right-skewed
        // with a long tail, as real service latencies are; capped so one sample cannot stall a test.
        let sigma = (self.p99 / self.p50).ln() / Z99;
        let (u1, u2) = (1.0 - fastrand::f64(), fastrand::f64());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let ms = (self.p50 * (sigma * z).exp()).min(self.p99 * 10.0);
        Duration::from_micros((ms.max(0.0) * 1000.0).round() as u64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OutageMode {
    /// 503 at once.
    Unavailable,
    /// No answer until the window ends: the caller's own timeout fires.
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutageRequest {
    pub seconds: f64,
    pub mode: OutageMode,
}

#[derive(Debug, Clone, Copy)]
pub struct Outage {
    pub seconds: f64,
    pub mode: OutageMode,
    pub until: Instant,
}

/// A `PUT /control/behaviour` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BehaviourRequest {
    pub service: Service,
    pub operation: Option<Operation>,
    pub latency_ms: Option<Latency>,
    pub error_rate: Option<f64>,
    pub outage: Option<OutageRequest>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    pub latency: Option<Latency>,
    pub error_rate: Option<f64>,
    pub outage: Option<Outage>,
}

impl Behaviour {
    /// The outage, while its window lasts.
    pub fn active_outage(&self) -> Option<Outage> {
        self.outage.filter(|o| o.until > Instant::now())
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BehaviourView {
    pub service: Service,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outage: Option<OutageView>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutageView {
    pub seconds: f64,
    pub mode: OutageMode,
    /// 0 once the window is over.
    pub remaining_ms: u64,
}

type Scope = (Service, Option<Operation>);

#[derive(Default)]
pub struct Behaviours(Mutex<BTreeMap<Scope, Behaviour>>);

impl Behaviours {
    /// The operation's own behaviour if one is set, else its service's.
    pub fn for_operation(&self, operation: Operation) -> Option<Behaviour> {
        let map = self.lock();
        map.get(&(operation.service(), Some(operation))).or_else(|| map.get(&(operation.service(), None))).copied()
    }

    /// Replaces the behaviour of the request's scope. A whole-service behaviour also replaces
    /// that service's per-operation ones: "payments is down" means every payments operation.
    pub fn set(&self, request: BehaviourRequest) -> Result<BehaviourView, String> {
        let scope = (request.service, request.operation);
        if let Some(op) = request.operation.filter(|op| op.service() != request.service) {
            return Err(format!("operation {op:?} does not belong to service {:?}", request.service));
        }
        if let Some(l) = request.latency_ms
            && !(l.p50 > 0.0 && l.p99 >= l.p50 && l.p99.is_finite())
        {
            return Err("latencyMs needs 0 < p50 <= p99".into());
        }
        if request.error_rate.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            return Err("errorRate must be from 0 to 1".into());
        }
        let outage = match request.outage {
            Some(o) if !(o.seconds >= 0.0 && o.seconds <= 86_400.0) => {
                return Err("outage.seconds must be from 0 to 86400".into());
            }
            Some(o) => Some(Outage {
                seconds: o.seconds,
                mode: o.mode,
                until: Instant::now() + Duration::from_secs_f64(o.seconds),
            }),
            None => None,
        };
        let behaviour = Behaviour { latency: request.latency_ms, error_rate: request.error_rate, outage };
        let mut map = self.lock();
        if request.operation.is_none() {
            map.retain(|(service, _), _| *service != request.service);
        }
        map.insert(scope, behaviour);
        Ok(view(scope, &behaviour))
    }

    pub fn views(&self) -> Vec<BehaviourView> {
        self.lock().iter().map(|(scope, b)| view(*scope, b)).collect()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Scope, Behaviour>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn view((service, operation): Scope, b: &Behaviour) -> BehaviourView {
    BehaviourView {
        service,
        operation,
        latency_ms: b.latency,
        error_rate: b.error_rate,
        outage: b.outage.map(|o| OutageView {
            seconds: o.seconds,
            mode: o.mode,
            remaining_ms: o.until.saturating_duration_since(Instant::now()).as_millis() as u64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_samples_fit_the_percentiles() {
        let latency = Latency { p50: 20.0, p99: 400.0 };
        let mut samples: Vec<f64> = (0..20_000).map(|_| latency.sample().as_secs_f64() * 1000.0).collect();
        samples.sort_by(f64::total_cmp);
        let (p50, p99) = (samples[10_000], samples[19_800]);
        assert!((15.0..27.0).contains(&p50), "p50 {p50}");
        assert!((250.0..600.0).contains(&p99), "p99 {p99}");
    }

    #[test]
    fn equal_percentiles_give_a_constant_latency() {
        let latency = Latency { p50: 30.0, p99: 30.0 };
        assert_eq!(latency.sample(), Duration::from_millis(30));
    }
}
