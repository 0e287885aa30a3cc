//! The simulator's journal: what it answered survives a stop (or a kill) and a restart on the
//! same file, as a real provider's records do.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use provider_simulator::{Config, Simulator, serve};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A journal path of this test's own, in the target's scratch directory.
fn journal_path(name: &str) -> PathBuf {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir.join(format!("journal-{name}-{}-{nanos}.jsonl", std::process::id()))
}

async fn start(journal: &Path) -> Simulator {
    let config = Config { journal: Some(journal.to_owned()), ..Config::default() };
    serve(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await.expect("simulator starts")
}

async fn charge(url: &str, key: &str, token: &str) -> (StatusCode, Value) {
    let body = json!({"amount": {"amountMinor": 4499, "currency": "EUR"}, "paymentToken": token});
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/charges"))
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .expect("charge request");
    (response.status(), response.json().await.expect("JSON answer"))
}

async fn ledger(url: &str, contains: &str) -> Value {
    let response = reqwest::get(format!("{url}/control/ledger?contains={contains}")).await.expect("ledger request");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("ledger JSON")
}

#[tokio::test]
async fn a_restarted_simulator_answers_a_repeated_key_from_its_journal_charged_once() {
    // Given a simulator with a journal that charged one key and declined another
    let journal = journal_path("restart");
    let sim = start(&journal).await;
    let first = charge(&sim.url(), "order-j1:charge", "tok_visa").await;
    assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
    let declined = charge(&sim.url(), "order-j2:charge", "tok_decline").await;
    assert_eq!(declined.0, StatusCode::PAYMENT_REQUIRED, "{}", declined.1);
    let before = ledger(&sim.url(), "order-j1").await["entries"].clone();

    // When it stops and a new one starts on the same journal
    sim.stop().await;
    let sim = start(&journal).await;

    // Then a repeated key gets the stored answer, the decline too
    assert_eq!(charge(&sim.url(), "order-j1:charge", "tok_visa").await, first);
    assert_eq!(charge(&sim.url(), "order-j2:charge", "tok_visa").await, declined);
    // And the ledger shows the one effect it had before, as it was, and the repeat as a duplicate
    let after = ledger(&sim.url(), "order-j1").await;
    assert_eq!(after["entries"], before, "{after}");
    assert_eq!(after["entries"].as_array().map(Vec::len), Some(1), "{after}");
    assert_eq!(after["duplicates"]["charge"], 1, "{after}");
    // (call counts are not kept: only this run's)
    assert_eq!(after["calls"]["charge"], 1, "{after}");
    assert_eq!(ledger(&sim.url(), "order-j").await["entries"].as_array().map(Vec::len), Some(2));
    sim.stop().await;
    let _ = std::fs::remove_file(&journal);
}

#[tokio::test]
async fn a_torn_last_line_is_skipped_and_the_journal_goes_on_after_it() {
    // Given a journal with one answer and the start of another (killed mid-write)
    let journal = journal_path("torn");
    let sim = start(&journal).await;
    let first = charge(&sim.url(), "order-t1:charge", "tok_visa").await;
    sim.stop().await;
    let mut file = std::fs::OpenOptions::new().append(true).open(&journal).expect("journal");
    file.write_all(br#"{"at":"2026-01-01T00:00:00Z","operation":"charge","idempotencyKey":"order-t2:cha"#)
        .expect("torn line");
    drop(file);

    // When the simulator starts on it
    let sim = start(&journal).await;

    // Then the whole answer is kept, the torn one is not (that charge was never answered)
    assert_eq!(charge(&sim.url(), "order-t1:charge", "tok_visa").await, first);
    assert_eq!(ledger(&sim.url(), "order-t2").await["entries"].as_array().map(Vec::len), Some(0));
    // And what it answers next is journaled on a line of its own, read back after another restart
    let second = charge(&sim.url(), "order-t2:charge", "tok_visa").await;
    assert_eq!(second.0, StatusCode::CREATED);
    sim.stop().await;
    let sim = start(&journal).await;
    assert_eq!(charge(&sim.url(), "order-t2:charge", "tok_visa").await, second);
    assert_eq!(ledger(&sim.url(), "order-t").await["entries"].as_array().map(Vec::len), Some(2));
    sim.stop().await;
    let text = std::fs::read_to_string(&journal).expect("journal");
    assert_eq!(text.lines().count(), 2, "{text}");
    let _ = std::fs::remove_file(&journal);
}

#[tokio::test]
async fn a_cleared_ledger_stays_cleared_across_a_restart() {
    // Given a simulator with a journal that charged, then had its ledger cleared
    let journal = journal_path("clear");
    let sim = start(&journal).await;
    charge(&sim.url(), "order-c1:charge", "tok_visa").await;
    let cleared = reqwest::Client::new().delete(format!("{}/control/ledger", sim.url())).send().await.expect("clear");
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    sim.stop().await;

    // When it restarts on the journal
    let sim = start(&journal).await;

    // Then nothing comes back
    assert_eq!(ledger(&sim.url(), "order-c1").await["entries"].as_array().map(Vec::len), Some(0));
    sim.stop().await;
    let _ = std::fs::remove_file(&journal);
}

#[test]
fn the_binary_prints_its_url_once_listening_and_replays_its_journal_after_a_kill() {
    // Given the simulator's binary on any free port, with a journal
    let journal = journal_path("binary");
    let spawn = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_provider-simulator"))
            .args(["--port", "0", "--journal"])
            .arg(&journal)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the simulator starts");
        // Then its one line on stdout says where it listens
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("a line");
        let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")).to_owned();
        assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"), "{url}");
        (child, url)
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (mut child, url) = spawn();
    let first = runtime.block_on(charge(&url, "order-b1:charge", "tok_visa"));
    assert_eq!(first.0, StatusCode::CREATED);

    // When it is killed (SIGKILL) and started again on the journal
    child.kill().expect("kill");
    child.wait().expect("wait");
    let (mut child, url) = spawn();

    // Then it answers the key as before, one effect in its ledger
    assert_eq!(runtime.block_on(charge(&url, "order-b1:charge", "tok_visa")), first);
    let ledger = runtime.block_on(ledger(&url, "order-b1"));
    assert_eq!(ledger["entries"].as_array().map(Vec::len), Some(1), "{ledger}");
    child.kill().expect("kill");
    child.wait().expect("wait");
    let _ = std::fs::remove_file(&journal);
}
