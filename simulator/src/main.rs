//! The provider simulator as a process, for the local environment.

use std::net::{IpAddr, SocketAddr};

use clap::Parser;
use provider_simulator::{Config, serve};
use tracing_subscriber::EnvFilter;

/// Simulated payment gateway, shipping carrier and notifier over HTTP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[arg(long, env = "PROVIDER_SIMULATOR_PORT", default_value_t = 4700)]
    port: u16,
    /// Address to listen on (0.0.0.0 to be reachable from containers).
    #[arg(long, env = "PROVIDER_SIMULATOR_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// Require `Authorization: Bearer <key>` on provider calls.
    #[arg(long, env = "PROVIDER_SIMULATOR_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let args = Args::parse();
    let simulator = serve(SocketAddr::new(args.host, args.port), Config { api_key: args.api_key }).await?;
    tracing::info!(url = %simulator.url(), "provider simulator listening");
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
