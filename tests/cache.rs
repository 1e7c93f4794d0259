//! The shared blob cache: deduplication across registries, verified
//! ingest, single-flight with followers on a growing file, client
//! disconnects, failed fetches, ranges, manifests and tags with TTL and
//! offline serving, and survival of `kill -9`.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use nodemirror::config::CacheSettings;
use sha2::Digest as _;

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::image::Image;
use crate::support::real::Binary;
use crate::support::{
    blob_path, get, http_client, request, stream_on, temp_files, test_cache, wait_until, Daemon,
};

/// A blob of `count` chunks of `size` bytes, seeded; its digest.
fn generated(size: usize, count: usize, seed: u8) -> (Bytes, String) {
    let chunk: Vec<u8> = (0..size)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let mut h = sha2::Sha256::new();
    for _ in 0..count {
        h.update(&chunk);
    }
    (
        Bytes::from(chunk),
        format!("sha256:{}", hex::encode(h.finalize())),
    )
}

/// [`stream_on`] on a client of its own (a connection of its own).
async fn stream(
    url: &str,
    range: Option<&str>,
    stop_after: Option<u64>,
) -> (StatusCode, Result<(u64, String), String>) {
    stream_on(&http_client(), url, range, stop_after).await
}

/// Clients finish once the digest is verified; the fsync and rename into
/// the store follow.
async fn wait_for_file(path: &std::path::Path) {
    wait_until(
        "the blob to be committed to the store",
        Duration::from_secs(20),
        || path.exists(),
    )
    .await;
}

/// A blob request that did not deliver a blob: the transfer broke, or the
/// daemon answered an error status at once (the fetch had already failed).
fn failed(status: StatusCode, r: &Result<(u64, String), String>) -> bool {
    r.is_err() || status != StatusCode::OK
}

fn blob_url(d: &Daemon, ns: &str, repo: &str, digest: &str) -> String {
    d.url(&format!("/v2/{repo}/blobs/{digest}?ns={ns}"))
}

#[tokio::test]
async fn a_blob_shared_by_two_registries_is_fetched_and_stored_once() {
    let a = Fake::start(Behaviour::default()).await;
    let b = Fake::start(Behaviour::default()).await;
    let img = Image::build(&[("shared", b"the same layer in two registries")]);
    a.push_image("team/app", "v1", &img);
    b.push_image("other/name", "latest", &img);
    let d = Daemon::builder()
        .hosts("a.test", hosts_toml(&[], Some(&a.url())))
        .hosts("b.test", hosts_toml(&[], Some(&b.url())))
        .start()
        .await;
    for (ns, repo, tag) in [
        ("a.test", "team/app", "v1"),
        ("b.test", "other/name", "latest"),
    ] {
        let r = get(&d.url(&format!("/v2/{repo}/manifests/{tag}?ns={ns}"))).await;
        assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
        for blob in img.blobs() {
            let r = get(&blob_url(&d, ns, repo, &crate::support::sha256(blob))).await;
            assert_eq!(r.bytes().as_ref(), blob.as_slice());
        }
    }
    assert_eq!(a.hits("/blobs/"), 2, "registry a served each blob once");
    assert_eq!(
        b.hits("/blobs/"),
        0,
        "registry b was never asked for a blob"
    );
    // Clients finish once the digest is verified; the commit follows.
    for blob in img.blobs() {
        wait_for_file(&d.blob_path(&crate::support::sha256(blob))).await;
    }
    let stats = nodemirror::cache::Store::open_beside(&d.cache_dir)
        .unwrap()
        .0
        .stats()
        .unwrap();
    assert_eq!(stats.blobs, 2, "one copy of each blob");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_upstream_fetch() {
    let (chunk, digest) = generated(256 << 10, 48, 1); // 12 MiB
    let up = Fake::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(15)),
        ..Default::default()
    })
    .await;
    up.put_repeated_blob("app", &digest, chunk, 48);
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    let url = blob_url(&d, "reg.test", "app", &digest);
    let mut clients = Vec::new();
    for i in 0..16u64 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            // Staggered: the later ones join a fetch well under way.
            tokio::time::sleep(Duration::from_millis(i * 30)).await;
            stream(&url, None, None).await
        }));
    }
    for c in clients {
        let (status, body) = c.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (12 << 20, digest.clone()));
    }
    assert_eq!(up.hits("/blobs/"), 1, "one upstream fetch for 16 clients");
    wait_for_file(&d.blob_path(&digest)).await;
    d.stop().await;
}

#[tokio::test]
async fn a_client_hanging_up_does_not_cancel_the_fetch() {
    let (chunk, digest) = generated(256 << 10, 16, 2);
    let up = Fake::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(20)),
        ..Default::default()
    })
    .await;
    up.put_repeated_blob("app", &digest, chunk, 16);
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    let url = blob_url(&d, "reg.test", "app", &digest);
    let (_, r) = stream(&url, None, Some(300 << 10)).await;
    assert!(r.is_err());
    let path = d.blob_path(&digest);
    wait_until(
        "the abandoned fetch to complete",
        Duration::from_secs(20),
        || path.exists(),
    )
    .await;
    let (_, r) = stream(&url, None, None).await;
    assert_eq!(r.unwrap(), (4 << 20, digest));
    assert_eq!(up.hits("/blobs/"), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_gives_every_follower_an_error_and_caches_nothing() {
    // Broken every time: each resumed request (Range ignored) stalls at
    // the same place, so the fetch fails.
    let up = Fake::start(Behaviour {
        stall_after: Some(200_000),
        ignore_range: true,
        ..Default::default()
    })
    .await;
    let blob = vec![9u8; 1_000_000];
    let digest = up.put_blob("app", &blob);
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    let url = blob_url(&d, "reg.test", "app", &digest);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { stream(&url, None, None).await })
        })
        .collect();
    for c in clients {
        let (status, r) = c.await.unwrap();
        assert!(
            failed(status, &r),
            "a broken fetch must not end like a complete one: {status} {r:?}"
        );
        assert!(
            !matches!(&r, Err(e) if e == "stalled"),
            "followers must get an error, not hang"
        );
    }
    assert!(!d.blob_path(&digest).exists());
    assert_eq!(
        temp_files(&d.cache_dir),
        0,
        "the partial download is removed"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_lying_endpoint_never_gets_into_the_cache() {
    let liar = Fake::start(Behaviour {
        lie: true,
        ..Default::default()
    })
    .await;
    let good = Fake::start(Behaviour::default()).await;
    let blob = vec![3u8; 700_000];
    let digest = liar.put_blob("app", &blob);
    good.put_blob("app", &blob);
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[liar.url()], Some(&good.url())))
        .start()
        .await;
    let url = blob_url(&d, "reg.test", "app", &digest);
    let (status, r) = stream(&url, None, None).await;
    assert!(
        failed(status, &r),
        "wrong bytes must not complete: {status} {r:?}"
    );
    assert!(!d.blob_path(&digest).exists());
    let (_, r) = stream(&url, None, None).await;
    assert_eq!(
        r.unwrap(),
        (700_000, digest.clone()),
        "next request: next endpoint"
    );
    wait_for_file(&d.blob_path(&digest)).await;
    assert_eq!(liar.hits("/blobs/"), 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_served_from_the_cache_and_from_a_fetch_in_flight() {
    const CHUNK: usize = 64 << 10;
    let (chunk, digest) = generated(CHUNK, 64, 3); // 4 MiB, slow
    let up = Fake::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(20)),
        ..Default::default()
    })
    .await;
    up.put_repeated_blob("app", &digest, chunk.clone(), 64);
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    let url = blob_url(&d, "reg.test", "app", &digest);
    let leader = {
        let url = url.clone();
        tokio::spawn(async move { stream(&url, None, None).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // In flight: the third chunk, exactly.
    let r = request(
        Method::GET,
        &url,
        &[("range", &format!("bytes={}-{}", 2 * CHUNK, 3 * CHUNK - 1))],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.header("content-range"),
        format!("bytes {}-{}/{}", 2 * CHUNK, 3 * CHUNK - 1, 64 * CHUNK)
    );
    assert_eq!(r.bytes().as_ref(), chunk.as_ref());
    assert!(
        !d.blob_path(&digest).exists(),
        "the range was served while in flight"
    );
    assert_eq!(leader.await.unwrap().1.unwrap().1, digest);

    // Cached: an open-ended range and a suffix.
    let r = request(
        Method::GET,
        &url,
        &[("range", &format!("bytes={}-", 63 * CHUNK + 10))],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().as_ref(), &chunk[10..]);
    let r = request(Method::GET, &url, &[("range", "bytes=-5")]).await;
    assert_eq!(r.bytes().as_ref(), &chunk[CHUNK - 5..]);
    let r = request(
        Method::GET,
        &url,
        &[("range", &format!("bytes={}-", 64 * CHUNK))],
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(up.hits("/blobs/"), 1);
    d.stop().await;
}

#[tokio::test]
async fn tags_are_trusted_for_the_ttl_then_revalidated_with_head() {
    let up = Fake::start(Behaviour::default()).await;
    let v1 = Image::build(&[("f", b"version one")]);
    up.push_image("app", "latest", &v1);

    // Within the TTL: no upstream request at all.
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    let url = d.url("/v2/app/manifests/latest?ns=reg.test");
    assert_eq!(get(&url).await.header("docker-content-digest"), v1.digest);
    let before = up.seen().len();
    assert_eq!(get(&url).await.header("docker-content-digest"), v1.digest);
    assert_eq!(up.seen().len(), before);
    d.stop().await;

    // TTL zero: each request revalidates with a HEAD, never a GET.
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .cache(CacheSettings {
            tag_ttl: Duration::ZERO,
            ..test_cache()
        })
        .start()
        .await;
    let url = d.url("/v2/app/manifests/latest?ns=reg.test");
    get(&url).await;
    let before = up.seen().len();
    let r = get(&url).await;
    assert_eq!(r.bytes().as_ref(), v1.manifest.as_slice());
    let after: Vec<Method> = up.seen()[before..]
        .iter()
        .map(|s| s.method.clone())
        .collect();
    assert_eq!(after, [Method::HEAD]);

    // The tag moves upstream: the new manifest is served.
    let v2 = Image::build(&[("f", b"version two")]);
    up.push_image("app", "latest", &v2);
    let r = get(&url).await;
    assert_eq!(r.header("docker-content-digest"), v2.digest);
    assert_eq!(r.bytes().as_ref(), v2.manifest.as_slice());
    d.stop().await;
}

#[tokio::test]
async fn a_warm_cache_serves_pulls_by_tag_with_every_upstream_down() {
    let up = Fake::start(Behaviour::default()).await;
    let img = Image::build(&[("f", b"offline layer")]);
    up.push_image("app", "v1", &img);
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .cache(CacheSettings {
            tag_ttl: Duration::ZERO,
            ..test_cache()
        })
        .start()
        .await;
    let murl = d.url("/v2/app/manifests/v1?ns=reg.test");
    get(&murl).await;
    for blob in img.blobs() {
        get(&blob_url(
            &d,
            "reg.test",
            "app",
            &crate::support::sha256(blob),
        ))
        .await;
    }

    up.set(|b| b.status = Some(StatusCode::SERVICE_UNAVAILABLE));
    let r = request(Method::HEAD, &murl, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    assert_eq!(r.header("content-type"), img.media_type);
    let r = get(&murl).await;
    assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    let r = get(&d.url(&format!("/v2/app/manifests/{}?ns=reg.test", img.digest))).await;
    assert_eq!(r.header("content-type"), img.media_type);
    for blob in img.blobs() {
        let r = get(&blob_url(
            &d,
            "reg.test",
            "app",
            &crate::support::sha256(blob),
        ))
        .await;
        assert_eq!(r.bytes().as_ref(), blob.as_slice());
    }

    // An upstream that answers "no such tag" is believed, not overridden.
    up.set(|b| b.status = Some(StatusCode::NOT_FOUND));
    assert_eq!(get(&murl).await.status, StatusCode::NOT_FOUND);
    d.stop().await;
}

#[tokio::test]
async fn the_cache_survives_a_restart() {
    let up = Fake::start(Behaviour::default()).await;
    let blob = vec![5u8; 100_000];
    let digest = up.put_blob("app", &blob);
    let cache = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let d = Daemon::builder()
            .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
            .cache_dir(cache.path())
            .start()
            .await;
        let r = get(&blob_url(&d, "reg.test", "app", &digest)).await;
        assert_eq!(r.bytes().as_ref(), blob.as_slice());
        d.stop().await;
    }
    assert_eq!(up.hits("/blobs/"), 1);
}

/// `kill -9` in the middle of an ingest: the partial file is never served
/// and is cleaned up at the next start; the blob is fetched again whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_download_leaves_nothing_servable() {
    let (chunk, digest) = generated(256 << 10, 32, 4); // 8 MiB, ~1.6 s
    let up = Fake::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(50)),
        ..Default::default()
    })
    .await;
    up.put_repeated_blob("app", &digest, chunk, 32);
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("reg.test", format!("server = \"{}\"\n", up.url()))],
    );
    let cache = tempfile::tempdir().unwrap();
    let mut bin = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;
    let url = format!(
        "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=reg.test",
        bin.port
    );
    let client = {
        let url = url.clone();
        tokio::spawn(async move { stream(&url, None, None).await })
    };
    let partial = || {
        std::fs::read_dir(cache.path().join("tmp"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
            })
            .unwrap_or(false)
    };
    wait_until("a partial download", Duration::from_secs(10), partial).await;
    bin.proc.child.kill().unwrap(); // SIGKILL
    bin.proc.child.wait().unwrap();
    assert!(
        client.await.unwrap().1.is_err(),
        "the client saw the transfer break"
    );
    assert!(!blob_path(cache.path(), &digest).exists());
    assert!(
        temp_files(cache.path()) > 0,
        "the partial file is still there"
    );

    let bin = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;
    assert_eq!(temp_files(cache.path()), 0, "cleaned at start");
    let url = format!(
        "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=reg.test",
        bin.port
    );
    let (status, r) = stream(&url, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r.unwrap(), (8 << 20, digest.clone()));
    wait_for_file(&blob_path(cache.path(), &digest)).await;
}

/// A blob whose connection breaks mid-way is resumed with Range where it
/// stopped: on the next endpoint, on the same one when it is the only one,
/// or, from an endpoint that ignores Range, by skipping what arrived. The
/// client sees one uninterrupted, verified body; the blob is cached.
#[tokio::test]
async fn a_broken_blob_transfer_resumes_where_it_stopped() {
    let blob = |seed: u32| -> Vec<u8> {
        (0..1_000_000u32)
            .map(|i| ((i + seed) % 241) as u8)
            .collect()
    };
    let breaking = || Behaviour {
        truncate_after: Some(300_000),
        truncate_times: Some(1),
        ..Default::default()
    };
    // The next endpoint takes over.
    let (a, b) = (
        Fake::start(breaking()).await,
        Fake::start(Behaviour::default()).await,
    );
    let two = blob(1);
    a.put_blob("app", &two);
    b.put_blob("app", &two);
    // The same endpoint, the only one, resumes.
    let only = Fake::start(breaking()).await;
    let one = blob(2);
    only.put_blob("app", &one);
    // An endpoint that ignores Range sends it all again.
    let whole = Fake::start(Behaviour {
        ignore_range: true,
        ..breaking()
    })
    .await;
    let again = blob(3);
    whole.put_blob("app", &again);
    let d = Daemon::builder()
        .hosts("two.test", hosts_toml(&[a.url()], Some(&b.url())))
        .hosts("one.test", hosts_toml(&[], Some(&only.url())))
        .hosts("whole.test", hosts_toml(&[], Some(&whole.url())))
        .start()
        .await;
    // Each asked for a bounded range (the blob's first MiBs, all of it);
    // the resume asks for the rest of that range, or, from an endpoint
    // that answered with the whole blob, the rest of the blob.
    for (ns, content, resumed_at, resume) in [
        ("two.test", &two, &b, "bytes=300000-999999"),
        ("one.test", &one, &only, "bytes=300000-999999"),
        ("whole.test", &again, &whole, "bytes=300000-"),
    ] {
        let digest = crate::support::sha256(content);
        let (status, body) = stream(&blob_url(&d, ns, "app", &digest), None, None).await;
        assert_eq!(status, StatusCode::OK, "{ns}");
        assert_eq!(
            body.unwrap(),
            (content.len() as u64, digest.clone()),
            "{ns}"
        );
        let ranged: Vec<String> = resumed_at
            .seen()
            .iter()
            .filter_map(|s| {
                s.headers
                    .get("range")
                    .map(|v| v.to_str().unwrap().to_string())
            })
            .filter(|r| !r.starts_with("bytes=0-"))
            .collect();
        assert_eq!(ranged, [resume], "{ns}");
        wait_for_file(&d.blob_path(&digest)).await;
    }
    assert_eq!(a.hits("/blobs/"), 1);
    let metrics = get(&d.url("/metrics")).await;
    let text = String::from_utf8_lossy(metrics.bytes()).to_string();
    // Metrics are the process's: other tests' endpoints show there too.
    let ours = [&b, &only, &whole].map(|f| format!("{}/", f.url()));
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("nodemirror_upstream_resumes_total{")
                && ours.iter().any(|u| l.contains(u.as_str())))
            .count(),
        3,
        "{text}"
    );
    d.stop().await;
}
