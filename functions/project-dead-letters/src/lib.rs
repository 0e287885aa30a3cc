//! Projection of the dead letters view (`DeadLetter` events): what operators list and inspect.
//! Subscribed like every projection: its own EventBridge rule, SQS queue and DLQ.
//!
//! It also keeps how many dead letters and manual-action cases wait for someone (pending or
//! parked), one counter item per kind, changed in the same transaction as the view when the
//! view opens or closes, and reports the level after each change as `UnresolvedDeadLetters`
//! (dimension `Kind`), which the template's alarms watch.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shared::readmodel::dead_letters::{DeadLetterView, UNRESOLVED, unresolved_change, unresolved_key};
use shared::readmodel::runtime::ProjectionLambda;
use shared::readmodel::store::{AlsoWrite, Projected, ProjectionError, ReadModelStore};

pub async fn handle(lambda: &ProjectionLambda, batch: SqsEvent) -> SqsBatchResponse {
    lambda
        .handle(batch, |event| async move {
            let models = &lambda.models;
            let projection = models
                .project_with::<DeadLetterView, _, _>(&lambda.events, &event, |before, after| {
                    let (kind, delta) = unresolved_change(before, after)?;
                    let update = models.add(&unresolved_key(kind), UNRESOLVED, delta).ok()?;
                    Some(AlsoWrite { update, then: kind })
                })
                .await?;
            if let Some(kind) = projection.also {
                report(models, kind).await;
            }
            Ok::<Projected, ProjectionError>(projection.projected)
        })
        .await
}

/// The level of `kind` as it stands now (read after the change: the latest read has every
/// committed change), as a metric. A failed read loses one report, not the count.
async fn report(models: &ReadModelStore, kind: &'static str) {
    match models.number(&unresolved_key(kind), UNRESOLVED).await {
        Ok(level) => shared::metrics::unresolved_dead_letters(kind, level),
        Err(e) => tracing::warn!(error = %e, kind, "unresolved level not read; not reported"),
    }
}
