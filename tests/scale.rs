//! Cost that does not grow with the cache and no request held by another:
//! a big body yields between chunks, the daemon answers before its cache
//! scan ends, collection does nothing when no limit is near.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::support::real::Binary;
use crate::support::{free_port, get, noise, sha256, write_origin};

/// Puts `body` into `cache` as a blob that came through `ns`.
pub fn plant_blob(cache: &Path, ns: &str, body: &[u8]) -> String {
    let digest = sha256(body);
    let hex = digest.strip_prefix("sha256:").unwrap();
    let dir = cache.join("blobs/sha256").join(&hex[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(hex), body).unwrap();
    write_origin(cache, &digest, ns);
    digest
}

/// GETs `path` on a raw connection and drops the body as it comes: the
/// body's length.
async fn pull_and_drop(addr: &str, path: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// A cached 256 MiB blob pulled in a loop while a 4 KiB cached blob is
/// asked for 100 times: the small GETs' slowest stays far below the time
/// the big body takes to go out. Before the writer yielded between
/// sendfile chunks, a big body went out in one poll of its worker (the
/// small GETs' p99 was that poll, 60-90 ms on the 2-core machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_body_does_not_starve_a_small_one() {
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[(
            "big.test",
            format!("server = \"http://127.0.0.1:{}\"\n", free_port()),
        )],
    );
    let cache = tempfile::tempdir().unwrap();
    let big = plant_blob(cache.path(), "big.test", &noise(256 << 20, 91));
    let small = plant_blob(cache.path(), "big.test", &noise(4 << 10, 92));
    let bin = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;
    let addr = format!("127.0.0.1:{}", bin.port);
    let path = |d: &str| format!("/v2/app/blobs/{d}?ns=big.test");
    let stop = Arc::new(AtomicBool::new(false));
    let big_took = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let puller = {
        let (stop, addr, p, took) = (stop.clone(), addr.clone(), path(&big), big_took.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                assert!(pull_and_drop(&addr, &p).await > 256 << 20);
                took.lock().push(t.elapsed());
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = format!("http://{addr}{}", path(&small));
    let mut small_took = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let r = get(&url).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.bytes().len(), 4 << 10);
        small_took.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    puller.await.unwrap();
    small_took.sort();
    let mut big_took = big_took.lock().clone();
    big_took.sort();
    let big_median = big_took[big_took.len() / 2];
    let p99 = small_took[98];
    eprintln!(
        "small GET p50 {:?} p99 {:?}; big GET median {big_median:?} ({} pulls)",
        small_took[50],
        p99,
        big_took.len()
    );
    assert!(big_took.len() >= 2, "the big pulls ran");
    assert!(
        p99 < big_median / 3 && p99 < Duration::from_millis(30),
        "a small cached GET waited {p99:?} (p99) beside big bodies of {big_median:?}"
    );
}
