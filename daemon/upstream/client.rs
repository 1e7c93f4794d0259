//! HTTP clients for upstream endpoints: rustls with the system's roots plus
//! a hosts.toml `ca`, an optional client certificate, or no verification
//! at all when `skip_verify` says so. Endpoints with equal TLS settings and
//! dial timeout share one client and so one connection pool.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};

use super::proxy::{Dialer, ProxyChoice};
use crate::config::hosts::HostSettings;

/// The client every upstream request goes through.
pub type HttpClient = Client<HttpsConnector<Dialer>, Empty<Bytes>>;

/// Builds clients and shares those with equal settings.
pub struct ClientPool {
    provider: Arc<CryptoProvider>,
    system_roots: RootCertStore,
    clients: HashMap<ClientKey, HttpClient>,
    /// The proxy of config.toml or the environment, before hosts.toml.
    proxy: ProxyChoice,
}

/// Endpoints whose TLS material and dial timeout are equal share a client.
/// The TLS part is a hash of the certificates and keys themselves, not of
/// their paths, so a certificate rotated in place gets a new client on
/// reload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    tls: [u8; 32],
    dial: Duration,
    /// Connects to public addresses only (see [`super::admission`]).
    public_only: bool,
    proxy: ProxyChoice,
}

impl ClientKey {
    fn new(
        settings: &HostSettings,
        dial: Duration,
        public_only: bool,
        proxy: ProxyChoice,
    ) -> ClientKey {
        let mut h = Sha256::new();
        let mut add = |part: &[u8]| {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        };
        add(&[u8::from(settings.skip_verify)]);
        for ca in &settings.ca {
            add(b"ca");
            add(ca);
        }
        if let Some(id) = &settings.client {
            for c in &id.chain {
                add(b"chain");
                add(c);
            }
            add(b"key");
            add(id.key.secret_der());
        }
        ClientKey {
            tls: h.finalize().into(),
            dial,
            public_only,
            proxy,
        }
    }
}

impl ClientPool {
    /// Reads the system's root certificates.
    pub fn load() -> Self {
        let mut system_roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "could not load some system root certificates");
        }
        let (added, ignored) = system_roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "loaded system root certificates");
        ClientPool {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            system_roots,
            clients: HashMap::new(),
            proxy: ProxyChoice::default(),
        }
    }

    /// Sets the proxy that endpoints whose hosts.toml names none use
    /// (config.toml's, else the environment's); clients built before keep
    /// theirs and are dropped with their snapshot.
    pub fn set_proxy(&mut self, proxy: ProxyChoice) {
        self.proxy = proxy;
    }

    /// The proxy an endpoint with `settings` uses.
    pub fn proxy_for(&self, settings: &HostSettings) -> ProxyChoice {
        self.proxy
            .overridden(settings.proxy.as_deref(), settings.no_proxy.as_deref())
    }

    /// The client for `settings` (dialling with `connect_timeout` unless
    /// the host sets its own), built on first use.
    /// With `public_only`, names resolving to a non-public address are
    /// refused before connecting.
    pub fn client(
        &mut self,
        settings: &HostSettings,
        connect_timeout: Duration,
        public_only: bool,
    ) -> Result<HttpClient, String> {
        let dial = settings.dial_timeout.unwrap_or(connect_timeout);
        let proxy = self.proxy_for(settings);
        proxy.check()?;
        let key = ClientKey::new(settings, dial, public_only, proxy.clone());
        if let Some(c) = self.clients.get(&key) {
            return Ok(c.clone());
        }
        let tls = self.tls_config(settings, true)?;
        let client = build_client(tls, Dialer::new(&proxy, dial, public_only));
        self.clients.insert(key, client.clone());
        Ok(client)
    }

    /// A client that trusts `settings.ca` only (not the system's roots),
    /// for the cluster's peers; not pooled.
    pub fn client_only_roots(
        &self,
        settings: &HostSettings,
        dial: Duration,
    ) -> Result<HttpClient, String> {
        let tls = self.tls_config(settings, false)?;
        // Peers are reached directly, never through a proxy.
        Ok(build_client(
            tls,
            Dialer::new(&ProxyChoice::default(), dial, false),
        ))
    }

    fn tls_config(
        &self,
        settings: &HostSettings,
        system_roots: bool,
    ) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let builder = if settings.skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(self.provider.clone())))
        } else {
            let mut roots = match system_roots {
                true => self.system_roots.clone(),
                false => RootCertStore::empty(),
            };
            for ca in &settings.ca {
                roots
                    .add(ca.clone())
                    .map_err(|e| format!("invalid CA certificate: {e}"))?;
            }
            builder.with_root_certificates(roots)
        };
        match &settings.client {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| format!("invalid client certificate or key: {e}")),
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

fn build_client(tls: ClientConfig, dialer: Dialer) -> HttpClient {
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(dialer);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(https)
}

/// `skip_verify = true`: accept any server certificate, but still check
/// that the handshake is signed by the key it presents.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
