//! The provider simulator as a process, for the local environment and the system tests.
//!
//! Once listening it prints exactly one line to stdout, `listening on http://HOST:PORT`, so a
//! parent that passed `--port 0` learns the port; its logs (JSON) go to stderr.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use provider_simulator::{Config, serve};
use tracing_subscriber::EnvFilter;

/// Simulated payment gateway, shipping carrier and notifier over HTTP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Port to listen on (0: any free port, printed once listening).
    #[arg(long, env = "PROVIDER_SIMULATOR_PORT", default_value_t = 4700)]
    port: u16,
    /// Address to listen on (0.0.0.0 to be reachable from containers).
    #[arg(long, env = "PROVIDER_SIMULATOR_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Require `Authorization: Bearer <key>` on provider calls.
    #[arg(long, env = "PROVIDER_SIMULATOR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Keep every stored answer in this file (JSON lines), and replay it at start: a restarted
    /// simulator answers a repeated key as before, and its ledger shows what it did.
    #[arg(long, env = "PROVIDER_SIMULATOR_JOURNAL")]
    journal: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let args = Args::parse();
    let config = Config { api_key: args.api_key, journal: args.journal };
    let simulator = serve(SocketAddr::new(args.host, args.port), config).await?;
    tracing::info!(url = %simulator.url(), "provider simulator listening");
    // The one line on stdout: what a parent waits for.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", simulator.url())?;
    stdout.flush()?;
    drop(stdout);
    shutdown_signal().await;
    tracing::info!("stopping");
    simulator.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => tracing::warn!(error = %e, "no SIGTERM handler; stopping on ctrl-c only"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
