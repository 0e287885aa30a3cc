//! External-provider simulator: a payment gateway, a shipping carrier and a notifier behind one
//! small HTTP service, for local runs and system tests. It answers by deterministic rules of its
//! own (documented in [`rules`]), replays the first answer for a repeated idempotency key, keeps a
//! ledger of the effects it had, and takes latency, error and outage behaviours at run time on
//! `/control/behaviour`. With a journal ([`Config::journal`]) it is durable as a real provider
//! is: a killed simulator, restarted on its journal, replays the answers it gave and its ledger
//! still shows what it did.

mod api;
mod behaviour;
mod journal;
mod ledger;
mod model;
pub mod rules;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use model::{Answer, Operation, Service};

#[derive(Debug, Clone, Default)]
pub struct Config {
    /// When set, every provider call needs `Authorization: Bearer <key>` (control calls do not).
    pub api_key: Option<String>,
    /// When set, every stored answer is appended to this file (one JSON line, flushed before the
    /// answer is sent) and the file is replayed at start: see `journal.rs`.
    pub journal: Option<PathBuf>,
}

/// A running simulator. Dropping it stops the server too, without waiting.
pub struct Simulator {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

/// How long `stop` waits for in-flight requests before cutting them off.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Binds `addr` (port 0: any free port) and serves until stopped, having replayed the journal
/// first, if there is one.
pub async fn serve(addr: SocketAddr, config: Config) -> anyhow::Result<Simulator> {
    let (shutdown, stopping) = watch::channel(false);
    let app = api::router(config, stopping.clone())?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut stopping = stopping;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                // Also ends when the sender is dropped.
                let _ = stopping.wait_for(|s| *s).await;
            })
            .await
    });
    Ok(Simulator { addr, shutdown, task })
}

impl Simulator {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL, on the loopback address when bound to all interfaces.
    pub fn url(&self) -> String {
        let ip = if self.addr.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { self.addr.ip() };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Stops accepting, lets in-flight requests finish (held ones answer 503 at once), and
    /// waits for the server to end, for at most a few seconds.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        match tokio::time::timeout(STOP_GRACE, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "provider simulator ended with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "provider simulator task failed"),
            Err(_) => {
                tracing::warn!("provider simulator still busy after {STOP_GRACE:?}: aborting");
                self.task.abort();
            }
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
