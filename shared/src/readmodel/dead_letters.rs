//! The dead letters view: one item per dead letter (what it is, where it came from, what has
//! been done with it), listed through the `byCustomer` index's overloaded keys under
//! `DEADLETTERS`, sorted by status then time, so "everything parked" is one Query.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ReadModel, decode};
use crate::domain::dead_letter::{Actor, DeadLetterEvent, Failure, Status};
use crate::eventstore::{RecordedEvent, StreamId};

/// The partition of the listing index that holds every dead letter.
pub const LISTING: &str = "DEADLETTERS";

/// What a view keeps of the original body: enough to read it; the event store keeps it whole.
const BODY_KEPT: usize = 16 * 1024;

pub fn dead_letter_key(id: &str) -> (String, String) {
    (format!("DEADLETTER#{id}"), "VIEW".into())
}

/// The item counting the unresolved dead letters of `kind` (a [`crate::metrics::kinds`] name), in
/// its `unresolved` attribute: kept by the projection in the same write as the views.
pub fn unresolved_key(kind: &str) -> (String, String) {
    ("DEADLETTERS#UNRESOLVED".into(), kind.into())
}

/// The attribute of [`unresolved_key`]'s item.
pub const UNRESOLVED: &str = "unresolved";

/// Whether a dead letter waits for a person: parked. A pending one is the handler's, about to
/// be redriven or parked within seconds; counting it would raise the level and drop it again
/// inside one alarm period, and an alarm on the period's maximum would stay in ALARM.
pub fn is_open(status: Status) -> bool {
    matches!(status, Status::Parked)
}

/// A manual-action case (`manual-action-<orderId>`) or any other dead letter.
pub fn kind(dead_letter_id: &str) -> &'static str {
    if dead_letter_id.starts_with("manual-action-") {
        crate::metrics::kinds::MANUAL_ACTION
    } else {
        crate::metrics::kinds::DEAD_LETTER
    }
}

/// How a view's change moves its kind's count of unresolved ones: `+1` when it opens, `-1` when
/// it closes, `None` when it stays open or closed.
pub fn unresolved_change(before: Option<&DeadLetterView>, after: &DeadLetterView) -> Option<(&'static str, i64)> {
    let was = before.is_some_and(|b| is_open(b.status));
    let delta = match (was, is_open(after.status)) {
        (false, true) => 1,
        (true, false) => -1,
        _ => return None,
    };
    Some((kind(&after.dead_letter_id), delta))
}

/// The listing sort key's prefix for dead letters in `status`.
pub fn listing_prefix(status: Status) -> String {
    format!("{}#", status.as_str())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub at: String,
    pub what: String,
    pub by: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub dead_letter_id: String,
    pub status: Status,
    pub failure: Option<Failure>,
    pub dead_letter_queue: String,
    pub source: Option<String>,
    pub reason: String,
    pub body: String,
    pub body_truncated: bool,
    pub attributes: BTreeMap<String, String>,
    pub receive_count: u32,
    pub times_seen: u32,
    pub redrives: u32,
    pub first_seen: String,
    pub last_seen: String,
    pub history: Vec<HistoryEntry>,
    pub versions: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gsi1pk: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gsi1sk: Option<String>,
}

fn actor(by: &Actor) -> String {
    match by {
        Actor::Automatic => "automatic".into(),
        Actor::Operator(name) => name.clone(),
    }
}

impl ReadModel for DeadLetterView {
    const NAME: &'static str = "dead-letters";

    fn key(stream: &StreamId) -> Option<(String, String)> {
        (stream.category() == "DeadLetter").then(|| dead_letter_key(stream.id()))
    }

    fn versions(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.versions
    }

    fn apply(&mut self, e: &RecordedEvent) {
        let Some(event) = decode::<DeadLetterEvent>(e) else { return };
        let (what, by, detail) = match event {
            DeadLetterEvent::DeadLetterRecorded { dead_letter_id, arrival } => {
                self.dead_letter_id = dead_letter_id;
                self.status = Status::Pending;
                self.failure = Some(arrival.failure);
                self.dead_letter_queue = arrival.dead_letter_queue;
                self.source = arrival.source;
                self.reason = arrival.reason.clone();
                self.body_truncated = arrival.body.len() > BODY_KEPT;
                let mut end = BODY_KEPT.min(arrival.body.len());
                while !arrival.body.is_char_boundary(end) {
                    end -= 1;
                }
                self.body = arrival.body[..end].to_owned();
                self.attributes = arrival.attributes;
                self.receive_count = arrival.receive_count;
                self.times_seen = 1;
                self.first_seen = arrival.seen_at.clone();
                self.last_seen = arrival.seen_at;
                ("recorded", None, arrival.reason)
            }
            DeadLetterEvent::DeadLetterReturned { reason, receive_count, seen_at, .. } => {
                self.status = Status::Pending;
                self.reason = reason.clone();
                self.receive_count = receive_count;
                self.times_seen += 1;
                self.last_seen = seen_at;
                ("returned", None, reason)
            }
            DeadLetterEvent::DeadLetterRedriven { attempt, by, delay_seconds, .. } => {
                self.status = Status::Redriven;
                self.redrives += 1;
                ("redriven", Some(actor(&by)), format!("attempt {attempt}, after {delay_seconds} s"))
            }
            DeadLetterEvent::DeadLetterReplayed { attempt, by, records, .. } => {
                self.status = Status::Resolved;
                self.redrives += 1;
                (
                    "replayed",
                    Some(actor(&by)),
                    format!("attempt {attempt}: {records} records handed to the consumer again"),
                )
            }
            DeadLetterEvent::DeadLetterReplayFailed { attempt, by, reason, .. } => {
                self.status = Status::Pending;
                self.redrives += 1;
                self.reason = reason.clone();
                ("replay failed", Some(actor(&by)), format!("attempt {attempt}: {reason}"))
            }
            DeadLetterEvent::DeadLetterParked { reason, .. } => {
                self.status = Status::Parked;
                self.reason = reason.clone();
                ("parked", None, reason)
            }
            DeadLetterEvent::DeadLetterDiscarded { by, note, .. } => {
                self.status = Status::Discarded;
                ("discarded", Some(actor(&by)), note)
            }
            DeadLetterEvent::DeadLetterResolved { by, note, .. } => {
                self.status = Status::Resolved;
                ("resolved", Some(actor(&by)), note)
            }
        };
        self.history.push(HistoryEntry { at: e.recorded_at.clone(), what: what.into(), by, detail });
        self.gsi1pk = Some(LISTING.into());
        self.gsi1sk = Some(format!("{}{}#{}", listing_prefix(self.status), self.last_seen, self.dead_letter_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::encode_event;
    use crate::domain::dead_letter::Arrival;
    use crate::readmodel::Applied;

    fn recorded(version: u64, event: &DeadLetterEvent) -> RecordedEvent {
        let new = encode_event(event).expect("encodes");
        RecordedEvent {
            stream_id: "DeadLetter-d1".into(),
            version,
            event_id: format!("e{version}"),
            event_type: new.event_type,
            schema_version: new.schema_version,
            payload: new.payload,
            correlation_id: "d1".into(),
            causation_id: None,
            idempotency_key: None,
            trace_header: None,
            recorded_at: format!("2026-11-22T10:00:0{version}.000000Z"),
        }
    }

    #[test]
    fn a_view_counts_as_unresolved_while_parked_by_kind() {
        let view = |id: &str, status| DeadLetterView { dead_letter_id: id.into(), status, ..DeadLetterView::default() };
        let (pending, parked) = (view("d1", Status::Pending), view("d1", Status::Parked));
        // Recorded (pending: the handler is on it): not yet a person's
        assert_eq!(unresolved_change(None, &pending), None);
        // Parked: one more waits for a person
        assert_eq!(unresolved_change(Some(&pending), &parked), Some(("DeadLetter", 1)));
        assert_eq!(unresolved_change(None, &parked), Some(("DeadLetter", 1)));
        // Redriven, discarded, resolved: closed; and back when it is parked again
        for closed in [Status::Redriven, Status::Discarded, Status::Resolved] {
            assert_eq!(unresolved_change(Some(&parked), &view("d1", closed)), Some(("DeadLetter", -1)));
            assert_eq!(unresolved_change(Some(&view("d1", closed)), &pending), None);
            assert_eq!(unresolved_change(Some(&view("d1", closed)), &parked), Some(("DeadLetter", 1)));
            assert_eq!(unresolved_change(Some(&view("d1", closed)), &view("d1", closed)), None);
        }
        // A manual-action case is its own kind
        let case = view("manual-action-o1", Status::Parked);
        assert_eq!(unresolved_change(None, &case), Some(("ManualAction", 1)));
        assert_eq!(
            unresolved_change(Some(&case), &view("manual-action-o1", Status::Resolved)),
            Some(("ManualAction", -1))
        );
    }

    #[test]
    fn the_view_follows_a_dead_letter_from_recorded_to_discarded_and_lists_it_by_status() {
        let arrival = Arrival {
            dead_letter_queue: "arn:aws:sqs:us-east-1:1:ReserveInventoryDlq".into(),
            source: Some("arn:aws:sqs:us-east-1:1:ReserveInventoryQueue".into()),
            message_id: "m1".into(),
            body: "é".repeat(BODY_KEPT),
            attributes: BTreeMap::new(),
            failure: Failure::Poison,
            reason: "not JSON".into(),
            receive_count: 1,
            seen_at: "2026-11-22T10:00:00.000000Z".into(),
        };
        let events = [
            DeadLetterEvent::DeadLetterRecorded { dead_letter_id: "d1".into(), arrival },
            DeadLetterEvent::DeadLetterParked { dead_letter_id: "d1".into(), reason: "unreadable: not JSON".into() },
            DeadLetterEvent::DeadLetterDiscarded {
                dead_letter_id: "d1".into(),
                by: Actor::Operator("ana".into()),
                note: "a test message".into(),
            },
        ];
        let mut view = DeadLetterView::default();
        for (i, event) in events.iter().enumerate() {
            assert_eq!(view.apply_next(&recorded(i as u64 + 1, event)), Applied::Applied);
            if i == 1 {
                assert_eq!(view.gsi1sk.as_deref(), Some("parked#2026-11-22T10:00:00.000000Z#d1"));
            }
        }
        assert_eq!(view.status, Status::Discarded);
        assert_eq!(
            view.history.iter().map(|h| h.what.as_str()).collect::<Vec<_>>(),
            ["recorded", "parked", "discarded"]
        );
        assert_eq!(view.history[2].by.as_deref(), Some("ana"));
        assert!(view.body_truncated && view.body.len() <= BODY_KEPT);
        assert_eq!(view.gsi1pk.as_deref(), Some(LISTING));
    }
}
