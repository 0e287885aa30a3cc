//! The AWS SDK configuration every function starts with, made cheap for a cold start.
//!
//! [`sdk_config`] resolves what `aws_config::load_defaults` resolves (region, credentials,
//! endpoints, retry and timeout settings from the environment first, as Lambda provides them)
//! with one difference: the HTTPS client. The SDK's default client loads the platform's root
//! certificates (`/etc/ssl/certs`, one file each) and builds its TLS configuration when each
//! SDK client is constructed, so that cost lands in the init phase, once per client. This one:
//!
//! - trusts the Mozilla root programme's certificates compiled into the binary
//!   (`webpki-root-certs`, which includes the Amazon Trust Services roots AWS endpoints chain
//!   to): no file is read;
//! - uses rustls with ring (smaller than the default client's aws-lc);
//! - builds its TLS configuration at the first request, once for every client made from the
//!   returned configuration (they share the client and its connector cache).

use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
use aws_smithy_http_client::{Builder, ConnectorBuilder, proxy::ProxyConfig};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata;
use aws_smithy_runtime_api::client::http::{HttpClient, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::shared::IntoShared;
use aws_smithy_types::config_bag::ConfigBag;

/// Region, credentials, endpoints… from the environment (as `aws_config::load_defaults`), and
/// the HTTPS client of [this module](self).
pub async fn sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).http_client(https_client()).load().await
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
