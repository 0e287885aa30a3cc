//! The external providers of a local run: the provider simulator (`simulator/`), served beside
//! the functions, and the template parameters that point the functions at it. On AWS those
//! parameters are the real providers' URLs; nothing in the functions knows the difference.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::provision::Stack;
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

/// The name of the SSM parameter holding the providers' API key, as the stack's functions have
/// it (`PROVIDER_API_KEY_PARAMETER`).
pub fn api_key_parameter(stack: &Stack) -> Option<String> {
    stack.functions.values().find_map(|env| env.get("PROVIDER_API_KEY_PARAMETER").cloned())
}

/// The API key in parameter `name`, if it exists.
pub async fn api_key(ssm: &aws_sdk_ssm::Client, name: &str) -> anyhow::Result<Option<String>> {
    match ssm.get_parameter().name(name).with_decryption(true).send().await {
        Ok(answer) => Ok(answer.parameter.and_then(|p| p.value)),
        Err(e) if e.as_service_error().is_some_and(|e| e.is_parameter_not_found()) => Ok(None),
        Err(e) => Err(anyhow::anyhow!("GetParameter {name}: {}", aws_sdk_ssm::error::DisplayErrorContext(&e))),
    }
}

/// The API key in parameter `name`, made (a random one, as a SecureString) when it is missing:
/// a local stack's providers have credentials as a deployed one's do.
pub async fn ensure_api_key(ssm: &aws_sdk_ssm::Client, name: &str) -> anyhow::Result<String> {
    if let Some(key) = api_key(ssm, name).await? {
        return Ok(key);
    }
    let key = uuid::Uuid::new_v4().simple().to_string();
    put_api_key(ssm, name, &key).await?;
    Ok(key)
}

/// Sets parameter `name` to `key` (a SecureString).
pub async fn put_api_key(ssm: &aws_sdk_ssm::Client, name: &str, key: &str) -> anyhow::Result<()> {
    ssm.put_parameter()
        .name(name)
        .value(key)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .overwrite(true)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("PutParameter {name}: {}", aws_sdk_ssm::error::DisplayErrorContext(&e)))?;
    Ok(())
}

/// Serves the simulator on `port` of the loopback address, asking callers for `api_key`.
pub async fn serve(port: u16, api_key: Option<String>) -> anyhow::Result<provider_simulator::Simulator> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    provider_simulator::serve(addr, provider_simulator::Config { api_key }).await
}
