//! Given / when / then for an aggregate's decisions, on `apply` and `decide` alone (no store):
//! given the events so far, when a command is decided, then these events, or this error. For
//! tests (this crate's, and other crates' with the feature `testing`).
//!
//! ```ignore
//! given::<Inventory>([restocked("SKU-1", 5)])
//!     .when(reserve("ord-1", 3))
//!     .then_expect([reserved("ord-1", 3)])
//!     // the state has moved on: the same command again is a redelivery, and changes nothing
//!     .when(reserve("ord-1", 3))
//!     .then_nothing();
//! ```
//!
//! Each `then_` checks the decision and returns the state after it (the expected events
//! applied), so a test reads as a story of commands. A failed check names what was expected and
//! what was decided, at the test's line.

use std::fmt::Debug;

use super::Aggregate;

/// The aggregate as these events (in order) leave it.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in events {
        state.apply(&event);
    }
    Given { state }
}

/// An aggregate in a known state, ready for a command.
#[derive(Debug, Clone)]
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Starts from a state rather than events (when the state is the point of the test).
    pub fn state_of(state: A) -> Self {
        Self { state }
    }

    /// Decides `command` against the state.
    pub fn when(self, command: A::Command) -> When<A> {
        let decided = self.state.decide(&command);
        When { state: self.state, decided }
    }

    pub fn state(&self) -> &A {
        &self.state
    }

    pub fn into_state(self) -> A {
        self.state
    }
}

/// A command decided: what it produced, to be checked by a `then_`.
#[must_use = "a decision is checked with a then_ method"]
pub struct When<A: Aggregate> {
    state: A,
    decided: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> When<A>
where
    A::Event: PartialEq + Debug,
    A::Error: PartialEq + Debug,
{
    /// The command produced exactly these events, in this order; the state after them follows.
    #[track_caller]
    pub fn then_expect(self, expected: impl IntoIterator<Item = A::Event>) -> Given<A> {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.decided {
            Ok(events) => {
                assert_eq!(events, expected, "the command decided other events than expected");
                let mut state = self.state;
                for event in &events {
                    state.apply(event);
                }
                Given { state }
            }
            Err(error) => panic!("expected the events {expected:?}, but the command was rejected: {error:?}"),
        }
    }

    /// The command was accepted and changed nothing (a repeat, a no-op compensation).
    #[track_caller]
    pub fn then_nothing(self) -> Given<A> {
        self.then_expect([])
    }

    /// The command was rejected with this error; the state stays as it was.
    #[track_caller]
    pub fn then_error(self, expected: A::Error) -> Given<A> {
        match self.decided {
            Err(error) => {
                assert_eq!(error, expected, "the command was rejected with another error than expected");
                Given { state: self.state }
            }
            Ok(events) => panic!("expected the error {expected:?}, but the command decided {events:?}"),
        }
    }
}
