//! Parallel ranged fetch of big blobs: pieces over several connections,
//! streamed to clients in order, continued where a piece broke, and one
//! stream again when an endpoint ignores `Range` or does not offer it.

use std::time::Duration;

use http::StatusCode;

use crate::support::fake::{Behaviour, Fake};
use crate::support::real::{self, Registry};
use crate::support::{get, http_client, stream_on, wait_until, Daemon};

/// 3 MiB of seeded noise (gzip cannot shrink it below the threshold):
/// eight pieces of 384 KiB over four connections.
fn blob(seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    (0..3 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// hosts.toml whose endpoints fetch blobs of 1 MiB and more over four
/// connections.
fn ranged_hosts(mirrors: &[String], server: &str) -> String {
    let mut t =
        format!("server = \"{server}\"\nparallel_fetches = 4\nparallel_threshold = \"1MiB\"\n");
    for m in mirrors {
        t.push_str(&format!(
            "\n[host.\"{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  parallel_fetches = 4\n  parallel_threshold = \"1MiB\"\n"
        ));
    }
    t
}

fn url(d: &Daemon, ns: &str, digest: &str) -> String {
    d.url(&format!("/v2/app/blobs/{digest}?ns={ns}"))
}

/// The `Range` headers `fake` saw, as (first byte, last byte).
fn ranges(fake: &Fake) -> Vec<(u64, u64)> {
    fake.seen()
        .iter()
        .filter_map(|s| {
            let v = s.headers.get("range")?.to_str().ok()?;
            let (a, z) = v.strip_prefix("bytes=")?.split_once('-')?;
            Some((a.parse().ok()?, z.parse().ok()?))
        })
        .collect()
}

/// The sum of `name`'s series whose endpoint is `fake`.
async fn metric(d: &Daemon, name: &str, fake: &Fake) -> u64 {
    let text = String::from_utf8_lossy(get(&d.url("/metrics")).await.bytes()).to_string();
    let endpoint = format!("{}/", fake.url());
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&endpoint))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn stored(d: &Daemon, digest: &str) {
    let path = d.blob_path(digest);
    wait_until("the blob in the store", Duration::from_secs(20), || {
        path.exists()
    })
    .await;
}

/// Three clients at once, one of them asking for the blob's second half:
/// each gets its bytes in order; the upstream gets the pieces once each.
#[tokio::test]
async fn a_big_blob_comes_in_pieces_over_several_connections_and_in_order() {
    let up = Fake::start(Behaviour::default()).await;
    let content = blob(1);
    let digest = up.put_blob("app", &content);
    let d = Daemon::builder()
        .hosts("big.test", ranged_hosts(&[], &up.url()))
        .start()
        .await;
    let client = http_client();
    let u = url(&d, "big.test", &digest);
    let half = format!("bytes={}-", content.len() / 2);
    let (a, b, c) = tokio::join!(
        stream_on(&client, &u, None, None),
        stream_on(&client, &u, None, None),
        stream_on(&client, &u, Some(&half), None),
    );
    for (status, body) in [a, b] {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    }
    assert_eq!(c.0, StatusCode::PARTIAL_CONTENT);
    let tail = &content[content.len() / 2..];
    assert_eq!(
        c.1.unwrap(),
        (tail.len() as u64, crate::support::sha256(tail))
    );
    stored(&d, &digest).await;
    // One whole-blob GET, whose connection brought the first piece, and a
    // GET per other piece: 384 KiB each, never overlapping.
    assert_eq!(up.hits("/blobs/"), 8, "{:?}", ranges(&up));
    let mut got = ranges(&up);
    got.sort();
    let piece = 384 << 10;
    let expected: Vec<(u64, u64)> = (1..8).map(|i| (i * piece, (i + 1) * piece - 1)).collect();
    assert_eq!(got, expected);
    assert_eq!(
        metric(&d, "nodemirror_upstream_parallel_fetches_total", &up).await,
        1
    );
    // Cached: served without the upstream.
    let again = get(&u).await;
    assert_eq!(again.bytes().as_ref(), content.as_slice());
    assert_eq!(up.hits("/blobs/"), 8);
    d.stop().await;
}

/// Pieces whose connections break are continued where they broke, on the
/// same endpoint or the next; what arrived is never asked for again.
#[tokio::test]
async fn a_broken_piece_continues_where_it_stopped() {
    let breaking = |times| Behaviour {
        truncate_after: Some(100_000),
        truncate_times: times,
        ..Behaviour::default()
    };
    // The only endpoint breaks its first three answers.
    let only = Fake::start(breaking(Some(3))).await;
    let one = blob(2);
    let one_digest = only.put_blob("app", &one);
    // A mirror that breaks every answer; the server takes over.
    let (bad, good) = (
        Fake::start(breaking(None)).await,
        Fake::start(Behaviour::default()).await,
    );
    let two = blob(3);
    let two_digest = bad.put_blob("app", &two);
    good.put_blob("app", &two);
    let d = Daemon::builder()
        .hosts("one.test", ranged_hosts(&[], &only.url()))
        .hosts("two.test", ranged_hosts(&[bad.url()], &good.url()))
        .start()
        .await;
    for (ns, content, digest) in [
        ("one.test", &one, &one_digest),
        ("two.test", &two, &two_digest),
    ] {
        let (status, body) = stream_on(&http_client(), &url(&d, ns, digest), None, None).await;
        assert_eq!(status, StatusCode::OK, "{ns}");
        assert_eq!(
            body.unwrap(),
            (content.len() as u64, digest.clone()),
            "{ns}"
        );
        stored(&d, digest).await;
    }
    // Every piece that broke was asked for again from where it broke
    // (100,000 bytes further), never from its start.
    let mut asked = ranges(&only);
    asked.sort();
    let piece = 384 << 10;
    let broken: Vec<_> = asked
        .iter()
        .filter(|(a, _)| a % piece != 0)
        .copied()
        .collect();
    assert!(!broken.is_empty(), "{asked:?}");
    for (a, z) in &broken {
        assert_eq!(a % piece, 100_000, "{asked:?}");
        assert_eq!(
            asked
                .iter()
                .filter(|(s, e)| e == z && *s == a - 100_000)
                .count(),
            (a / piece != 0) as usize,
            "a piece restarted: {asked:?}"
        );
    }
    assert!(metric(&d, "nodemirror_upstream_resumes_total", &only).await >= 1);
    // The broken mirror's pieces came from the server from where they broke.
    let from_good = ranges(&good);
    assert!(!from_good.is_empty());
    assert!(
        from_good
            .iter()
            .all(|(a, _)| a % piece == 100_000 || a % piece == 0),
        "{from_good:?}"
    );
    d.stop().await;
}

/// An endpoint that says `Accept-Ranges: bytes` but answers ranges with
/// the whole blob, and one that does not say it: one stream each, and
/// the right bytes.
#[tokio::test]
async fn endpoints_without_ranges_get_one_stream() {
    let ignoring = Fake::start(Behaviour {
        ignore_range: true,
        ..Behaviour::default()
    })
    .await;
    let silent = Fake::start(Behaviour {
        no_accept_ranges: true,
        ..Behaviour::default()
    })
    .await;
    let (a, b) = (blob(4), blob(5));
    let (da, db) = (ignoring.put_blob("app", &a), silent.put_blob("app", &b));
    let d = Daemon::builder()
        .hosts("ignoring.test", ranged_hosts(&[], &ignoring.url()))
        .hosts("silent.test", ranged_hosts(&[], &silent.url()))
        .start()
        .await;
    for (ns, content, digest) in [("ignoring.test", &a, &da), ("silent.test", &b, &db)] {
        let (status, body) = stream_on(&http_client(), &url(&d, ns, digest), None, None).await;
        assert_eq!(status, StatusCode::OK, "{ns}");
        assert_eq!(
            body.unwrap(),
            (content.len() as u64, digest.clone()),
            "{ns}"
        );
        stored(&d, digest).await;
    }
    // The ignoring endpoint was asked for ranges and sent whole blobs; the
    // first connection carried the blob on its own.
    assert!(!ranges(&ignoring).is_empty());
    assert!(
        ignoring.hits("/blobs/") <= 4,
        "{}",
        ignoring.hits("/blobs/")
    );
    assert_eq!(silent.hits("/blobs/"), 1);
    assert!(ranges(&silent).is_empty());
    assert_eq!(
        metric(&d, "nodemirror_upstream_parallel_fetches_total", &silent).await,
        0
    );
    d.stop().await;
}

/// A mirror that changes a byte of every piece: the client's transfer
/// fails (its last byte is never released), nothing is cached, and the
/// next request gets the blob from the server.
#[tokio::test]
async fn a_lying_piece_fails_the_blob_and_the_next_endpoint_serves_it() {
    let liar = Fake::start(Behaviour {
        lie: true,
        ..Behaviour::default()
    })
    .await;
    let honest = Fake::start(Behaviour::default()).await;
    let content = blob(6);
    let digest = liar.put_blob("app", &content);
    honest.put_blob("app", &content);
    let d = Daemon::builder()
        .hosts("lie.test", ranged_hosts(&[liar.url()], &honest.url()))
        .start()
        .await;
    let u = url(&d, "lie.test", &digest);
    let (status, body) = stream_on(&http_client(), &u, None, None).await;
    assert!(
        status != StatusCode::OK || body.is_err(),
        "a blob with wrong bytes was delivered whole"
    );
    assert!(!d.blob_path(&digest).exists());
    assert!(!ranges(&liar).is_empty(), "the liar was asked in ranges");
    let (status, body) = stream_on(&http_client(), &u, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    stored(&d, &digest).await;
    assert!(honest.hits("/blobs/") >= 1);
    d.stop().await;
}

/// A real registry (distribution) offers ranges: a big layer comes over
/// several connections and is right.
#[tokio::test]
async fn a_real_registry_serves_pieces() {
    if !real::require(&["docker-registry"]) {
        return;
    }
    let reg = Registry::start().await;
    let content = blob(7);
    let img = crate::support::image::Image::build(&[("big", &content)]);
    reg.push("team/big", "v1", &img).await;
    let d = Daemon::builder()
        .hosts("reg.test", ranged_hosts(&[], &reg.url()))
        .start()
        .await;
    for layer in img.blobs() {
        let digest = crate::support::sha256(layer);
        let u = d.url(&format!("/v2/team/big/blobs/{digest}?ns=reg.test"));
        let (status, body) = stream_on(&http_client(), &u, None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (layer.len() as u64, digest.clone()));
        stored(&d, &digest).await;
    }
    let text = String::from_utf8_lossy(get(&d.url("/metrics")).await.bytes()).to_string();
    let endpoint = format!("127.0.0.1:{}/", reg.port);
    assert!(
        text.lines().any(
            |l| l.starts_with("nodemirror_upstream_parallel_fetches_total{")
                && l.contains(&endpoint)
        ),
        "{text}"
    );
    d.stop().await;
}
