//! Hostile upstreams and local callers: the daemon is no open proxy into
//! the node's network (namespaces without a hosts.d folder are admitted by
//! policy and at public addresses only, IP literals in every notation
//! refused without connecting; redirects never go from https to http;
//! only manifests are served as manifests), and its error texts say
//! nothing about what lies behind it. Only IP literals, `localhost` and
//! hosts.d names are used: nothing here looks a name up in DNS.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Method, StatusCode};
use nodemirror::config::{ImplicitPolicy, UpstreamSettings};

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::image::{Image, OCI_MANIFEST};
use crate::support::{get, quick_upstream, request, Daemon};

/// A loopback port that counts the connections made to it.
struct Counter {
    port: u16,
    accepted: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Counter {
    async fn start() -> Counter {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        Counter {
            port,
            accepted,
            _task: task,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[tokio::test]
async fn implicit_namespaces_at_non_public_addresses_are_refused_without_connecting() {
    let target = Counter::start().await;
    let d = Daemon::builder().start().await;
    let p = target.port;
    for ns in [
        format!("127.0.0.1:{p}"),
        format!("127.1:{p}"),
        format!("2130706433:{p}"),
        format!("0x7f.1:{p}"),
        format!("0177.0.0.1:{p}"),
        format!("[::ffff:127.0.0.1]:{p}"),
        format!("localhost:{p}"),
    ] {
        for path in [
            format!("/v2/app/manifests/v1?ns={ns}"),
            format!("/v2/app/blobs/{D}?ns={ns}"),
            format!("/v2/app/tags/list?ns={ns}"),
        ] {
            let r = get(&d.url(&path)).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
            assert_eq!(r.error_code(), "DENIED", "{path}");
            let text = String::from_utf8_lossy(r.bytes()).to_string();
            assert!(
                !text.contains(&p.to_string()),
                "the error tells of the port: {text}"
            );
        }
    }
    // The same by path prefix (containers/image).
    let r = get(&d.url(&format!("/v2/127.1:{p}/app/manifests/v1"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(
        target.connections(),
        0,
        "nothing may connect to a refused host"
    );
    d.stop().await;
}

#[tokio::test]
async fn the_policy_can_turn_implicit_namespaces_off_or_allow_a_list() {
    let target = Counter::start().await;
    let p = target.port;
    let allowed = format!("localhost:{p}");
    // Opt-in openness: any address, but only the listed namespaces.
    let d = Daemon::builder()
        .upstream(UpstreamSettings {
            implicit_namespaces: ImplicitPolicy::Any,
            allowed_namespaces: vec![allowed.parse().unwrap()],
            ..quick_upstream()
        })
        .start()
        .await;
    let r = get(&d.url(&format!("/v2/app/manifests/v1?ns=127.0.0.1:{p}"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "not in the allowlist");
    assert_eq!(target.connections(), 0);
    let r = get(&d.url(&format!("/v2/app/manifests/v1?ns={allowed}"))).await;
    assert_ne!(
        r.status,
        StatusCode::FORBIDDEN,
        "listed, and any address allowed"
    );
    assert!(
        target.connections() > 0,
        "the allowed namespace was contacted"
    );
    d.stop().await;

    let before = target.connections();
    let d = Daemon::builder()
        .upstream(UpstreamSettings {
            implicit_namespaces: ImplicitPolicy::Off,
            ..quick_upstream()
        })
        .start()
        .await;
    let r = get(&d.url(&format!("/v2/app/manifests/v1?ns={allowed}"))).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(target.connections(), before);
    d.stop().await;
}

/// hosts.d is trusted as written: a configured loopback registry serves.
#[tokio::test]
async fn configured_namespaces_are_trusted_as_written() {
    let up = Fake::start(Behaviour::default()).await;
    let img = Image::build(&[("x", b"trusted")]);
    up.push_image("app", "v1", &img);
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .upstream(UpstreamSettings {
            implicit_namespaces: ImplicitPolicy::Off,
            ..quick_upstream()
        })
        .start()
        .await;
    let r = get(&d.url("/v2/app/manifests/v1?ns=reg.test")).await;
    assert_eq!(r.status, StatusCode::OK);
    d.stop().await;
}

/// What a registry sends as a manifest is served only when it is one: not
/// a page, not a secret a redirect led to, not a type the body denies.
#[tokio::test]
async fn only_manifests_are_served_and_cached_as_manifests() {
    let up = Fake::start(Behaviour::default()).await;
    up.put_at("app/manifests/secret", "text/plain", b"db-password=hunter2");
    up.put_at("app/manifests/page", "text/html", b"<html>login</html>");
    up.put_at(
        "app/manifests/lying",
        OCI_MANIFEST,
        br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#,
    );
    up.put_at(
        "app/manifests/json",
        "application/json",
        br#"{"token":"abc"}"#,
    );
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    for tag in ["secret", "page", "lying", "json"] {
        let r = get(&d.url(&format!("/v2/app/manifests/{tag}?ns=reg.test"))).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{tag}");
        let text = String::from_utf8_lossy(r.bytes()).to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("login"),
            "{text}"
        );
    }
    let cached = std::fs::read_dir(d.cache_dir.join("manifests/sha256"))
        .unwrap()
        .count();
    assert_eq!(cached, 0, "nothing was cached");
    d.stop().await;
}

#[tokio::test]
async fn a_redirect_from_https_to_plain_http_is_not_followed() {
    let pki = crate::tls::Pki::new();
    let storage = Fake::start(Behaviour::default()).await;
    let registry = pki.registry(false).await;
    registry.set(|b| b.redirect_blobs = Some(storage.url()));
    let blob = b"layer behind a downgrade".to_vec();
    let digest = storage.put_blob("app", &blob);
    let toml = format!(
        "server = \"{}\"\nca = \"{}\"\n",
        crate::tls::https(&registry),
        pki.path("ca.pem")
    );
    let d = Daemon::builder().hosts("reg.test", toml).start().await;
    let r = get(&d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(registry.hits("/blobs/") >= 1);
    assert!(
        storage.seen().is_empty(),
        "the plain-http target was never asked"
    );
    d.stop().await;
}

#[tokio::test]
async fn every_answer_carries_nosniff_and_errors_say_nothing_of_what_is_behind() {
    let up = Fake::start(Behaviour::default()).await;
    let img = Image::build(&[("n", b"nosniff")]);
    up.push_image("app", "v1", &img);
    let dead = format!("http://127.0.0.1:{}", crate::support::free_port());
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .hosts("dead.test", hosts_toml(&[], Some(&dead)))
        .start()
        .await;
    let blob = crate::support::sha256(&img.layers[0]);
    for path in [
        "/v2/".to_string(),
        "/v2/app/manifests/v1?ns=reg.test".to_string(),
        format!("/v2/app/blobs/{blob}?ns=reg.test"),
        "/v2/app/manifests/v1?ns=dead.test".to_string(),
        "/v2/Bad/manifests/v1".to_string(),
    ] {
        let r = request(Method::GET, &d.url(&path), &[]).await;
        assert_eq!(r.header("x-content-type-options"), "nosniff", "{path}");
    }
    let r = get(&d.url("/v2/app/manifests/v1?ns=dead.test")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let text = String::from_utf8_lossy(r.bytes()).to_string();
    let port = dead.rsplit(':').next().unwrap();
    assert!(
        !text.contains(port) && !text.to_lowercase().contains("refused"),
        "{text}"
    );
    d.stop().await;
}
