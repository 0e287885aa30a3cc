//! The external providers of a local run: the provider simulator (`simulator/`), served beside
//! the functions, and the template parameters that point the functions at it. On AWS those
//! parameters are the real providers' URLs; nothing in the functions knows the difference.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::template::Template;

/// Where `local-env run` serves the simulator unless `PROVIDER_SIMULATOR_PORT` says otherwise.
pub const DEFAULT_PORT: u16 = 4700;

/// The template parameters holding each provider's base URL.
pub const URL_PARAMETERS: [&str; 3] = ["PaymentProviderUrl", "CarrierUrl", "NotifierUrl"];

/// `PROVIDER_SIMULATOR_PORT`, or [`DEFAULT_PORT`].
pub fn port() -> anyhow::Result<u16> {
    match std::env::var("PROVIDER_SIMULATOR_PORT") {
        Ok(p) if !p.trim().is_empty() => Ok(p.trim().parse()?),
        _ => Ok(DEFAULT_PORT),
    }
}

/// Points every provider URL parameter the template has, and the caller did not set, at `url`.
pub fn point_at(template: &Template, url: &str, overrides: &mut HashMap<String, String>) {
    for name in URL_PARAMETERS.into_iter().filter(|n| template.parameters.contains_key(*n)) {
        overrides.entry(name.to_owned()).or_insert_with(|| url.to_owned());
    }
}

/// Serves the simulator on `port` of the loopback address.
pub async fn serve(port: u16) -> anyhow::Result<provider_simulator::Simulator> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    provider_simulator::serve(addr, provider_simulator::Config::default()).await
}
