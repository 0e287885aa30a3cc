//! The AWS SDK configuration every function starts with, made cheap for a cold start.
//!
//! [`sdk_config`] resolves what `aws_config::load_defaults` resolves (region, credentials,
//! endpoints, retry and timeout settings from the environment first, as Lambda provides them)
//! with these differences:
//!
//! - No shared config or credentials file is read (`~/.aws/config`, `~/.aws/credentials`):
//!   Lambda has none, and the look-up is file-system work in the init phase. Named with
//!   `AWS_CONFIG_FILE` or `AWS_SHARED_CREDENTIALS_FILE`, they are read as usual.
//! - Region and credentials given in the environment (as Lambda gives them: `AWS_REGION`,
//!   `AWS_ACCESS_KEY_ID`…) are taken from there directly, the first link of the default chains,
//!   without building the rest of them: the web-identity provider's STS client, the container
//!   and IMDS clients (each an SDK client made at init, never called on Lambda). Without them,
//!   the default chains, as before.
//! - The HTTPS client, below.
//!
//! The SDK's default HTTPS client loads the platform's root certificates (`/etc/ssl/certs`, one
//! file each) and builds its TLS configuration when each SDK client is constructed, so that cost
//! lands in the init phase, once per client. This one:
//!
//! - trusts the Mozilla root programme's certificates compiled into the binary
//!   (`webpki-root-certs`, which includes the Amazon Trust Services roots AWS endpoints chain
//!   to): no file is read;
//! - uses rustls with ring (smaller than the default client's aws-lc);
//! - builds its TLS configuration at the first request, once for every client made from the
//!   returned configuration (they share the client and its connector cache).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use aws_config::environment::EnvironmentVariableCredentialsProvider;
use aws_config::{BehaviorVersion, ConfigLoader, Region, SdkConfig};
use aws_runtime::env_config::file::{EnvConfigFileKind, EnvConfigFiles};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use aws_smithy_http_client::{Builder, ConnectorBuilder, proxy::ProxyConfig};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata;
use aws_smithy_runtime_api::client::http::{HttpClient, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::shared::IntoShared;
use aws_smithy_types::config_bag::ConfigBag;

use crate::config::Vars;

/// Region, credentials, endpoints… from the environment (as `aws_config::load_defaults`), and
/// the HTTPS client of [this module](self).
pub async fn sdk_config() -> SdkConfig {
    loader(&crate::config::process_env).load().await
}

/// The loader of [`sdk_config`], for the variables `vars`.
fn loader(vars: Vars<'_>) -> ConfigLoader {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(https_client());
    if vars("AWS_CONFIG_FILE").is_none() && vars("AWS_SHARED_CREDENTIALS_FILE").is_none() {
        loader = loader.profile_files(EnvConfigFiles::builder().with_contents(EnvConfigFileKind::Config, "").build());
    }
    // The environment links of the default chains, in their order.
    if let Some(region) = vars("AWS_REGION").or_else(|| vars("AWS_DEFAULT_REGION")) {
        loader = loader.region(Region::new(region));
    }
    if vars("AWS_ACCESS_KEY_ID").is_some() && vars("AWS_SECRET_ACCESS_KEY").is_some() {
        loader = loader.credentials_provider(EnvironmentVariableCredentialsProvider::new());
    }
    loader
}

/// An SDK client made at its first use, for a client only a rare path needs (a dead-letter
/// queue's): constructing one is not free (each SDK crate parses its endpoint partition table
/// and compiles its region patterns when its first client is made, then builds the client's
/// runtime plugins), and that cost need not land in the init phase. Clones share the client.
#[derive(Clone)]
pub struct LazyClient<C>(Arc<LazyLock<C, Box<dyn FnOnce() -> C + Send>>>);

impl<C: 'static> LazyClient<C> {
    /// `make(sdk)` at the first use, e.g. `LazyClient::new(&sdk, aws_sdk_sqs::Client::new)`.
    pub fn new(sdk: &SdkConfig, make: fn(&SdkConfig) -> C) -> Self {
        let sdk = sdk.clone();
        Self(Arc::new(LazyLock::new(Box::new(move || make(&sdk)))))
    }

    /// Whether the client has been made.
    pub fn is_made(&self) -> bool {
        LazyLock::get(&self.0).is_some()
    }
}

/// A client already made.
impl<C: Send + 'static> From<C> for LazyClient<C> {
    fn from(client: C) -> Self {
        Self(Arc::new(LazyLock::new(Box::new(move || client))))
    }
}

impl<C> std::ops::Deref for LazyClient<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.0
    }
}

/// An HTTPS client (rustls) that trusts the compiled-in roots and builds its TLS configuration
/// at the first request rather than when an SDK client is made.
pub fn https_client() -> SharedHttpClient {
    let client = Builder::new().build_with_connector_fn(|settings, components| {
        CONNECTORS_BUILT.fetch_add(1, Ordering::Relaxed);
        let mut builder =
            ConnectorBuilder::default().tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring));
        builder.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            builder.set_sleep_impl(components.sleep_impl());
        }
        // As the SDK's default client: HTTP(S)_PROXY and NO_PROXY are honoured.
        builder.set_proxy_config(Some(ProxyConfig::from_env()));
        builder.set_tls_context(TLS_CONTEXT.clone());
        builder.build()
    });
    LazyConnector(client).into_shared()
}

/// How many connectors (TLS configurations) this process has built.
static CONNECTORS_BUILT: AtomicUsize = AtomicUsize::new(0);

/// The roots of trust, PEM-encoded the way the SDK's trust store takes them; built when the
/// first connector is.
static TLS_CONTEXT: LazyLock<TlsContext> = LazyLock::new(|| {
    TlsContext::builder()
        .with_trust_store(TrustStore::empty().with_native_roots(false).with_pem_certificate(root_certificates_pem()))
        .build()
        .expect("a trust store of PEM certificates")
});

/// The compiled-in root certificates as one PEM bundle.
fn root_certificates_pem() -> Vec<u8> {
    use base64::Engine;
    let mut pem = String::with_capacity(webpki_root_certs::TLS_SERVER_ROOT_CERTS.len() * 2048);
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.into_bytes()
}

/// The SDK's client without its eager start: `validate_base_client_config` (run as each SDK
/// client is constructed) is where the SDK's client builds a connector, to load the platform's
/// certificates early; here the first request does.
#[derive(Debug)]
struct LazyConnector(SharedHttpClient);

impl HttpClient for LazyConnector {
    fn http_connector(&self, settings: &HttpConnectorSettings, components: &RuntimeComponents) -> SharedHttpConnector {
        self.0.http_connector(settings, components)
    }

    fn validate_final_config(&self, components: &RuntimeComponents, cfg: &ConfigBag) -> Result<(), BoxError> {
        self.0.validate_final_config(components, cfg)
    }

    fn connector_metadata(&self) -> Option<ConnectorMetadata> {
        self.0.connector_metadata()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_in_roots_are_valid_pem_and_include_amazons() {
        let pem = root_certificates_pem();
        let text = String::from_utf8(pem.clone()).expect("ASCII");
        let count = text.matches("-----BEGIN CERTIFICATE-----").count();
        assert_eq!(count, webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
        assert!(count > 100, "only {count} roots");
        // Each block decodes back to the DER it came from.
        let decoded: Vec<Vec<u8>> = text
            .split("-----END CERTIFICATE-----\n")
            .filter(|b| !b.is_empty())
            .map(|block| {
                use base64::Engine;
                let body: String = block.lines().filter(|l| !l.starts_with("-----")).collect();
                base64::engine::general_purpose::STANDARD.decode(body).expect("base64")
            })
            .collect();
        assert!(decoded.iter().zip(webpki_root_certs::TLS_SERVER_ROOT_CERTS).all(|(d, c)| d == c.as_ref()));
        // Amazon Root CA 1: the root AWS service endpoints chain to ("Amazon Root CA 1" in its
        // subject, DER-encoded as a printable string).
        assert!(
            webpki_root_certs::TLS_SERVER_ROOT_CERTS
                .iter()
                .any(|c| c.as_ref().windows(16).any(|w| w == b"Amazon Root CA 1")),
            "no Amazon Root CA 1 among the roots"
        );
    }

    #[tokio::test]
    async fn region_and_credentials_are_taken_from_the_environment_given() {
        let vars = |name: &str| match name {
            "AWS_REGION" => Some("eu-west-3".to_owned()),
            "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" => Some("test".to_owned()),
            _ => None,
        };
        let sdk = loader(&vars).load().await;
        assert_eq!(sdk.region().map(|r| r.as_ref()), Some("eu-west-3"));
        assert!(sdk.credentials_provider().is_some());
    }

    #[test]
    fn a_lazy_client_is_made_once_at_its_first_use() {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let sdk = SdkConfig::builder().build();
        let client = LazyClient::new(&sdk, |_| MADE.fetch_add(1, Ordering::SeqCst) + 1);
        let clone = client.clone();
        assert!(!client.is_made());
        assert_eq!(MADE.load(Ordering::SeqCst), 0, "made before its first use");
        assert_eq!((*clone, *client), (1, 1));
        assert!(client.is_made());
        assert_eq!(MADE.load(Ordering::SeqCst), 1, "clones share one client");
        // A client made elsewhere is used as it is.
        assert_eq!(*LazyClient::from(7), 7);
    }

    #[test]
    fn constructing_sdk_clients_builds_no_connector() {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .http_client(https_client())
            .build();
        // What the SDK's own client does here: load the certificates, build the TLS configuration.
        let _dynamodb = aws_sdk_dynamodb::Client::from_conf(config.clone());
        let _again = aws_sdk_dynamodb::Client::from_conf(config);
        assert_eq!(CONNECTORS_BUILT.load(Ordering::Relaxed), 0, "a connector was built before any request");
    }
}
