//! The pull API against in-process fake registries: routing by ?ns=,
//! headers, fallback on every kind of failure, auth, redirects, lying
//! upstreams, ranges.

use http::{Method, StatusCode};

use crate::support::fake::{Behaviour, Fake};
use crate::support::image::{Image, OCI_MANIFEST};
use crate::support::{free_port, get, request, try_request, Daemon};

/// A hosts.toml with `mirrors` in order, then `server`.
pub fn hosts_toml(mirrors: &[String], server: Option<&str>) -> String {
    let mut t = String::new();
    if let Some(s) = server {
        t.push_str(&format!("server = \"{s}\"\n"));
    }
    for m in mirrors {
        t.push_str(&format!(
            "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    t
}

fn small_image() -> Image {
    Image::build(&[("hello.txt", b"hello from a layer")])
}

async fn daemon_for(ns: &str, mirrors: &[String], server: Option<&str>) -> Daemon {
    Daemon::builder()
        .hosts(ns, hosts_toml(mirrors, server))
        .start()
        .await
}

#[tokio::test]
async fn base_endpoint_and_oci_errors() {
    let d = Daemon::builder().start().await;
    let r = get(&d.url("/v2/")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-distribution-api-version"), "registry/2.0");

    let r = request(Method::PUT, &d.url("/v2/a/manifests/latest"), &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error_code(), "UNSUPPORTED");
    assert_eq!(r.header("allow"), "GET, HEAD");
    let r = request(Method::POST, &d.url("/v2/a/blobs/uploads/"), &[]).await;
    assert_eq!(r.error_code(), "UNSUPPORTED");

    for (path, status, code) in [
        ("/v2/UPPER/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/a/manifests/sha256:nothex", 400, "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/a/manifests/-bad", 400, "TAG_INVALID"),
        ("/v2/a/manifests/latest?ns=bad/ns", 400, "NAME_INVALID"),
        ("/v2/a/tags", 404, "UNSUPPORTED"),
    ] {
        let r = get(&d.url(path)).await;
        assert_eq!(r.status.as_u16(), status, "{path}");
        assert_eq!(r.header("content-type"), "application/json", "{path}");
        assert_eq!(r.error_code(), code, "{path}");
    }
    d.stop().await;
}

#[tokio::test]
async fn serves_manifests_and_blobs_with_the_headers_containerd_needs() {
    let up = Fake::start(Behaviour::default()).await;
    let img = small_image();
    up.push_image("team/app", "v1", &img);
    let d = daemon_for("reg.test", &[], Some(&up.url())).await;

    let url = d.url("/v2/team/app/manifests/v1?ns=reg.test");
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let r = request(
        Method::HEAD,
        &url,
        &[("accept", accept), ("accept-encoding", "gzip, zstd")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    assert_eq!(r.header("content-type"), OCI_MANIFEST);
    assert_eq!(r.header("content-length"), img.manifest.len().to_string());
    assert!(r.bytes().is_empty());

    let r = request(
        Method::GET,
        &url,
        &[("accept", accept), ("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    assert_eq!(r.header("docker-content-digest"), img.digest);

    let layer = &img.layers[0];
    let digest = crate::support::sha256(layer);
    let burl = d.url(&format!("/v2/team/app/blobs/{digest}?ns=reg.test"));
    let r = request(Method::HEAD, &burl, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-length"), layer.len().to_string());
    assert_eq!(r.header("docker-content-digest"), digest);
    assert_eq!(r.header("accept-ranges"), "bytes");
    let r = request(Method::GET, &burl, &[("accept-encoding", "zstd")]).await;
    assert_eq!(r.bytes().as_ref(), layer.as_slice());

    // What reached the upstream: Accept passed on, Accept-Encoding not,
    // and no ?ns= for a server.
    let seen = up.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        assert!(s.headers.get("accept-encoding").is_none(), "{s:?}");
        assert!(!s.uri.contains("ns="), "server got ?ns=: {}", s.uri);
    }
    assert!(seen
        .iter()
        .filter(|s| s.uri.contains("/manifests/"))
        .all(|s| s.headers.get("accept").is_some_and(|v| v == accept)));
    d.stop().await;
}

#[tokio::test]
async fn mirrors_get_ns_the_server_does_not_and_404_falls_through() {
    let mirror = Fake::start(Behaviour::default()).await; // empty: 404 for all
    let server = Fake::start(Behaviour::default()).await;
    let img = small_image();
    server.push_image("app", "v1", &img);
    let d = daemon_for("reg.test:5000", &[mirror.url()], Some(&server.url())).await;

    let r = get(&d.url("/v2/app/manifests/v1?ns=reg.test:5000")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    let m = mirror.seen();
    assert_eq!(m.len(), 1);
    assert!(
        m[0].uri
            .ends_with("/v2/app/manifests/v1?ns=reg.test%3A5000"),
        "{}",
        m[0].uri
    );
    assert!(server.seen().iter().all(|s| !s.uri.contains("ns=")));

    // A 404 is an answer, not a failure: the mirror is asked again.
    let blob = crate::support::sha256(&img.config);
    let r = get(&d.url(&format!("/v2/app/blobs/{blob}?ns=reg.test:5000"))).await;
    assert_eq!(r.bytes().as_ref(), img.config.as_slice());
    assert_eq!(mirror.seen().len(), 2);
    d.stop().await;
}

#[tokio::test]
async fn falls_back_past_refused_5xx_429_and_hanging_endpoints() {
    let dead = format!("http://127.0.0.1:{}", free_port());
    let e500 = Fake::start(Behaviour {
        status: Some(StatusCode::INTERNAL_SERVER_ERROR),
        ..Default::default()
    })
    .await;
    let e429 = Fake::start(Behaviour {
        status: Some(StatusCode::TOO_MANY_REQUESTS),
        ..Default::default()
    })
    .await;
    let hang = Fake::start(Behaviour {
        hang: true,
        ..Default::default()
    })
    .await;
    let good = Fake::start(Behaviour::default()).await;
    let img = small_image();
    good.push_image("app", "v1", &img);
    let mirrors = [dead, e500.url(), e429.url(), hang.url()];
    let d = daemon_for("reg.test", &mirrors, Some(&good.url())).await;

    let r = get(&d.url("/v2/app/manifests/v1?ns=reg.test")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    for f in [&e500, &e429, &hang] {
        assert_eq!(f.seen().len(), 1, "each failing endpoint tried once");
    }

    // They are now backing off: the next request goes straight to `good`.
    let blob = crate::support::sha256(&img.config);
    let r = get(&d.url(&format!("/v2/app/blobs/{blob}?ns=reg.test"))).await;
    assert_eq!(r.bytes().as_ref(), img.config.as_slice());
    for f in [&e500, &e429, &hang] {
        assert_eq!(f.seen().len(), 1, "backing-off endpoint was skipped");
    }
    d.stop().await;
}

#[tokio::test]
async fn backing_off_endpoints_are_still_a_last_resort() {
    let only = Fake::start(Behaviour {
        status: Some(StatusCode::BAD_GATEWAY),
        ..Default::default()
    })
    .await;
    let img = small_image();
    only.push_image("app", "v1", &img);
    let d = daemon_for("reg.test", &[], Some(&only.url())).await;
    let url = d.url("/v2/app/manifests/v1?ns=reg.test");
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.error_code(), "UNAVAILABLE");
    // Recovered while backing off: noticed at once, not after the period.
    only.set(|b| b.status = None);
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK);
    d.stop().await;
}

#[tokio::test]
async fn not_found_everywhere_is_a_404_with_an_oci_code() {
    let a = Fake::start(Behaviour::default()).await;
    let b = Fake::start(Behaviour::default()).await;
    let d = daemon_for("reg.test", &[a.url()], Some(&b.url())).await;
    let r = get(&d.url("/v2/app/manifests/nope?ns=reg.test")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
    let digest = crate::support::sha256(b"absent");
    let r = get(&d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "BLOB_UNKNOWN");
    let r = request(
        Method::HEAD,
        &d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    d.stop().await;
}

#[tokio::test]
async fn requests_without_ns_use_the_default_namespace() {
    let up = Fake::start(Behaviour::default()).await;
    let img = small_image();
    up.push_image("library/busybox", "latest", &img);
    let d = daemon_for("docker.io", &[], Some(&up.url())).await;
    let r = get(&d.url("/v2/library/busybox/manifests/latest")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    d.stop().await;
}

#[tokio::test]
async fn default_hosts_apply_to_namespaces_without_a_folder() {
    let mirror = Fake::start(Behaviour::default()).await;
    let img = small_image();
    mirror.push_image("app", "v1", &img);
    let d = Daemon::builder()
        .hosts("_default", hosts_toml(&[mirror.url()], None))
        .start()
        .await;
    let r = get(&d.url("/v2/app/manifests/v1?ns=unconfigured.test")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(mirror.seen()[0].uri.contains("ns=unconfigured.test"));
    d.stop().await;
}

#[tokio::test]
async fn anonymous_bearer_tokens_are_fetched_once_and_cached() {
    let up = Fake::start(Behaviour {
        bearer: Some(None),
        ..Default::default()
    })
    .await;
    let img = small_image();
    up.push_image("app", "v1", &img);
    let d = daemon_for("reg.test", &[], Some(&up.url())).await;
    let r = get(&d.url("/v2/app/manifests/v1?ns=reg.test")).await;
    assert_eq!(r.status, StatusCode::OK);
    for blob in img.blobs() {
        let digest = crate::support::sha256(blob);
        let r = get(&d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"))).await;
        assert_eq!(r.bytes().as_ref(), blob.as_slice());
    }
    assert_eq!(up.hits("/token"), 1, "token cached across requests");
    let token_req = up
        .seen()
        .into_iter()
        .find(|s| s.uri.starts_with("/token"))
        .unwrap();
    assert!(
        token_req.uri.contains("scope=repository%3Aapp%3Apull"),
        "{}",
        token_req.uri
    );
    assert!(token_req.uri.contains("service=fake"));
    assert!(token_req.headers.get("authorization").is_none());
    d.stop().await;
}

#[tokio::test]
async fn bearer_and_basic_credentials_come_from_the_auth_file() {
    let creds = ("robot".to_string(), "s3cret".to_string());
    let bearer = Fake::start(Behaviour {
        bearer: Some(Some(creds.clone())),
        ..Default::default()
    })
    .await;
    let basic = Fake::start(Behaviour {
        basic: Some(creds.clone()),
        ..Default::default()
    })
    .await;
    let img = small_image();
    bearer.push_image("app", "v1", &img);
    basic.push_image("app", "v1", &img);

    // Without credentials both refuse: the client sees a 404.
    let d = Daemon::builder()
        .hosts("bearer.test", hosts_toml(&[], Some(&bearer.url())))
        .hosts("basic.test", hosts_toml(&[], Some(&basic.url())))
        .start()
        .await;
    for ns in ["bearer.test", "basic.test"] {
        let r = get(&d.url(&format!("/v2/app/manifests/v1?ns={ns}"))).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{ns}");
    }
    d.stop().await;

    let auth = format!(
        r#"{{"auths": {{"{}": {{"username": "robot", "password": "s3cret"}},
                       "http://{}": {{"auth": "cm9ib3Q6czNjcmV0"}}}}}}"#,
        bearer.addr, basic.addr
    );
    let d = Daemon::builder()
        .hosts("bearer.test", hosts_toml(&[], Some(&bearer.url())))
        .hosts("basic.test", hosts_toml(&[], Some(&basic.url())))
        .auth(auth)
        .start()
        .await;
    for ns in ["bearer.test", "basic.test"] {
        let r = get(&d.url(&format!("/v2/app/manifests/v1?ns={ns}"))).await;
        assert_eq!(r.status, StatusCode::OK, "{ns}");
        assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    }
    d.stop().await;
}

#[tokio::test]
async fn blob_redirects_are_followed_without_authorization() {
    let storage = Fake::start(Behaviour::default()).await;
    let registry = Fake::start(Behaviour {
        bearer: Some(None),
        redirect_blobs: Some(storage.url()),
        ..Default::default()
    })
    .await;
    let blob = vec![7u8; 300_000];
    let digest = storage.put_blob("app", &blob);
    let d = daemon_for("reg.test", &[], Some(&registry.url())).await;
    let r = get(&d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes().as_ref(), blob.as_slice());
    let r = request(
        Method::HEAD,
        &d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test")),
        &[],
    )
    .await;
    assert_eq!(r.header("content-length"), blob.len().to_string());
    let at_storage = storage.seen();
    assert_eq!(at_storage.len(), 1, "HEAD answered from the cache");
    for s in at_storage {
        assert!(
            s.headers.get("authorization").is_none(),
            "token leaked to storage"
        );
    }
    assert!(registry.seen().iter().any(|s| s
        .headers
        .get("authorization")
        .is_some_and(|v| v == "Bearer fake-token")));
    d.stop().await;
}

#[tokio::test]
async fn a_lying_endpoint_falls_back_for_manifests_and_is_cut_off_for_blobs() {
    let liar = Fake::start(Behaviour {
        lie: true,
        ..Default::default()
    })
    .await;
    let good = Fake::start(Behaviour::default()).await;
    let img = small_image();
    liar.push_image("app", "v1", &img);
    good.push_image("app", "v1", &img);
    let d = daemon_for("reg.test", &[liar.url()], Some(&good.url())).await;

    // Manifest by digest: verified before sending, so the liar is skipped.
    let r = get(&d.url(&format!("/v2/app/manifests/{}?ns=reg.test", img.digest))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    assert_eq!(liar.hits("/manifests/"), 1);

    // The liar backs off now; make it the only healthy-looking choice again
    // with a fresh daemon, and check a lying blob never completes.
    d.stop().await;
    let d = daemon_for("reg.test", &[liar.url()], Some(&good.url())).await;
    let layer = &img.layers[0];
    let digest = crate::support::sha256(layer);
    let url = d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
    // The connection drops, the body is cut short, or (when the fetch had
    // already failed before the handler looked) a quick 503: never a 200
    // whose body completes.
    match try_request(Method::GET, &url, &[]).await {
        Err(_) => {}
        Ok(r) if r.status == StatusCode::OK => {
            assert!(r.body.is_err(), "wrong bytes arrived as a complete blob")
        }
        Ok(r) => assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE),
    }
    // Marked bad: the next request goes to the honest server.
    let r = get(&url).await;
    assert_eq!(r.bytes().as_ref(), layer.as_slice());
    assert_eq!(liar.hits("/blobs/"), 1);
    d.stop().await;
}

#[tokio::test]
async fn a_stalled_body_is_cut_after_the_idle_timeout() {
    // Stalls on every request (a resume gets the whole blob again and
    // stalls at the same place): the transfer ends in an error.
    let staller = Fake::start(Behaviour {
        stall_after: Some(100),
        ignore_range: true,
        ..Default::default()
    })
    .await;
    let blob = vec![1u8; 50_000];
    let digest = staller.put_blob("app", &blob);
    let d = daemon_for("reg.test", &[], Some(&staller.url())).await;
    let r = get(&d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body.is_err(),
        "a stalled transfer must end in an error, not hang or EOF"
    );
    d.stop().await;
}

#[tokio::test]
async fn range_requests_are_answered_206() {
    let up = Fake::start(Behaviour::default()).await;
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let digest = up.put_blob("app", &blob);
    let d = daemon_for("reg.test", &[], Some(&up.url())).await;
    let url = d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
    let r = request(Method::GET, &url, &[("range", "bytes=10-19")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.header("content-range"), "bytes 10-19/100000");
    assert_eq!(r.bytes().as_ref(), &blob[10..20]);
    let r = request(Method::GET, &url, &[("range", "bytes=99990-")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().as_ref(), &blob[99990..]);
    d.stop().await;
}

#[tokio::test]
async fn head_without_digest_header_is_measured_with_get() {
    let up = Fake::start(Behaviour {
        no_head_digest: true,
        ..Default::default()
    })
    .await;
    let img = small_image();
    up.push_image("app", "v1", &img);
    let d = daemon_for("reg.test", &[], Some(&up.url())).await;
    let r = request(
        Method::HEAD,
        &d.url("/v2/app/manifests/v1?ns=reg.test"),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    assert_eq!(r.header("content-length"), img.manifest.len().to_string());
    let methods: Vec<Method> = up.seen().into_iter().map(|s| s.method).collect();
    assert_eq!(methods, [Method::HEAD, Method::GET]);
    d.stop().await;
}

#[tokio::test]
async fn capabilities_pick_endpoints_for_tags_and_digests() {
    // The mirror may only pull by digest; tags must be resolved elsewhere.
    let pull_only = Fake::start(Behaviour::default()).await;
    let server = Fake::start(Behaviour::default()).await;
    let img = small_image();
    pull_only.push_image("app", "v1", &img);
    server.push_image("app", "v1", &img);
    let toml = format!(
        "server = \"{}\"\n[host.\"{}\"]\n  capabilities = [\"pull\"]\n",
        server.url(),
        pull_only.url()
    );
    let d = Daemon::builder().hosts("reg.test", toml).start().await;
    let r = get(&d.url(&format!("/v2/app/manifests/{}?ns=reg.test", img.digest))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        pull_only.seen().len(),
        1,
        "by digest: the pull mirror first"
    );
    assert_eq!(server.seen().len(), 0);
    let r = request(
        Method::HEAD,
        &d.url("/v2/app/manifests/v1?ns=reg.test"),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        pull_only.seen().len(),
        1,
        "tags resolved only on resolve-capable hosts"
    );
    assert_eq!(server.seen().len(), 1);
    d.stop().await;
}

#[tokio::test]
async fn configured_headers_are_sent_to_their_endpoint() {
    let up = Fake::start(Behaviour::default()).await;
    let img = small_image();
    up.push_image("app", "v1", &img);
    let toml = format!(
        "[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  [host.\"{}\".header]\n    x-mirror-token = \"abc\"\n",
        up.url(),
        up.url()
    );
    let d = Daemon::builder().hosts("reg.test", toml).start().await;
    let r = get(&d.url("/v2/app/manifests/v1?ns=reg.test")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(up.seen()[0]
        .headers
        .get("x-mirror-token")
        .is_some_and(|v| v == "abc"));
    d.stop().await;
}

/// hosts.d pointing a namespace back at the daemon itself is cut at once
/// (the daemon recognises its own Via), and the next endpoint serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosts_d_loop_back_to_this_daemon_is_cut_at_once() {
    let up = Fake::start(Behaviour::default()).await;
    let img = small_image();
    up.push_image("app", "v1", &img);
    let hosts = tempfile::tempdir().unwrap();
    let bin = crate::support::real::Binary::start(hosts.path(), &[]).await;
    let own = format!("http://127.0.0.1:{}", bin.port);
    // The first endpoint is this very daemon; the server is real.
    crate::support::write_hosts(
        hosts.path(),
        &[(
            "reg.test",
            format!("server = \"{}\"\n[host.\"{own}\"]\n", up.url()),
        )],
    );
    let url = format!("{own}/v2/app/manifests/v1?ns=reg.test");
    crate::support::wait_until(
        "the looping hosts.toml to apply",
        std::time::Duration::from_secs(10),
        || bin.proc.log_text().contains("configuration reloaded"),
    )
    .await;
    let started = std::time::Instant::now();
    let r = get(&url).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the loop is skipped and the server answers"
    );
    assert_eq!(r.header("docker-content-digest"), img.digest);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "no recursion until timeouts"
    );
    let log = bin.proc.log_text();
    assert!(log.contains("request loop"), "{log}");
    let served = log
        .lines()
        .filter(|l| l.contains("path=/v2/app/manifests/v1") && l.contains(" served "))
        .count();
    assert_eq!(served, 2, "one outer request, one looped request: {log}");
}

/// Every endpoint answering 429: the client gets 429 with the upstream's
/// Retry-After and error body, and the endpoints are not asked again
/// before Retry-After has passed (containerd retries a 429 five times at
/// once: those retries are answered from the daemon's throttle state).
#[tokio::test]
async fn every_endpoint_throttled_is_a_429_with_retry_after_and_no_new_asks() {
    let throttled = || Behaviour {
        status: Some(StatusCode::TOO_MANY_REQUESTS),
        retry_after: Some("30".into()),
        ..Default::default()
    };
    let (a, b) = (
        Fake::start(throttled()).await,
        Fake::start(throttled()).await,
    );
    let img = small_image();
    a.push_image("app", "v1", &img);
    b.push_image("app", "v1", &img);
    let d = daemon_for("reg.test", &[a.url()], Some(&b.url())).await;
    let blob = crate::support::sha256(&img.config);
    for path in [
        "/v2/app/manifests/v1?ns=reg.test".to_string(),
        format!("/v2/app/blobs/{blob}?ns=reg.test"),
    ] {
        for _ in 0..5 {
            let r = get(&d.url(&path)).await;
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{path}");
            let secs: u64 = r.header("retry-after").parse().unwrap();
            assert!((25..=30).contains(&secs), "{secs}");
            assert_eq!(r.error_code(), "FAKE", "the upstream's own error body");
        }
    }
    assert_eq!(
        a.seen().len(),
        1,
        "asked once, then left alone until Retry-After"
    );
    assert_eq!(b.seen().len(), 1);
    d.stop().await;
}
