//! What callers and upstreams send can neither panic a task, wedge a
//! digest, nor grow the daemon's state without bound: token answers are
//! bounded in size and lifetime, a fetch's end is guaranteed whatever
//! ends it, and metric labels exist only for what the operator
//! configured.

use std::time::Duration;

use http::StatusCode;
use nodemirror::config::{ImplicitPolicy, UpstreamSettings};

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::{get, http_client, noise, quick_upstream, stream_on, wait_until, Daemon};

/// A registry behind a Bearer token service that answers `token_body`.
async fn behind_token(token_body: String) -> Fake {
    Fake::start(Behaviour {
        bearer: Some(None),
        token_body: Some(token_body),
        ..Behaviour::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_token_answer_wedges_nothing() {
    let blob = noise(300_000, 80);
    // A lifetime near u64::MAX seconds (it used to overflow the clock and
    // panic the fetch task), and a token of 20 KiB.
    let forever =
        behind_token(r#"{"token":"fake-token","expires_in":18446744073709551615}"#.to_string())
            .await;
    let huge = behind_token(format!(
        r#"{{"token":"{}","expires_in":300}}"#,
        "x".repeat(20 << 10)
    ))
    .await;
    let sane = Fake::start(Behaviour::default()).await;
    let digest = forever.put_blob("app", &blob);
    huge.put_blob("app", &blob);
    sane.put_blob("app", &blob);
    let d = Daemon::builder()
        .hosts("forever.test", hosts_toml(&[], Some(&forever.url())))
        .hosts("huge.test", hosts_toml(&[], Some(&huge.url())))
        .hosts("sane.test", hosts_toml(&[], Some(&sane.url())))
        .start()
        .await;
    let client = http_client();
    let url = |ns: &str| d.url(&format!("/v2/app/blobs/{digest}?ns={ns}"));
    // The lifetime is capped: the pull works, and so does the next one.
    for _ in 0..2 {
        let (status, body) = stream_on(&client, &url("forever.test"), None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (blob.len() as u64, digest.clone()));
        let path = d.blob_path(&digest);
        wait_until("the blob stored", Duration::from_secs(10), || path.exists()).await;
        std::fs::remove_file(&path).unwrap();
    }
    // An oversized token is refused: a quick error, no blob from there.
    let (status, _) = stream_on(&client, &url("huge.test"), None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        huge.hits(&format!("/blobs/{digest}")),
        1,
        "asked once, no token sent"
    );
    // The same digest through a sane namespace, right away.
    let (status, body) = stream_on(&client, &url("sane.test"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (blob.len() as u64, digest.clone()));
    d.stop().await;
}

/// 50,000 requests naming as many registries without a hosts.d folder
/// (refused by policy, so nothing is looked up) leave `/metrics` small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_named_by_requests_do_not_grow_the_metrics() {
    let up = Fake::start(Behaviour::default()).await;
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .upstream(UpstreamSettings {
            implicit_namespaces: ImplicitPolicy::Off,
            ..quick_upstream()
        })
        .start()
        .await;
    let client = http_client();
    let base = d.url("/v2/app/manifests/v1");
    let batches = (0..50_000).collect::<Vec<u32>>();
    for batch in batches.chunks(500) {
        let asks = batch.iter().map(|i| {
            let url = format!("{base}?ns=n{i}.example");
            let client = client.clone();
            async move {
                let req = http::Request::get(url)
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            }
        });
        futures_util::future::join_all(asks).await;
    }
    let metrics = get(&d.url("/metrics")).await;
    let text = String::from_utf8_lossy(metrics.bytes()).to_string();
    // The registry is process-wide (other tests' in-process daemons share
    // it, each with registries of its own): what counts is that these
    // requests all went to the one `other` label.
    let others = text.lines().filter(|l| l.contains("ns=\"other\"")).count();
    assert!(
        others > 0 && others < 600,
        "{others} series lines for `other` in {} bytes",
        metrics.bytes().len()
    );
    assert!(
        !text.contains(".example"),
        "an unconfigured registry became a label"
    );
    assert!(
        text.contains("ns=\"other\""),
        "unconfigured registries are counted as other"
    );
    d.stop().await;
}
