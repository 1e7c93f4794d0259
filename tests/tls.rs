//! Upstream TLS: a registry whose certificate is signed by a private CA is
//! trusted only with hosts.toml `ca` (or `skip_verify`), and one that
//! demands a client certificate gets the one `client` names.

use std::sync::Arc;

use http::StatusCode;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::support::fake::{Behaviour, Fake};
use crate::support::image::Image;
use crate::support::{get, Daemon};

pub struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names`, written as `<name>.pem` and `<name>.key`.
    fn leaf(
        &self,
        file: &str,
        names: &[&str],
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        std::fs::write(self.dir.path().join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(
            self.dir.path().join(format!("{file}.key")),
            key.serialize_pem(),
        )
        .unwrap();
        let chain = vec![cert.der().clone()];
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
        (chain, key)
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }

    pub async fn registry(&self, require_client_cert: bool) -> Fake {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = self.leaf("server", &["localhost", "127.0.0.1"]);
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes()).unwrap())
                .unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Fake::start_tls(Behaviour::default(), acceptor).await
    }
}

pub fn https(f: &Fake) -> String {
    format!("https://127.0.0.1:{}", f.addr.port())
}

#[tokio::test]
async fn private_ca_is_trusted_only_through_hosts_toml() {
    let pki = Pki::new();
    let up = pki.registry(false).await;
    let img = Image::build(&[("f", b"tls layer")]);
    up.push_image("app", "v1", &img);

    let plain = format!("server = \"{}\"\n", https(&up));
    let with_ca = format!("{plain}ca = \"{}\"\n", pki.path("ca.pem"));
    let skip = format!("{plain}skip_verify = true\n");
    let d = Daemon::builder()
        .hosts("plain.test", plain)
        .hosts("ca.test", with_ca)
        .hosts("skip.test", skip)
        .start()
        .await;
    let r = get(&d.url("/v2/app/manifests/v1?ns=plain.test")).await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "unknown CA must fail"
    );
    for ns in ["ca.test", "skip.test"] {
        let r = get(&d.url(&format!("/v2/app/manifests/v1?ns={ns}"))).await;
        assert_eq!(r.status, StatusCode::OK, "{ns}");
        assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    }
    d.stop().await;
}

#[tokio::test]
async fn client_certificates_from_hosts_toml() {
    let pki = Pki::new();
    let up = pki.registry(true).await;
    let img = Image::build(&[("f", b"mtls layer")]);
    up.push_image("app", "v1", &img);
    pki.leaf("client", &["nodemirror"]);

    let base = format!(
        "server = \"{}\"\nca = \"{}\"\n",
        https(&up),
        pki.path("ca.pem")
    );
    let with_client = format!(
        "{base}client = [[\"{}\", \"{}\"]]\n",
        pki.path("client.pem"),
        pki.path("client.key")
    );
    let d = Daemon::builder()
        .hosts("nocert.test", base)
        .hosts("cert.test", with_client)
        .start()
        .await;
    let r = get(&d.url("/v2/app/manifests/v1?ns=nocert.test")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = get(&d.url("/v2/app/manifests/v1?ns=cert.test")).await;
    assert_eq!(r.status, StatusCode::OK);
    d.stop().await;
}

/// An https registry with credentials whose Bearer challenge names a
/// plain-http token service: the credentials are never sent there.
#[tokio::test]
async fn credentials_never_go_to_a_plain_http_token_realm() {
    let pki = Pki::new();
    let up = pki.registry(false).await;
    let img = Image::build(&[("f", b"behind a token")]);
    up.push_image("app", "v1", &img);
    // The token service the challenge names: plain http, recording.
    let realm = Fake::start(Behaviour::default()).await;
    up.set(|b| {
        b.bearer = Some(Some(("robot".into(), "s3cret".into())));
        b.realm = Some(format!("{}/token", realm.url()));
    });
    let auth = format!(
        r#"{{"auths": {{"127.0.0.1:{}": {{"username": "robot", "password": "s3cret"}}}}}}"#,
        up.addr.port()
    );
    let d = Daemon::builder()
        .hosts(
            "reg.test",
            format!(
                "server = \"{}\"\nca = \"{}\"\n",
                https(&up),
                pki.path("ca.pem")
            ),
        )
        .auth(auth)
        .start()
        .await;
    let r = get(&d.url("/v2/app/manifests/v1?ns=reg.test")).await;
    assert_ne!(r.status, StatusCode::OK);
    let leaked: Vec<_> = realm
        .seen()
        .into_iter()
        .filter(|s| s.headers.contains_key("authorization"))
        .collect();
    assert!(leaked.is_empty(), "credentials sent in clear: {leaked:?}");
    d.stop().await;
}
