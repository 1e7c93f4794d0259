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
