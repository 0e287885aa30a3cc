//! Dead letters (stream `DeadLetter-<id>`): a message a consumer gave up on, recorded with where
//! it came from and why, and every later action on it (redriven, returned, parked, discarded,
//! resolved) as an event, so what happened to a failure is audited, not guessed.
//!
//! What is done with a dead letter depends on what kind of failure it is:
//! - [`Failure::Transient`]: the consumer ran out of attempts on something that can succeed
//!   later (a timeout, throttling, an outage). It is redriven to its source automatically, with
//!   exponential backoff, a bounded number of times; when it keeps coming back it is parked.
//! - [`Failure::Poison`]: the consumer could not read or accept it. Retrying changes nothing, so
//!   it is parked for a person at once.
//! - [`Failure::StreamBatch`]: a stream consumer skipped a batch of records; the dead letter is a
//!   pointer to their positions, which are replayed (also bounded).
//!
//! A redriven message that fails again comes back under the same dead letter (the redrive tags
//! it with the dead letter's id), so the bound holds across round trips.

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, DomainEvent};
use crate::retry::RetryPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Failure {
    Transient,
    Poison,
    StreamBatch,
    /// A saga whose compensation kept failing: its order needs a person (the manual-action
    /// queue). One case per order: a retry that fails again returns to it.
    ManualAction,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Status {
    #[default]
    None,
    /// Recorded, or returned after a redrive: an action is due.
    Pending,
    /// Sent back to its source (or replayed); it returns here if it fails again.
    Redriven,
    /// Waiting for a person.
    Parked,
    /// Dropped by a person, with a note.
    Discarded,
    /// Settled: a replay succeeded, or a person says it is dealt with.
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Pending => "pending",
            Status::Redriven => "redriven",
            Status::Parked => "parked",
            Status::Discarded => "discarded",
            Status::Resolved => "resolved",
        }
    }

    /// No further action will be taken on it.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Discarded | Status::Resolved)
    }
}

/// Who acted: the handler on its own, or a named operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "camelCase")]
pub enum Actor {
    Automatic,
    Operator(String),
}

/// One arrival on a dead-letter queue, as the handler read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arrival {
    /// The dead-letter queue's ARN.
    pub dead_letter_queue: String,
    /// Where it came from and where a redrive sends it (a queue ARN; for a stream batch, the
    /// stream's ARN).
    pub source: Option<String>,
    pub message_id: String,
    pub body: String,
    /// String message attributes, as received.
    pub attributes: std::collections::BTreeMap<String, String>,
    pub failure: Failure,
    pub reason: String,
    pub receive_count: u32,
    pub seen_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all_fields = "camelCase")]
pub enum DeadLetterEvent {
    DeadLetterRecorded {
        dead_letter_id: String,
        arrival: Arrival,
    },
    /// A redriven message failed again and came back.
    DeadLetterReturned {
        dead_letter_id: String,
        message_id: String,
        reason: String,
        receive_count: u32,
        seen_at: String,
    },
    DeadLetterRedriven {
        dead_letter_id: String,
        attempt: u32,
        by: Actor,
        delay_seconds: u32,
    },
    /// A skipped stream batch's records were read back from the stream and handed to its
    /// consumer again, which took them all.
    DeadLetterReplayed {
        dead_letter_id: String,
        attempt: u32,
        by: Actor,
        records: u32,
    },
    /// A replay that did not go through; another may follow.
    DeadLetterReplayFailed {
        dead_letter_id: String,
        attempt: u32,
        by: Actor,
        reason: String,
    },
    DeadLetterParked {
        dead_letter_id: String,
        reason: String,
    },
    DeadLetterDiscarded {
        dead_letter_id: String,
        by: Actor,
        note: String,
    },
    DeadLetterResolved {
        dead_letter_id: String,
        by: Actor,
        note: String,
    },
}

impl DomainEvent for DeadLetterEvent {}

#[derive(Debug, Clone)]
pub enum DeadLetterCommand {
    /// Record an arrival: the first one creates the dead letter, a later one is a return.
    Record {
        dead_letter_id: String,
        arrival: Arrival,
    },
    /// Redrive it. `Automatic` only for a pending transient failure within the policy's bound.
    Redrive {
        by: Actor,
        delay_seconds: u32,
    },
    /// Record how a replay of a skipped stream batch went: `Ok(records)` or `Err(reason)`.
    RecordReplay {
        by: Actor,
        result: Result<u32, String>,
    },
    Park {
        reason: String,
    },
    Discard {
        by: Actor,
        note: String,
    },
    Resolve {
        by: Actor,
        note: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetterError {
    #[error("no such dead letter")]
    Unknown,
    #[error("dead letter is {0}: cannot {1}")]
    InvalidState(&'static str, &'static str),
    #[error("a {0:?} failure is not redriven automatically")]
    NotAutomatic(Failure),
    #[error("a discard or resolution needs a note saying why")]
    NoteRequired,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub id: String,
    pub status: Status,
    pub first: Option<Arrival>,
    pub last_reason: String,
    pub last_seen: String,
    pub times_seen: u32,
    /// Every redrive made, automatic or not.
    pub redrives: u32,
    pub automatic_redrives: u32,
    /// Message ids already recorded: a DLQ message delivered twice is recorded once.
    pub message_ids: Vec<String>,
}

/// What the handler does with a pending dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextAction {
    /// Redrive: automatic attempt number `attempt` (the caller draws its backoff).
    Redrive {
        attempt: u32,
    },
    Park {
        reason: String,
    },
    Nothing,
}

impl DeadLetter {
    pub fn failure(&self) -> Option<Failure> {
        self.first.as_ref().map(|a| a.failure)
    }

    /// The action the automatic policy takes now. `policy.max_attempts` counts redrives, the
    /// first delivery excluded: 3 means a transient failure is redriven up to three times.
    pub fn next_action(&self, policy: &RetryPolicy) -> NextAction {
        if self.status != Status::Pending {
            return NextAction::Nothing;
        }
        match self.failure() {
            None => NextAction::Nothing,
            Some(Failure::Poison) => {
                NextAction::Park { reason: format!("unreadable or invalid: {}", self.last_reason) }
            }
            // A person acts on a manual-action case: it is never redriven by itself.
            Some(Failure::ManualAction) => NextAction::Park { reason: self.last_reason.clone() },
            Some(Failure::Transient | Failure::StreamBatch) if self.automatic_redrives < policy.max_attempts => {
                NextAction::Redrive { attempt: self.automatic_redrives + 1 }
            }
            Some(_) => NextAction::Park {
                reason: format!(
                    "still failing after {} automatic redrives; last: {}",
                    self.automatic_redrives, self.last_reason
                ),
            },
        }
    }

    fn name(&self) -> &'static str {
        self.status.as_str()
    }
}

impl Aggregate for DeadLetter {
    const CATEGORY: &'static str = "DeadLetter";
    /// A handful of events per dead letter: replayed in one Query.
    const SNAPSHOTS: bool = false;
    type Event = DeadLetterEvent;
    type Command = DeadLetterCommand;
    type Error = DeadLetterError;

    fn apply(&mut self, event: &DeadLetterEvent) {
        match event {
            DeadLetterEvent::DeadLetterRecorded { dead_letter_id, arrival } => {
                self.id = dead_letter_id.clone();
                self.status = Status::Pending;
                self.last_reason = arrival.reason.clone();
                self.last_seen = arrival.seen_at.clone();
                self.times_seen = 1;
                self.message_ids.push(arrival.message_id.clone());
                self.first = Some(arrival.clone());
            }
            DeadLetterEvent::DeadLetterReturned { message_id, reason, seen_at, .. } => {
                self.status = Status::Pending;
                self.last_reason = reason.clone();
                self.last_seen = seen_at.clone();
                self.times_seen += 1;
                self.message_ids.push(message_id.clone());
            }
            DeadLetterEvent::DeadLetterRedriven { by, .. } => {
                self.status = Status::Redriven;
                self.redrives += 1;
                if *by == Actor::Automatic {
                    self.automatic_redrives += 1;
                }
            }
            DeadLetterEvent::DeadLetterReplayed { by, .. } | DeadLetterEvent::DeadLetterReplayFailed { by, .. } => {
                self.redrives += 1;
                if *by == Actor::Automatic {
                    self.automatic_redrives += 1;
                }
                self.status = match event {
                    DeadLetterEvent::DeadLetterReplayed { .. } => Status::Resolved,
                    _ => Status::Pending,
                };
                if let DeadLetterEvent::DeadLetterReplayFailed { reason, .. } = event {
                    self.last_reason = reason.clone();
                }
            }
            DeadLetterEvent::DeadLetterParked { .. } => self.status = Status::Parked,
            DeadLetterEvent::DeadLetterDiscarded { .. } => self.status = Status::Discarded,
            DeadLetterEvent::DeadLetterResolved { .. } => self.status = Status::Resolved,
        }
    }

    fn decide(&self, command: &DeadLetterCommand) -> Result<Vec<DeadLetterEvent>, DeadLetterError> {
        let id = self.id.clone();
        match command {
            DeadLetterCommand::Record { dead_letter_id, arrival } => {
                if self.status == Status::None {
                    return Ok(vec![DeadLetterEvent::DeadLetterRecorded {
                        dead_letter_id: dead_letter_id.clone(),
                        arrival: arrival.clone(),
                    }]);
                }
                if self.message_ids.contains(&arrival.message_id) {
                    return Ok(vec![]);
                }
                Ok(vec![DeadLetterEvent::DeadLetterReturned {
                    dead_letter_id: id,
                    message_id: arrival.message_id.clone(),
                    reason: arrival.reason.clone(),
                    receive_count: arrival.receive_count,
                    seen_at: arrival.seen_at.clone(),
                }])
            }
            DeadLetterCommand::Redrive { by, delay_seconds } => {
                match (self.status, by) {
                    (Status::None, _) => return Err(DeadLetterError::Unknown),
                    (Status::Pending, Actor::Automatic) => {}
                    (Status::Pending | Status::Parked, Actor::Operator(_)) => {}
                    (_, _) => return Err(DeadLetterError::InvalidState(self.name(), "redrive")),
                }
                // The bound on automatic redrives is the policy's, applied by `next_action`.
                match self.failure() {
                    Some(f @ (Failure::Poison | Failure::ManualAction)) if *by == Actor::Automatic => {
                        return Err(DeadLetterError::NotAutomatic(f));
                    }
                    _ => {}
                }
                Ok(vec![DeadLetterEvent::DeadLetterRedriven {
                    dead_letter_id: id,
                    attempt: self.redrives + 1,
                    by: by.clone(),
                    delay_seconds: *delay_seconds,
                }])
            }
            DeadLetterCommand::RecordReplay { by, result } => {
                if self.failure() != Some(Failure::StreamBatch) {
                    return Err(DeadLetterError::InvalidState(self.name(), "record a replay of"));
                }
                match (self.status, by) {
                    (Status::None, _) => return Err(DeadLetterError::Unknown),
                    (Status::Pending, _) | (Status::Parked, Actor::Operator(_)) => {}
                    _ => return Err(DeadLetterError::InvalidState(self.name(), "replay")),
                }
                let (attempt, by) = (self.redrives + 1, by.clone());
                Ok(vec![match result {
                    Ok(records) => {
                        DeadLetterEvent::DeadLetterReplayed { dead_letter_id: id, attempt, by, records: *records }
                    }
                    Err(reason) => DeadLetterEvent::DeadLetterReplayFailed {
                        dead_letter_id: id,
                        attempt,
                        by,
                        reason: reason.clone(),
                    },
                }])
            }
            DeadLetterCommand::Park { reason } => match self.status {
                Status::None => Err(DeadLetterError::Unknown),
                Status::Parked => Ok(vec![]),
                Status::Pending => {
                    Ok(vec![DeadLetterEvent::DeadLetterParked { dead_letter_id: id, reason: reason.clone() }])
                }
                _ => Err(DeadLetterError::InvalidState(self.name(), "park")),
            },
            DeadLetterCommand::Discard { by, note } | DeadLetterCommand::Resolve { by, note } => {
                let discard = matches!(command, DeadLetterCommand::Discard { .. });
                if note.trim().is_empty() && *by != Actor::Automatic {
                    return Err(DeadLetterError::NoteRequired);
                }
                match self.status {
                    Status::None => Err(DeadLetterError::Unknown),
                    Status::Discarded if discard => Ok(vec![]),
                    Status::Resolved if !discard => Ok(vec![]),
                    status if status.is_final() => {
                        Err(DeadLetterError::InvalidState(self.name(), if discard { "discard" } else { "resolve" }))
                    }
                    _ if discard => Ok(vec![DeadLetterEvent::DeadLetterDiscarded {
                        dead_letter_id: id,
                        by: by.clone(),
                        note: note.clone(),
                    }]),
                    _ => Ok(vec![DeadLetterEvent::DeadLetterResolved {
                        dead_letter_id: id,
                        by: by.clone(),
                        note: note.clone(),
                    }]),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn arrival(message_id: &str, failure: Failure) -> Arrival {
        Arrival {
            dead_letter_queue: "arn:aws:sqs:us-east-1:000000000000:ChargePaymentDlq".into(),
            source: Some("arn:aws:sqs:us-east-1:000000000000:ChargePaymentQueue".into()),
            message_id: message_id.into(),
            body: "{}".into(),
            attributes: Default::default(),
            failure,
            reason: "receive count exceeded".into(),
            receive_count: 5,
            seen_at: "2026-11-22T10:00:00Z".into(),
        }
    }

    fn policy(redrives: u32) -> RetryPolicy {
        RetryPolicy { max_attempts: redrives, base_delay: Duration::from_secs(30), max_delay: Duration::from_secs(900) }
    }

    fn given(events: &[DeadLetterEvent]) -> DeadLetter {
        let mut state = DeadLetter::default();
        for e in events {
            state.apply(e);
        }
        state
    }

    fn when(state: &mut DeadLetter, command: DeadLetterCommand) -> Result<Vec<DeadLetterEvent>, DeadLetterError> {
        let events = state.decide(&command)?;
        for e in &events {
            state.apply(e);
        }
        Ok(events)
    }

    fn record(id: &str, message_id: &str, failure: Failure) -> DeadLetterCommand {
        DeadLetterCommand::Record { dead_letter_id: id.into(), arrival: arrival(message_id, failure) }
    }

    #[test]
    fn a_transient_failure_is_redriven_until_the_bound_then_parked() {
        // Given a transient failure recorded
        let mut dl = given(&[]);
        when(&mut dl, record("d1", "m1", Failure::Transient)).expect("recorded");
        let policy = policy(2);
        // When it is redriven and comes back, twice
        for (attempt, returned_as) in [(1, "m2"), (2, "m3")] {
            assert_eq!(dl.next_action(&policy), NextAction::Redrive { attempt });
            when(&mut dl, DeadLetterCommand::Redrive { by: Actor::Automatic, delay_seconds: 30 }).expect("redriven");
            assert_eq!(dl.status, Status::Redriven);
            let events = when(&mut dl, record("d1", returned_as, Failure::Transient)).expect("returned");
            assert!(matches!(events[..], [DeadLetterEvent::DeadLetterReturned { .. }]));
        }
        // Then the third return is parked for a person, naming the count
        match dl.next_action(&policy) {
            NextAction::Park { reason } => assert!(reason.contains("after 2 automatic redrives"), "{reason}"),
            other => panic!("expected park, got {other:?}"),
        }
        assert_eq!(dl.times_seen, 3);
    }

    #[test]
    fn a_poison_message_is_parked_at_once_and_never_redriven_automatically() {
        let mut dl = given(&[]);
        when(&mut dl, record("d1", "m1", Failure::Poison)).expect("recorded");
        assert!(matches!(dl.next_action(&policy(3)), NextAction::Park { .. }));
        assert_eq!(
            when(&mut dl, DeadLetterCommand::Redrive { by: Actor::Automatic, delay_seconds: 0 }),
            Err(DeadLetterError::NotAutomatic(Failure::Poison))
        );
        // An operator may still redrive it once the cause is fixed.
        when(&mut dl, DeadLetterCommand::Park { reason: "bad json".into() }).expect("parked");
        let events = when(&mut dl, DeadLetterCommand::Redrive { by: Actor::Operator("ana".into()), delay_seconds: 0 })
            .expect("operator redrive");
        assert!(matches!(&events[..], [DeadLetterEvent::DeadLetterRedriven { attempt: 1, .. }]));
    }

    #[test]
    fn a_skipped_stream_batch_is_replayed_until_it_goes_through_within_the_bound() {
        let mut dl = given(&[]);
        when(&mut dl, record("d1", "m1", Failure::StreamBatch)).expect("recorded");
        let policy = policy(2);
        assert_eq!(dl.next_action(&policy), NextAction::Redrive { attempt: 1 });
        let failed = DeadLetterCommand::RecordReplay { by: Actor::Automatic, result: Err("relay crashed".into()) };
        when(&mut dl, failed).expect("failed replay");
        assert_eq!((dl.status, dl.last_reason.as_str()), (Status::Pending, "relay crashed"));
        assert_eq!(dl.next_action(&policy), NextAction::Redrive { attempt: 2 });
        when(&mut dl, DeadLetterCommand::RecordReplay { by: Actor::Automatic, result: Ok(7) }).expect("replayed");
        assert_eq!((dl.status, dl.redrives), (Status::Resolved, 2));
        assert_eq!(dl.next_action(&policy), NextAction::Nothing);
        // Only a stream batch is replayed
        let mut other = given(&[]);
        when(&mut other, record("d2", "m2", Failure::Transient)).expect("recorded");
        assert!(when(&mut other, DeadLetterCommand::RecordReplay { by: Actor::Automatic, result: Ok(1) }).is_err());
    }

    #[test]
    fn a_manual_action_case_is_parked_with_what_failed_and_returns_when_flagged_again() {
        let mut dl = given(&[]);
        let mut case = arrival("m1", Failure::ManualAction);
        case.reason = "order o1 needs a person: RefundPayment kept failing".into();
        when(&mut dl, DeadLetterCommand::Record { dead_letter_id: "manual-action-o1".into(), arrival: case.clone() })
            .expect("recorded");
        assert_eq!(dl.next_action(&policy(3)), NextAction::Park { reason: case.reason.clone() });
        when(&mut dl, DeadLetterCommand::Park { reason: case.reason.clone() }).expect("parked");
        // An operator retries; the retry fails and the order is flagged again: the same case
        let ana = Actor::Operator("ana".into());
        when(&mut dl, DeadLetterCommand::Redrive { by: ana, delay_seconds: 0 }).expect("retried");
        case.message_id = "m2".into();
        when(&mut dl, DeadLetterCommand::Record { dead_letter_id: "manual-action-o1".into(), arrival: case.clone() })
            .expect("returned");
        assert_eq!((dl.status, dl.times_seen), (Status::Pending, 2));
        assert_eq!(dl.next_action(&policy(3)), NextAction::Park { reason: case.reason });
        assert_eq!(
            dl.decide(&DeadLetterCommand::Redrive { by: Actor::Automatic, delay_seconds: 0 }),
            Err(DeadLetterError::NotAutomatic(Failure::ManualAction))
        );
    }

    #[test]
    fn the_same_dlq_message_delivered_twice_is_recorded_once() {
        let mut dl = given(&[]);
        when(&mut dl, record("d1", "m1", Failure::Transient)).expect("recorded");
        assert_eq!(when(&mut dl, record("d1", "m1", Failure::Transient)), Ok(vec![]));
        assert_eq!(dl.times_seen, 1);
    }

    #[test]
    fn a_discard_needs_a_note_and_is_final() {
        let mut dl = given(&[]);
        when(&mut dl, record("d1", "m1", Failure::Poison)).expect("recorded");
        when(&mut dl, DeadLetterCommand::Park { reason: "bad".into() }).expect("parked");
        let ana = Actor::Operator("ana".into());
        assert_eq!(
            when(&mut dl, DeadLetterCommand::Discard { by: ana.clone(), note: " ".into() }),
            Err(DeadLetterError::NoteRequired)
        );
        when(&mut dl, DeadLetterCommand::Discard { by: ana.clone(), note: "test order".into() }).expect("discarded");
        assert_eq!(dl.status, Status::Discarded);
        assert_eq!(dl.next_action(&policy(3)), NextAction::Nothing);
        assert!(matches!(
            when(&mut dl, DeadLetterCommand::Redrive { by: ana, delay_seconds: 0 }),
            Err(DeadLetterError::InvalidState("discarded", "redrive"))
        ));
    }

    #[test]
    fn nothing_is_done_to_an_unknown_dead_letter() {
        let mut dl = given(&[]);
        assert_eq!(
            when(&mut dl, DeadLetterCommand::Redrive { by: Actor::Operator("ana".into()), delay_seconds: 0 }),
            Err(DeadLetterError::Unknown)
        );
        assert_eq!(dl.next_action(&policy(3)), NextAction::Nothing);
    }
}
