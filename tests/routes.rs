//! Routes: a fetch belongs to the namespace that started it. Another
//! namespace's client may follow it only while it keeps a healthy pace,
//! never gets its unverified bytes as a complete range, and never a
//! complete wrong blob: one namespace cannot capture, slow or poison
//! another's pull of the same digest.

use std::time::{Duration, Instant};

use http::StatusCode;

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::{http_client, noise, sha256, stream_on, wait_until, Daemon};

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
    Fake::start(Behaviour {
        rate: Some(40 << 10),
        ..Behaviour::default()
    })
    .await
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
    assert_eq!(good.hits(&format!("/blobs/{digest}")), 1);
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
    // The hostile registry flips the first byte, slowly.
    let hostile = Fake::start(Behaviour {
        rate: Some(40 << 10),
        lie: true,
        ..Behaviour::default()
    })
    .await;
    let good = Fake::start(Behaviour::default()).await;
    let blob = noise(2 << 20, 71);
    let digest = hostile.put_blob("app", &blob);
    good.put_blob("app", &blob);
    let d = two_routes(&hostile, &good).await;
    let url = |ns: &str| d.url(&format!("/v2/app/blobs/{digest}?ns={ns}"));
    let client = http_client();
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), url("hostile.test"));
        async move { stream_on(&client, &url, None, None).await }
    });
    wait_until("the lie to start", Duration::from_secs(10), || {
        hostile.hits(&format!("/blobs/{digest}")) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The first 100 bytes through the good namespace: the good registry's.
    let (status, body) = stream_on(&client, &url("good.test"), Some("bytes=0-99"), None).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(body.unwrap(), (100, sha256(&blob[..100])));
    // The same namespace still reads its own fetch's bytes as they come
    // (same trust as asking its registry directly).
    let (status, body) = stream_on(&client, &url("hostile.test"), Some("bytes=0-99"), None).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    let mut lied = blob[..100].to_vec();
    lied[0] ^= 0xff;
    assert_eq!(body.unwrap(), (100, sha256(&lied)));
    slow.abort();
    d.stop().await;
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
