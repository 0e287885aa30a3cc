//! Pure-logic tests of the aggregate API on the in-memory store.

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::eventstore::InMemoryEventStore;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Account {
    open: bool,
    balance_cents: i64,
    deposits: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum AccountEvent {
    AccountOpened,
    /// v1 stored `{"cents": n}`; v2 is `{"amount_cents": n, "currency": "EUR"}`.
    MoneyDeposited {
        amount_cents: i64,
        currency: String,
    },
}

impl DomainEvent for AccountEvent {
    fn current_schema_version(event_type: &str) -> u32 {
        if event_type == "MoneyDeposited" { 2 } else { 1 }
    }

    fn upcast(event_type: &str, from_version: u32, payload: Value) -> Result<Value, String> {
        match (event_type, from_version) {
            ("MoneyDeposited", 1) => {
                let cents = payload.get("cents").and_then(Value::as_i64).ok_or("v1 deposit without cents")?;
                Ok(json!({ "amount_cents": cents, "currency": "EUR" }))
            }
            _ => Err(format!("no upcaster for {event_type} v{from_version}")),
        }
    }
}

enum AccountCommand {
    Open,
    Deposit(i64),
}

#[derive(Debug, thiserror::Error, PartialEq)]
enum AccountError {
    #[error("account is not open")]
    NotOpen,
    #[error("deposits must be positive")]
    NotPositive,
}

impl Aggregate for Account {
    const CATEGORY: &'static str = "Account";
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::AccountOpened => self.open = true,
            AccountEvent::MoneyDeposited { amount_cents, .. } => {
                self.balance_cents += amount_cents;
                self.deposits += 1;
            }
        }
    }

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open if self.open => Ok(vec![]),
            AccountCommand::Open => Ok(vec![AccountEvent::AccountOpened]),
            AccountCommand::Deposit(_) if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit(n) if *n <= 0 => Err(AccountError::NotPositive),
            AccountCommand::Deposit(n) => {
                Ok(vec![AccountEvent::MoneyDeposited { amount_cents: *n, currency: "EUR".into() }])
            }
        }
    }
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base_delay: std::time::Duration::from_millis(1),
        max_delay: std::time::Duration::from_millis(2),
    }
}

fn ctx() -> CommandContext {
    CommandContext::default()
}

#[tokio::test]
async fn executes_commands_and_folds_state() {
    let repo = Repository::new(InMemoryEventStore::new());
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    let done = repo.execute::<Account>("a1", &AccountCommand::Deposit(250), &ctx()).await.expect("deposit");
    assert!(matches!(done, Executed::Appended { ref committed, attempts: 1 } if committed.last_version == 2));

    let loaded = repo.load::<Account>("a1").await.expect("load");
    assert_eq!(loaded.version, 2);
    assert_eq!(loaded.state, Account { open: true, balance_cents: 250, deposits: 1 });
}

#[tokio::test]
async fn a_command_that_changes_nothing_appends_nothing() {
    let repo = Repository::new(InMemoryEventStore::new());
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    let again = repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open again");
    assert_eq!(again, Executed::Unchanged { version: 1 });
}

#[tokio::test]
async fn rejections_are_typed_and_not_retryable() {
    let repo = Repository::new(InMemoryEventStore::new());
    let err = repo.execute::<Account>("a1", &AccountCommand::Deposit(5), &ctx()).await.expect_err("not open");
    assert!(matches!(err, ExecuteError::Rejected(AccountError::NotOpen)));
    assert!(!err.is_retryable());
    assert_eq!(repo.store().head_version(&StreamId::parse("Account-a1").unwrap()).await.unwrap(), 0);
}

#[tokio::test]
async fn conflicts_are_retried_then_succeed() {
    let repo = Repository::new(InMemoryEventStore::new()).with_retry(fast_retry(5));
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    repo.store().inject_conflicts(3);
    let done = repo.execute::<Account>("a1", &AccountCommand::Deposit(1), &ctx()).await.expect("deposit");
    assert!(matches!(done, Executed::Appended { attempts: 4, .. }), "{done:?}");
    assert_eq!(repo.load::<Account>("a1").await.unwrap().state.deposits, 1, "exactly one deposit");
}

#[tokio::test]
async fn conflict_retries_are_bounded() {
    let repo = Repository::new(InMemoryEventStore::new()).with_retry(fast_retry(3));
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    repo.store().inject_conflicts(10);
    let err = repo.execute::<Account>("a1", &AccountCommand::Deposit(1), &ctx()).await.expect_err("exhausted");
    assert!(matches!(err, ExecuteError::ConflictRetriesExhausted { attempts: 3 }));
    assert!(err.is_retryable(), "a later redelivery may succeed");
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_original_result() {
    let repo = Repository::new(InMemoryEventStore::new());
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    let keyed = CommandContext { idempotency_key: Some("deposit-1".into()), ..ctx() };
    let first = repo.execute::<Account>("a1", &AccountCommand::Deposit(10), &keyed).await.expect("first");
    let second = repo.execute::<Account>("a1", &AccountCommand::Deposit(10), &keyed).await.expect("second");
    let Executed::Appended { committed, .. } = first else { panic!("first should append: {first:?}") };
    assert_eq!(second, Executed::Duplicate { committed });
    assert_eq!(repo.load::<Account>("a1").await.unwrap().state.balance_cents, 10, "deposited once");

    let elsewhere = repo.execute::<Account>("a2", &AccountCommand::Open, &keyed).await.expect_err("key reused");
    assert!(matches!(elsewhere, ExecuteError::Append(AppendError::IdempotencyKeyReused { .. })));
}

#[tokio::test]
async fn snapshots_are_taken_and_loads_start_from_them() {
    let repo = Repository::new(InMemoryEventStore::new()).with_snapshots_every(3);
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    for i in 1..=6 {
        repo.execute::<Account>("a1", &AccountCommand::Deposit(i), &ctx()).await.expect("deposit");
    }
    let stream = StreamId::parse("Account-a1").unwrap();
    let snapshot = repo.store().load_snapshot(&stream).await.unwrap().expect("a snapshot");
    assert_eq!(snapshot.version, 6);

    let from_snapshot = repo.load::<Account>("a1").await.unwrap();
    let replayed = repo.replay::<Account>("a1").await.unwrap();
    assert_eq!(from_snapshot.snapshot_version, Some(6));
    assert_eq!(from_snapshot.events_replayed, 1);
    assert_eq!(replayed.events_replayed, 7);
    assert_eq!(from_snapshot.state, replayed.state);
    assert_eq!(from_snapshot.version, replayed.version);
}

#[tokio::test]
async fn an_unreadable_snapshot_falls_back_to_replay() {
    let repo = Repository::new(InMemoryEventStore::new());
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    repo.execute::<Account>("a1", &AccountCommand::Deposit(7), &ctx()).await.expect("deposit");
    let stream = StreamId::parse("Account-a1").unwrap();
    for (schema_version, state) in [(1, json!({"balance": "not the shape"})), (99, json!({}))] {
        // Only a newer snapshot replaces a stored one, so each bad one gets a higher version.
        let version = 2 + u64::from(schema_version);
        let bad = Snapshot { stream_id: stream.to_string(), version, schema_version, state, taken_at: String::new() };
        repo.store().save_snapshot(bad).await.unwrap();
        assert_eq!(repo.store().load_snapshot(&stream).await.unwrap().map(|s| s.version), Some(version));
        let loaded = repo.load::<Account>("a1").await.unwrap();
        assert_eq!(loaded.snapshot_version, None, "schema {schema_version} snapshot must be ignored");
        assert_eq!(loaded.state.balance_cents, 7);
    }
}

#[tokio::test]
async fn old_schema_events_are_upcast_on_load() {
    let store = InMemoryEventStore::new();
    let stream = StreamId::parse("Account-old").unwrap();
    let v1 = vec![
        NewEvent::new("AccountOpened", 1, Value::Null),
        NewEvent::new("MoneyDeposited", 1, json!({ "cents": 99 })),
    ];
    store.append(&stream, 0, v1, None).await.expect("append v1 events");
    let repo = Repository::new(store);
    let loaded = repo.load::<Account>("old").await.expect("loads through the upcaster");
    assert_eq!(loaded.state.balance_cents, 99);

    let recorded = repo.store().load(&stream, 0).await.unwrap();
    let event: AccountEvent = decode_event(&recorded[1]).unwrap();
    assert_eq!(event, AccountEvent::MoneyDeposited { amount_cents: 99, currency: "EUR".into() });
}

#[test]
fn events_encode_as_type_and_payload_at_the_current_schema() {
    let encoded = encode_event(&AccountEvent::MoneyDeposited { amount_cents: 5, currency: "EUR".into() }).unwrap();
    assert_eq!(encoded.event_type, "MoneyDeposited");
    assert_eq!(encoded.schema_version, 2);
    assert_eq!(encoded.payload, json!({ "amount_cents": 5, "currency": "EUR" }));

    #[derive(Serialize, Deserialize)]
    struct NotTagged {
        x: u8,
    }
    impl DomainEvent for NotTagged {}
    assert!(matches!(encode_event(&NotTagged { x: 1 }), Err(CodecError::NotAdjacentlyTagged)));
}

#[test]
fn events_from_a_newer_schema_are_refused_not_misread() {
    let recorded = RecordedEvent {
        stream_id: "Account-x".into(),
        version: 1,
        event_id: "e".into(),
        event_type: "MoneyDeposited".into(),
        schema_version: 3,
        payload: json!({}),
        correlation_id: "c".into(),
        causation_id: None,
        idempotency_key: None,
        trace_header: None,
        recorded_at: String::new(),
    };
    assert!(matches!(decode_event::<AccountEvent>(&recorded), Err(CodecError::FromTheFuture { current: 2, .. })));
}

#[tokio::test]
async fn a_command_from_a_held_state_needs_no_load_and_catches_up_when_behind() {
    // Given an open account whose state a caller holds at version 1
    let repo = Repository::new(InMemoryEventStore::new()).with_retry(fast_retry(3));
    let (executed, held) = repo.execute_with_state::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    assert_eq!(executed.state_version(), Some(1));
    // And another writer deposits meanwhile (version 2)
    repo.execute::<Account>("a1", &AccountCommand::Deposit(100), &ctx()).await.expect("deposit");

    // When the caller deposits from its held, stale state
    let (executed, state) =
        repo.execute_from::<Account>("a1", held, 1, &AccountCommand::Deposit(50), &ctx()).await.expect("deposit");

    // Then the append conflicted once, caught up, and both deposits count
    assert!(matches!(executed, Executed::Appended { ref committed, attempts: 2 } if committed.last_version == 3));
    assert_eq!(state, Account { open: true, balance_cents: 150, deposits: 2 });
    assert_eq!(repo.load::<Account>("a1").await.expect("load").state, state);
}

#[tokio::test]
async fn a_cached_state_is_read_on_from_its_version_without_the_snapshot_and_catches_up() {
    // Given a repository that caches states, after seven commands (a snapshot at 6)
    let repo = Repository::new(InMemoryEventStore::new()).with_snapshots_every(3).with_state_cache(8);
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    for i in 1..=6 {
        repo.execute::<Account>("a1", &AccountCommand::Deposit(i), &ctx()).await.expect("deposit");
    }
    // And another writer's deposit, appended behind the repository's back
    let stream = StreamId::parse("Account-a1").unwrap();
    let theirs = encode_event(&AccountEvent::MoneyDeposited { amount_cents: 100, currency: "EUR".into() }).unwrap();
    repo.store().append(&stream, 7, vec![theirs], None).await.expect("another writer");

    // When the repository loads the account
    let loaded = repo.load::<Account>("a1").await.unwrap();

    // Then it started from its cached state at 7 (not the snapshot at 6) and read only the event
    // after it, reaching the same state as a full replay
    assert_eq!((loaded.snapshot_version, loaded.events_replayed, loaded.version), (None, 1, 8));
    assert_eq!(loaded.state, repo.replay::<Account>("a1").await.unwrap().state);
    assert_eq!(loaded.state.balance_cents, 121);
}

#[tokio::test]
async fn without_a_cache_every_load_starts_from_the_snapshot() {
    let repo = Repository::new(InMemoryEventStore::new()).with_snapshots_every(3);
    repo.execute::<Account>("a1", &AccountCommand::Open, &ctx()).await.expect("open");
    for i in 1..=3 {
        repo.execute::<Account>("a1", &AccountCommand::Deposit(i), &ctx()).await.expect("deposit");
    }
    let loaded = repo.load::<Account>("a1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.events_replayed), (Some(3), 1));
}

/// The given / when / then helper (`aggregate::testing`), on the account: it reads a story of
/// decisions, and it fails when a decision is not the one expected.
mod given_when_then {
    use super::*;
    use crate::aggregate::testing::given;

    fn deposited(cents: i64) -> AccountEvent {
        AccountEvent::MoneyDeposited { amount_cents: cents, currency: "EUR".into() }
    }

    #[test]
    fn an_account_opens_once_and_takes_only_positive_deposits() {
        let after = given::<Account>([])
            .when(AccountCommand::Deposit(5))
            .then_error(AccountError::NotOpen)
            .when(AccountCommand::Open)
            .then_expect([AccountEvent::AccountOpened])
            .when(AccountCommand::Open)
            .then_nothing()
            .when(AccountCommand::Deposit(0))
            .then_error(AccountError::NotPositive)
            .when(AccountCommand::Deposit(250))
            .then_expect([deposited(250)]);
        assert_eq!(after.into_state(), Account { open: true, balance_cents: 250, deposits: 1 });
    }

    #[test]
    #[should_panic(expected = "decided other events than expected")]
    fn other_events_than_expected_fail_the_test() {
        let _ = given::<Account>([AccountEvent::AccountOpened])
            .when(AccountCommand::Deposit(5))
            .then_expect([deposited(6)]);
    }

    #[test]
    #[should_panic(expected = "but the command was rejected")]
    fn a_rejection_where_events_were_expected_fails_the_test() {
        let _ = given::<Account>([]).when(AccountCommand::Deposit(5)).then_expect([deposited(5)]);
    }

    #[test]
    #[should_panic(expected = "but the command decided")]
    fn events_where_a_rejection_was_expected_fail_the_test() {
        let _ = given::<Account>([AccountEvent::AccountOpened])
            .when(AccountCommand::Deposit(5))
            .then_error(AccountError::NotOpen);
    }

    #[test]
    #[should_panic(expected = "rejected with another error")]
    fn another_error_than_expected_fails_the_test() {
        let _ = given::<Account>([]).when(AccountCommand::Deposit(5)).then_error(AccountError::NotPositive);
    }
}
