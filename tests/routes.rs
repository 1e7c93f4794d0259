//! Routes: a fetch belongs to the namespace that started it. Another
//! namespace's client may follow it only while it keeps a healthy pace,
//! never gets its unverified bytes as a complete range, and never a
//! complete wrong blob: one namespace cannot capture, slow or poison
//! another's pull of the same digest.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::{http_client, noise, stream_on, wait_until, Daemon};

/// A node with `hostile.test` on `hostile` and `good.test` on `good`.
async fn two_routes(hostile: &Fake, good: &Fake) -> Daemon {
    Daemon::builder()
        .hosts("hostile.test", hosts_toml(&[], Some(&hostile.url())))
        .hosts("good.test", hosts_toml(&[], Some(&good.url())))
        .start()
        .await
}

/// A registry that trickles blobs at 40 KiB/s: above `min_rate`, so
/// nothing cuts it, and a 2 MiB blob takes about 50 s.
async fn trickling() -> Fake {
    Fake::trickling(40 << 10).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_namespace_cannot_hold_another_namespaces_pull() {
    let (hostile, good) = (trickling().await, Fake::start(Behaviour::default()).await);
    let blob = noise(2 << 20, 70);
    let digest = hostile.put_blob("app", &blob);
    good.put_blob("app", &blob);
    let d = two_routes(&hostile, &good).await;
    let url = |ns: &str| d.url(&format!("/v2/app/blobs/{digest}?ns={ns}"));
    // A client pulls through the hostile namespace and keeps reading.
    let client = http_client();
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), url("hostile.test"));
        async move { stream_on(&client, &url, None, None).await }
    });
    wait_until("the trickle to start", Duration::from_secs(10), || {
        hostile.hits(&format!("/blobs/{digest}")) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Another namespace's client gets the blob from its own registry,
    // while the trickle is still far from done.
    let began = Instant::now();
    let (status, body) = stream_on(&client, &url("good.test"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (blob.len() as u64, digest.clone()));
    assert_eq!(good.blob_bytes_of(&digest), blob.len() as u64);
    assert!(
        !slow.is_finished(),
        "the trickle ended first: no capture to show"
    );
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "held {:?} behind the trickle",
        began.elapsed()
    );
    // Its copy is stored.
    let path = d.blob_path(&digest);
    wait_until("the good copy stored", Duration::from_secs(10), || {
        path.exists()
    })
    .await;
    slow.abort();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_never_gets_another_namespaces_unverified_bytes() {
    // The hostile registry flips the first byte of what it sends, slowly.
    let hostile = Fake::start(Behaviour {
        rate: Some(40 << 10),
        lie: true,
        ..Behaviour::default()
    })
    .await;
    let good = Fake::start(Behaviour::default()).await;
    let d = two_routes(&hostile, &good).await;
    let client = http_client();
    // A bounded range, and a range to the end of which the client reads
    // the start and hangs up (as containerd's parallel fetch reads a
    // chunk): each while the hostile namespace's fetch is under way.
    for (seed, range) in [(71, "bytes=0-99"), (72, "bytes=0-")] {
        let blob = noise(2 << 20, seed);
        let digest = hostile.put_blob("app", &blob);
        good.put_blob("app", &blob);
        let url = |ns: &str| d.url(&format!("/v2/app/blobs/{digest}?ns={ns}"));
        let slow = tokio::spawn({
            let (client, url) = (client.clone(), url("hostile.test"));
            async move { stream_on(&client, &url, None, None).await }
        });
        wait_until("the lie to start", Duration::from_secs(10), || {
            hostile.hits(&format!("/blobs/{digest}")) > 0
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The first 100 bytes through the good namespace: the good
        // registry's, never the hostile's unverified ones.
        let (status, start) = first_bytes(&url("good.test"), range, 100).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(start, blob[..100], "{range}");
        // The hostile namespace itself still reads its own fetch's bytes
        // as they come (the same trust as asking its registry directly).
        let (status, start) = first_bytes(&url("hostile.test"), range, 100).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        let mut lied = blob[..100].to_vec();
        lied[0] ^= 0xff;
        assert_eq!(start, lied, "{range}");
        slow.abort();
    }
    d.stop().await;
}

/// The first `n` bytes of a ranged GET (then the client hangs up).
async fn first_bytes(url: &str, range: &str, n: usize) -> (StatusCode, Vec<u8>) {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .header("range", range)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), http_client().request(req))
        .await
        .expect("headers within 30 s")
        .unwrap();
    let status = resp.status();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while got.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("bytes within 30 s");
        match frame {
            Some(Ok(f)) => got.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            _ => break,
        }
    }
    got.truncate(n);
    (status, got)
}

/// A client of another namespace that followed a lying fetch for a while
/// never gets the wrong bytes as a complete blob: when that fetch fails,
/// its own namespace's copy finishes the body only if the bytes already
/// sent agree with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_that_followed_a_lie_never_completes_wrong() {
    let hostile = Fake::start(Behaviour {
        lie: true,
        rate: Some(4 << 20),
        ..Behaviour::default()
    })
    .await;
    let good = Fake::start(Behaviour::default()).await;
    let blob = noise(4 << 20, 72);
    let digest = hostile.put_blob("app", &blob);
    good.put_blob("app", &blob);
    let d = two_routes(&hostile, &good).await;
    let url = |ns: &str| d.url(&format!("/v2/app/blobs/{digest}?ns={ns}"));
    let client = http_client();
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url("hostile.test"));
        async move { stream_on(&client, &url, None, None).await }
    });
    wait_until("the lie to start", Duration::from_secs(10), || {
        hostile.hits(&format!("/blobs/{digest}")) > 0
    })
    .await;
    let (status, body) = stream_on(&client, &url("good.test"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    match body {
        Ok(got) => assert_eq!(got, (blob.len() as u64, digest.clone())),
        Err(e) => assert!(!e.is_empty()),
    }
    let (_, lied) = first.await.unwrap();
    assert!(lied.is_err(), "a lie came through whole");
    // Asked again, the good namespace's copy is stored and right.
    let (status, body) = stream_on(&client, &url("good.test"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (blob.len() as u64, digest.clone()));
    d.stop().await;
}
