//! The daemon keeps serving the node whatever its callers, upstreams and
//! disk do: connections, fetch slots, disk, configuration files and the
//! cache folder are all bounded or guarded.

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::real::{require, Binary};
use crate::support::{answers_ok, get, http_client, stream_on, wait_until};

/// 230 clients that ask for a big cached blob and never read, against a
/// daemon held to 256 open files with `max_connections = 100`: `/healthz`
/// answers all along, new pulls get a quick 503 (never an accept error
/// loop), and once `send_timeout` passes the stuck connections are
/// closed and what they held is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_cannot_take_the_daemon() {
    if !require(&["prlimit"]) {
        return;
    }
    let up = Fake::start(Behaviour::default()).await;
    let digest = crate::support::sha256(&vec![7u8; 64 << 20]);
    up.put_repeated_blob("app", &digest, Bytes::from(vec![7u8; 1 << 20]), 64);
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("reg.test", hosts_toml(&[], Some(&up.url())))],
    );
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "[server]\nmax_connections = 100\nsend_timeout = \"6s\"\n",
        &[],
        &[],
        Some((&["prlimit", "--nofile=256:256", "--"], 0)),
    )
    .await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    let path = format!("/v2/app/blobs/{digest}?ns=reg.test");
    // Cached first.
    let (status, body) = stream_on(&http_client(), &format!("{base}{path}"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap().0, 64 << 20);
    let idle_files = bin.open_files();
    // 230 clients ask and never read.
    let mut stuck = Vec::new();
    for _ in 0..230 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", bin.port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        stuck.push(s);
    }
    // Health answers throughout; a new pull is refused quickly, with a
    // time to come back.
    let health = format!("{base}/healthz");
    for _ in 0..10 {
        assert!(answers_ok(&health).await, "/healthz did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = get(&format!("{base}/readyz")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(r.bytes()).contains("connections"));
    let r = get(&format!("{base}{path}")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("retry-after"), "1");
    assert!(bin.open_files() < 256, "{} files open", bin.open_files());
    // Past send_timeout the stuck connections are closed: files back to
    // where they were, and pulls served again.
    let began = Instant::now();
    wait_until(
        "the stuck connections to be closed",
        Duration::from_secs(20),
        || bin.open_files() <= idle_files + 4,
    )
    .await;
    assert!(began.elapsed() < Duration::from_secs(20));
    let (status, body) = stream_on(&http_client(), &format!("{base}{path}"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap().0, 64 << 20);
    let log = bin.proc.log_text();
    assert!(!log.contains("accept failed"), "{log}");
    drop(stuck);
}

/// A FIFO where a hosts.toml should be, and a reload: the daemon goes on
/// answering (health and pulls), reports the file with its path, and
/// keeps the last good configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_stops_serving() {
    let up = Fake::start(Behaviour::default()).await;
    let img = crate::support::image::Image::build(&[("f", b"reload")]);
    up.push_image("app", "v1", &img);
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("reg.test", hosts_toml(&[], Some(&up.url())))],
    );
    // One async worker: a reload that blocked it would stop everything.
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "",
        &[],
        &[("TOKIO_WORKER_THREADS", "1")],
        None,
    )
    .await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    let pull = format!("{base}/v2/app/manifests/v1?ns=reg.test");
    assert!(answers_ok(&pull).await);
    let fifo = hosts.path().join("x.test");
    std::fs::create_dir_all(&fifo).unwrap();
    let fifo = fifo.join("hosts.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let pid = nix::unistd::Pid::from_raw(bin.proc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    bin.proc
        .wait_for_log(&format!("{}: not a regular file", fifo.display()))
        .await;
    for _ in 0..5 {
        assert!(answers_ok(&format!("{base}/healthz")).await);
        assert!(answers_ok(&pull).await, "the last good configuration stays");
    }
}

/// Reloads of 1,000 hosts.d folders (each file about 60 KB) on a daemon
/// with one async worker: cached pulls meanwhile are answered at once,
/// not after the reload (which takes far longer than any of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_pulls_are_answered_during_a_reload_of_1000_folders() {
    let up = Fake::start(Behaviour::default()).await;
    let blob = up.put_blob("app", &crate::support::noise(100_000, 90));
    let hosts = tempfile::tempdir().unwrap();
    let padding = format!("# {}\n", "x".repeat(78)).repeat(750);
    let folders: Vec<(String, String)> = (0..1000)
        .map(|i| {
            (
                format!("r{i}.test"),
                format!("{padding}server = \"{}\"\n", up.url()),
            )
        })
        .collect();
    let refs: Vec<(&str, String)> = folders
        .iter()
        .map(|(n, t)| (n.as_str(), t.clone()))
        .collect();
    crate::support::write_hosts(hosts.path(), &refs);
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "",
        &[],
        &[("TOKIO_WORKER_THREADS", "1")],
        None,
    )
    .await;
    let url = format!(
        "http://127.0.0.1:{}/v2/app/blobs/{blob}?ns=r1.test",
        bin.port
    );
    let client = http_client();
    let (status, _) = stream_on(&client, &url, None, None).await;
    assert_eq!(status, StatusCode::OK);
    let pid = nix::unistd::Pid::from_raw(bin.proc.child.id() as i32);
    let mut slowest = Duration::ZERO;
    let mut reloads = 0;
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(4) {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
        reloads += 1;
        for _ in 0..20 {
            let t = Instant::now();
            let (status, _) = stream_on(&client, &url, None, None).await;
            assert_eq!(status, StatusCode::OK);
            slowest = slowest.max(t.elapsed());
        }
    }
    bin.proc.wait_for_log("configuration reloaded").await;
    let log = bin.proc.log_text();
    let took = reload_times(&log);
    assert!(!took.is_empty(), "no reload finished: {log}");
    let typical = took[took.len() / 2];
    assert!(
        slowest < typical / 2,
        "a cached pull took {slowest:?} during {reloads} reloads of {typical:?} each"
    );
}

/// How long each reload took, from the log: the time between a
/// "reloading" line and the next "configuration reloaded".
fn reload_times(log: &str) -> Vec<Duration> {
    let at = |line: &str| -> Option<f64> {
        // 2026-12-06T09:26:18.170974Z: seconds of the minute are enough.
        let t = line.split_whitespace().next()?;
        let time = t.split('T').nth(1)?.trim_end_matches('Z');
        let mut parts = time.split(':');
        let (h, m, s): (f64, f64, f64) = (
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        );
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let mut out = Vec::new();
    let mut start = None;
    for line in log.lines() {
        if line.contains("reloading configuration") {
            start = at(line);
        } else if line.contains("configuration reloaded") {
            if let (Some(a), Some(b)) = (start.take(), at(line)) {
                out.push(Duration::from_secs_f64((b - a).max(0.0)));
            }
        }
    }
    out.sort();
    out
}

/// `nodemirror cache stats|verify|gc` while the daemon downloads a blob:
/// the tools see the daemon, never touch its download, and collect
/// through it; the download is stored whole. A second daemon on the same
/// cache is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_tools_never_break_the_running_daemon() {
    let up = Fake::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(60)),
        ..Behaviour::default()
    })
    .await;
    let chunk = Bytes::from(crate::support::noise(256 << 10, 91));
    let digest = crate::support::sha256(&chunk.repeat(32));
    up.put_repeated_blob("app", &digest, chunk, 32);
    let other = up.put_blob("app", &crate::support::noise(200_000, 92));
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("reg.test", hosts_toml(&[], Some(&up.url())))],
    );
    let cache = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    let (status, _) = stream_on(
        &http_client(),
        &format!("{base}/v2/app/blobs/{other}?ns=reg.test"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // A blob is stored a moment after its last byte went out.
    let stored = crate::support::blob_path(cache.path(), &other);
    wait_until("the first blob stored", Duration::from_secs(10), || {
        stored.exists()
    })
    .await;
    let pulling = tokio::spawn({
        let url = format!("{base}/v2/app/blobs/{digest}?ns=reg.test");
        async move { stream_on(&http_client(), &url, None, None).await }
    });
    let dir = cache.path().to_path_buf();
    wait_until("the download to start", Duration::from_secs(10), || {
        crate::support::temp_files(&dir) > 0
    })
    .await;
    let listen = format!("127.0.0.1:{}", bin.port);
    let tool = |args: &[&str]| crate::support::tool(&listen, cache.path(), args);
    let (code, text) = tool(&["cache", "stats"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("daemon:          running"), "{text}");
    let (code, text) = tool(&["cache", "verify"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = tool(&["cache", "gc", "--max-size", "0"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("evicted 1 of"),
        "collected through the daemon: {text}"
    );
    assert!(
        crate::support::temp_files(cache.path()) > 0,
        "the download's file is gone"
    );
    // The download goes on and is stored.
    let (status, body) = pulling.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (8 << 20, digest.clone()));
    let stored = crate::support::blob_path(cache.path(), &digest);
    wait_until("the download stored", Duration::from_secs(10), || {
        stored.exists()
    })
    .await;
    assert!(!bin.proc.log_text().contains("could not be stored"));
    // A second daemon on the same cache is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args(["serve", "--config", "/dev/null", "--listen", "127.0.0.1:0"])
        .args(["--hosts-dir", "/nonexistent", "--cache-dir"])
        .arg(cache.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{text}");
    assert!(
        text.contains("another nodemirror daemon uses this cache"),
        "{text}"
    );
}

/// A cached blob whose file was truncated (to 1,000 bytes, or to nothing)
/// is never served: its size differs from the one it was committed with,
/// so it goes to quarantine and is fetched again. One with a flipped byte
/// is found by the background verification and fetched again too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_cache_file_is_never_served() {
    let up = Fake::start(Behaviour::default()).await;
    let (a, b) = (
        crate::support::noise(1 << 20, 93),
        crate::support::noise(1 << 20, 94),
    );
    let (da, db) = (up.put_blob("app", &a), up.put_blob("app", &b));
    let d = crate::support::Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .cache(nodemirror::config::CacheSettings {
            verify_rate: 64 << 20,
            ..crate::support::test_cache()
        })
        .start()
        .await;
    let client = http_client();
    let url = |digest: &str| d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
    for digest in [&da, &db] {
        let (status, _) = stream_on(&client, &url(digest), None, None).await;
        assert_eq!(status, StatusCode::OK);
        let path = d.blob_path(digest);
        wait_until("stored", Duration::from_secs(10), || path.exists()).await;
    }
    for (n, len) in [(1, 1000), (2, 0)] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.blob_path(&da))
            .unwrap();
        f.set_len(len).unwrap();
        let (status, body) = stream_on(&client, &url(&da), None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body.unwrap(),
            (a.len() as u64, da.clone()),
            "truncated to {len}"
        );
        assert_eq!(up.hits(&format!("/blobs/{da}")), 1 + n);
        let path = d.blob_path(&da);
        wait_until("stored again", Duration::from_secs(10), || path.exists()).await;
    }
    assert!(d
        .cache_dir
        .join("quarantine")
        .join(format!("blobs-{}", da.trim_start_matches("sha256:")))
        .exists());
    // A flipped byte, same size: the background check finds it.
    let mut flipped = b.clone();
    flipped[12345] ^= 0xff;
    std::fs::write(d.blob_path(&db), &flipped).unwrap();
    wait_until(
        "the flipped blob fetched again",
        Duration::from_secs(30),
        || up.hits(&format!("/blobs/{db}")) == 1 && !d.blob_path(&db).exists(),
    )
    .await;
    let (status, body) = stream_on(&client, &url(&db), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (b.len() as u64, db.clone()));
    assert_eq!(up.hits(&format!("/blobs/{db}")), 2);
    d.stop().await;
}

/// Four namespaces on one registry that trickles above `min_rate` take
/// every fetch slot with 128 pulls whose callers hang up after a second:
/// the slots come back within seconds (a fetch nobody reads ends), and a
/// good pull works again within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_slots_come_back_when_the_callers_leave() {
    // 64 KiB/s: well above min_rate (16 KiB/s) in every window.
    let trickle = Fake::trickling(64 << 10).await;
    let good = Fake::start(Behaviour::default()).await;
    let fine = good.put_blob("app", &crate::support::noise(100_000, 95));
    let mut b =
        crate::support::Daemon::builder().hosts("good.test", hosts_toml(&[], Some(&good.url())));
    for i in 0..4 {
        b = b.hosts(&format!("t{i}.test"), hosts_toml(&[], Some(&trickle.url())));
    }
    let d = b.start().await;
    let mut callers = Vec::new();
    for i in 0..128u64 {
        let digest = trickle.put_blob("app", &crate::support::noise(2 << 20, 1000 + i));
        let url = d.url(&format!("/v2/app/blobs/{digest}?ns=t{}.test", i % 4));
        callers.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                stream_on(&http_client(), &url, None, None),
            )
            .await;
        }));
    }
    let ready = d.url("/readyz");
    wait_until("every fetch slot taken", Duration::from_secs(10), || {
        trickle.seen().len() >= 128
    })
    .await;
    assert_eq!(get(&ready).await.status, StatusCode::SERVICE_UNAVAILABLE);
    for c in callers {
        c.await.unwrap();
    }
    // The callers left: within 10 s a good pull works again.
    let left = Instant::now();
    let url = d.url(&format!("/v2/app/blobs/{fine}?ns=good.test"));
    loop {
        let (status, body) = stream_on(&http_client(), &url, None, None).await;
        if status == StatusCode::OK {
            assert_eq!(body.unwrap().0, 100_000);
            break;
        }
        assert!(
            left.elapsed() < Duration::from_secs(10),
            "still {status} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    crate::support::wait_for("ready again", Duration::from_secs(10), || {
        let ready = ready.clone();
        async move { get(&ready).await.status == StatusCode::OK }
    })
    .await;
    d.stop().await;
}

/// Registries without a hosts.d folder (here through `_default`'s server)
/// share one per-namespace cap: naming many of them takes no more slots
/// than one would, and a configured registry keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registries_without_a_folder_share_one_cap() {
    let trickle = Fake::trickling(20 << 10).await;
    let good = Fake::start(Behaviour::default()).await;
    let fine = good.put_blob("app", &crate::support::noise(100_000, 96));
    let d = crate::support::Daemon::builder()
        .hosts("_default", hosts_toml(&[], Some(&trickle.url())))
        .hosts("good.test", hosts_toml(&[], Some(&good.url())))
        .upstream(nodemirror::config::UpstreamSettings {
            max_fetches_per_namespace: 4,
            fetch_wait: Duration::from_millis(200),
            ..crate::support::quick_upstream()
        })
        .start()
        .await;
    let client = http_client();
    let mut pulls = Vec::new();
    for i in 0..4u64 {
        let digest = trickle.put_blob("app", &crate::support::noise(1 << 20, 2000 + i));
        let url = d.url(&format!("/v2/app/blobs/{digest}?ns=n{i}.example"));
        let client = client.clone();
        pulls.push(tokio::spawn(async move {
            stream_on(&client, &url, None, None).await
        }));
    }
    wait_until("four fetches under way", Duration::from_secs(10), || {
        trickle.seen().len() >= 4
    })
    .await;
    // A fifth name without a folder waits, then gets 503; good.test does not.
    let digest = trickle.put_blob("app", &crate::support::noise(1 << 20, 2010));
    let r = get(&d.url(&format!("/v2/app/blobs/{digest}?ns=n9.example"))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!r.header("retry-after").is_empty());
    let (status, _) = stream_on(
        &client,
        &d.url(&format!("/v2/app/blobs/{fine}?ns=good.test")),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for p in pulls {
        p.abort();
    }
    d.stop().await;
}

/// A cache limited to 10 MiB with 6 MiB of blobs in it.
async fn small_cache(up: &Fake, max_blob: u64) -> (crate::support::Daemon, Vec<String>) {
    let d = crate::support::Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .cache(nodemirror::config::CacheSettings {
            max_size: Some(10 << 20),
            max_blob_size: max_blob,
            ..crate::support::test_cache()
        })
        .start()
        .await;
    let kept = pull_and_store(&d, up, 6, 1 << 20, 300).await;
    (d, kept)
}

/// What an upstream claims never evicts committed blobs: a size over
/// `max_blob_size`, or one that would need eviction, fails that fetch
/// (a quick 503); a body without a length is held to the same limits as
/// it arrives. Nothing stored goes, nothing is left in tmp/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_upstream_claims_never_evicts_committed_blobs() {
    let up = Fake::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(200)),
        ..Behaviour::default()
    })
    .await;
    let (d, kept) = small_cache(&up, 8 << 20).await;
    let fake = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
    // Claims: 1 GiB (over max_blob_size), then 6 MiB (under it, but the
    // cache would have to evict: 6 + 6 > 10).
    up.put_repeated_blob("app", &fake(1), Bytes::from(vec![1u8; 1 << 20]), 1024);
    up.put_repeated_blob("app", &fake(2), Bytes::from(vec![2u8; 1 << 20]), 6);
    for n in [1, 2] {
        let r = get(&d.url(&format!("/v2/app/blobs/{}?ns=reg.test", fake(n)))).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "claim {n}");
    }
    // A body without a length, endless.
    up.set(|b| {
        b.no_length = true;
        b.chunk_delay = None;
    });
    up.put_repeated_blob("app", &fake(3), Bytes::from(vec![3u8; 1 << 20]), 1 << 20);
    let (_, body) = stream_on(
        &http_client(),
        &d.url(&format!("/v2/app/blobs/{}?ns=reg.test", fake(3))),
        None,
        None,
    )
    .await;
    assert!(body.is_err(), "an endless body came to an end");
    let cache = d.cache_dir.clone();
    wait_until(
        "the cut download's file gone",
        Duration::from_secs(10),
        || crate::support::temp_files(&cache) == 0,
    )
    .await;
    // The collector ran (each refusal asks for it): nothing committed went.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for digest in &kept {
        assert!(d.blob_path(digest).exists(), "{digest} was evicted");
    }
    d.stop().await;
}

/// Manifests and tags count against `max_size` and are evicted least
/// recently used, like blobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_and_tags_are_counted_and_evicted() {
    let up = Fake::start(Behaviour::default()).await;
    let d = crate::support::Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    let accept = [("accept", crate::support::image::OCI_MANIFEST)];
    for i in 0..100 {
        let pad = format!("{i}-{}", "x".repeat(20_000));
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":1}},"layers":[],"annotations":{{"pad":"{pad}"}}}}"#,
            crate::support::image::OCI_MANIFEST,
            "0".repeat(64),
        );
        up.put_manifest(
            "app",
            Some(&format!("t{i}")),
            crate::support::image::OCI_MANIFEST,
            body.as_bytes(),
        );
        let r = crate::support::request(
            http::Method::GET,
            &d.url(&format!("/v2/app/manifests/t{i}?ns=reg.test")),
            &accept,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let store = nodemirror::cache::Store::open_beside(&d.cache_dir)
        .unwrap()
        .0;
    let before = store.stats().unwrap();
    assert_eq!((before.manifests, before.tags), (100, 100));
    assert!(before.stored_bytes() > 3 << 19, "{before:?}");
    let r = crate::support::request(
        http::Method::POST,
        &d.url("/cache/gc?max_size=1048576"),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let after = store.stats().unwrap();
    assert!(after.stored_bytes() <= 1 << 20, "{after:?}");
    assert!(after.manifests < 100 && after.tags < 100, "{after:?}");
    d.stop().await;
}

/// A 128 MiB tmpfs cache (`min_free` 10%): a claimed 100 MiB body that
/// would leave less than the floor is refused without touching the 20 MiB
/// of blobs already there (the collector runs every second meanwhile),
/// and an endless body without a length stops at the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_filesystem_is_never_filled() {
    if !require(&["mount", "umount"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=128m", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs (as root) failed");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.path().to_path_buf());
    let up = Fake::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(300)),
        ..Behaviour::default()
    })
    .await;
    let d = crate::support::Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.url())))
        .cache_dir(&dir.path().join("cache"))
        .cache(nodemirror::config::CacheSettings {
            min_free: nodemirror::config::MinFree::Percent(10),
            gc_interval: Duration::from_secs(1),
            ..crate::support::test_cache()
        })
        .start()
        .await;
    let kept = pull_and_store(&d, &up, 5, 4 << 20, 400).await;
    let claim = format!("sha256:{}", "ab".repeat(32));
    up.put_repeated_blob("app", &claim, Bytes::from(vec![1u8; 1 << 20]), 100);
    let r = get(&d.url(&format!("/v2/app/blobs/{claim}?ns=reg.test"))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    // An endless body without a length.
    up.set(|b| {
        b.no_length = true;
        b.chunk_delay = None;
    });
    let endless = format!("sha256:{}", "cd".repeat(32));
    up.put_repeated_blob("app", &endless, Bytes::from(vec![2u8; 1 << 20]), 1 << 20);
    let (_, body) = stream_on(
        &http_client(),
        &d.url(&format!("/v2/app/blobs/{endless}?ns=reg.test")),
        None,
        None,
    )
    .await;
    assert!(body.is_err());
    let cache = d.cache_dir.clone();
    wait_until(
        "the cut download's file gone",
        Duration::from_secs(10),
        || crate::support::temp_files(&cache) == 0,
    )
    .await;
    // Several collections later, nothing committed went, and the floor
    // was never crossed for long.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for digest in &kept {
        assert!(d.blob_path(digest).exists(), "{digest} was evicted");
    }
    let free = nodemirror::cache::gc::free_bytes(dir.path()).unwrap();
    assert!(free >= 12 << 20, "{free} bytes free");
    d.stop().await;
}

/// Puts `n` blobs of `size` bytes (noise seeded from `seed`) on `up`'s
/// `app`, pulls each through `d` under `reg.test` and waits until it is
/// stored: their digests.
async fn pull_and_store(
    d: &crate::support::Daemon,
    up: &Fake,
    n: u64,
    size: usize,
    seed: u64,
) -> Vec<String> {
    let mut kept = Vec::new();
    for i in 0..n {
        let digest = up.put_blob("app", &crate::support::noise(size, seed + i));
        let url = d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
        let (status, _) = stream_on(&http_client(), &url, None, None).await;
        assert_eq!(status, StatusCode::OK);
        let path = d.blob_path(&digest);
        wait_until("stored", Duration::from_secs(10), || path.exists()).await;
        kept.push(digest);
    }
    kept
}
