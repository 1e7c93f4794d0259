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

/// Blobs of `count` copies of one byte (distinct per `i`), served by `up`
/// one byte a second: their digests.
fn trickling(up: &Fake, n: usize) -> Vec<String> {
    use sha2::Digest as _;
    (0..n)
        .map(|i| {
            let count = 1000 + i;
            let byte = (i % 251) as u8;
            let digest = format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(vec![byte; count]))
            );
            up.put_repeated_blob("slow/app", &digest, bytes::Bytes::from(vec![byte]), count);
            digest
        })
        .collect()
}

/// Starts `digests.len()` clients on `ns`, each holding its response open
/// for `hold`: their statuses and Retry-After headers.
fn clients(
    d: &Daemon,
    ns: &str,
    digests: &[String],
    hold: std::time::Duration,
) -> Vec<tokio::task::JoinHandle<(StatusCode, String)>> {
    digests
        .iter()
        .map(|digest| {
            let url = d.url(&format!("/v2/slow/app/blobs/{digest}?ns={ns}"));
            tokio::spawn(async move {
                use http_body_util::BodyExt;
                let client = crate::support::http_client();
                let req = http::Request::get(&url)
                    .body(http_body_util::Empty::new())
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                let status = resp.status();
                let retry = resp
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                let mut body = resp.into_body();
                let mut first = Vec::new();
                let _ = tokio::time::timeout(hold, async {
                    while let Some(Ok(f)) = body.frame().await {
                        if let (true, Ok(d)) = (status != StatusCode::OK, f.into_data()) {
                            first.extend_from_slice(&d);
                        }
                    }
                })
                .await;
                if status != StatusCode::OK && status != StatusCode::SERVICE_UNAVAILABLE {
                    eprintln!("{status}: {}", String::from_utf8_lossy(&first));
                }
                if status == StatusCode::SERVICE_UNAVAILABLE && retry.is_empty() {
                    eprintln!(
                        "503 without Retry-After: {}",
                        String::from_utf8_lossy(&first)
                    );
                }
                (status, retry)
            })
        })
        .collect()
}

/// 270 trickling downloads with clients attached no longer starve the
/// node: cached blobs (a small one read from the file, a large one sent
/// with sendfile) are still served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_upstreams_cannot_starve_cached_blobs() {
    let slow = Fake::start(Behaviour {
        chunk_delay: Some(std::time::Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    let digests = trickling(&slow, 270);
    let fast = Fake::start(Behaviour::default()).await;
    let small = vec![7u8; 10_000];
    let large: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let small_d = fast.put_blob("fast/app", &small);
    let large_d = fast.put_blob("fast/app", &large);
    let d = Daemon::builder()
        .hosts("slow.test", hosts_toml(&[], Some(&slow.url())))
        .hosts("fast.test", hosts_toml(&[], Some(&fast.url())))
        // Caps high enough that all 270 run: the disk pool alone keeps
        // the node serving.
        .upstream(UpstreamSettings {
            max_fetches: 300,
            max_fetches_per_namespace: 300,
            idle_timeout: std::time::Duration::from_secs(30),
            // 270 requests burst onto one in-process fake on 2 cores.
            connect_timeout: std::time::Duration::from_secs(10),
            first_byte_timeout: std::time::Duration::from_secs(10),
            ..quick_upstream()
        })
        .start()
        .await;
    // Warm the cache first.
    assert_eq!(
        get_blob(&d, "fast.test", "fast/app", &small_d)
            .await
            .as_slice(),
        small.as_slice()
    );
    assert_eq!(
        get_blob(&d, "fast.test", "fast/app", &large_d)
            .await
            .as_slice(),
        large.as_slice()
    );

    let waiting = clients(&d, "slow.test", &digests, std::time::Duration::from_secs(6));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for _ in 0..3 {
        let limit = std::time::Duration::from_secs(5);
        let r = tokio::time::timeout(limit, get_blob(&d, "fast.test", "fast/app", &small_d)).await;
        assert_eq!(
            r.expect("a small cached blob stalled").as_slice(),
            small.as_slice()
        );
        let r = tokio::time::timeout(limit, get_blob(&d, "fast.test", "fast/app", &large_d)).await;
        assert_eq!(
            r.expect("a large cached blob stalled").as_slice(),
            large.as_slice()
        );
    }
    for c in waiting {
        let (status, _) = c.await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    d.stop().await;
}

async fn get_blob(d: &Daemon, ns: &str, repo: &str, digest: &str) -> Vec<u8> {
    let r = get(&d.url(&format!("/v2/{repo}/blobs/{digest}?ns={ns}"))).await;
    assert_eq!(r.status, StatusCode::OK);
    r.bytes().to_vec()
}

/// Fetch caps: beyond the namespace's slots a request waits `fetch_wait`,
/// then gets 503 with Retry-After; /readyz reports the saturation; when
/// the clients leave, the fetches nobody reads fall under min_rate and
/// stop, and the daemon is ready again with nothing left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_caps_refuse_with_retry_after_and_abandoned_trickles_stop() {
    let slow = Fake::start(Behaviour {
        chunk_delay: Some(std::time::Duration::from_secs(1)),
        ..Default::default()
    })
    .await;
    let digests = trickling(&slow, 30);
    let d = Daemon::builder()
        .hosts("slow.test", hosts_toml(&[], Some(&slow.url())))
        .upstream(UpstreamSettings {
            max_fetches: 10,
            max_fetches_per_namespace: 10,
            fetch_wait: std::time::Duration::from_millis(500),
            idle_timeout: std::time::Duration::from_secs(30),
            // Requests burst onto one in-process fake on 2 cores: an
            // upstream timeout would be a 503 without Retry-After.
            connect_timeout: std::time::Duration::from_secs(10),
            first_byte_timeout: std::time::Duration::from_secs(10),
            ..quick_upstream()
        })
        .start()
        .await;
    let waiting = clients(&d, "slow.test", &digests, std::time::Duration::from_secs(2));
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let ready = get(&d.url("/readyz")).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(ready.bytes()).contains("saturated"));
    let (mut ok, mut busy) = (0, 0);
    for c in waiting {
        match c.await.unwrap() {
            (StatusCode::OK, _) => ok += 1,
            (StatusCode::SERVICE_UNAVAILABLE, retry) => {
                assert!(retry.parse::<u64>().unwrap() >= 1, "Retry-After");
                busy += 1;
            }
            (other, _) => panic!("{other}"),
        }
    }
    assert_eq!((ok, busy), (10, 20));
    // Nobody reads them now: they stop within a few seconds.
    crate::support::wait_for(
        "abandoned fetches to stop",
        std::time::Duration::from_secs(20),
        || {
            let url = d.url("/readyz");
            async move { crate::support::answers_ok(&url).await }
        },
    )
    .await;
    crate::support::wait_until(
        "temp files to go",
        std::time::Duration::from_secs(10),
        || crate::support::temp_files(&d.cache_dir) == 0,
    )
    .await;
    d.stop().await;
}
