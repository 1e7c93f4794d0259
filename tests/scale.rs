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

/// A hosts folder with `ns` pointing at a closed loopback port: only the
/// cache can answer for it.
fn closed_registry(ns: &str) -> tempfile::TempDir {
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[(
            ns,
            format!("server = \"http://127.0.0.1:{}\"\n", free_port()),
        )],
    );
    hosts
}

/// Puts `body` into `cache` as a blob that came through `ns`.
pub fn plant_blob(cache: &Path, ns: &str, body: &[u8]) -> String {
    let digest = sha256(body);
    let path = crate::support::blob_path(cache, &digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
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
    let hosts = closed_registry("big.test");
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

/// A cache of 150,000 blobs: the daemon answers, a cached blob included,
/// before its count of the cache is done (the log says when it is), and
/// the count keeps nothing per blob: peak memory stays that of an empty
/// cache's daemon plus a little.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_answers_before_its_cache_is_counted() {
    let hosts = closed_registry("many.test");
    let cache = tempfile::tempdir().unwrap();
    let blobs = cache.path().join("blobs/sha256");
    for shard in 0..=255u8 {
        std::fs::create_dir_all(blobs.join(format!("{shard:02x}"))).unwrap();
    }
    // Real blobs (the background check would quarantine wrong ones).
    for i in 0..150_000u32 {
        let hex = sha256(&i.to_le_bytes());
        let hex = hex.strip_prefix("sha256:").unwrap();
        std::fs::write(blobs.join(&hex[..2]).join(hex), i.to_le_bytes()).unwrap();
    }
    let real = plant_blob(cache.path(), "many.test", b"cached before the start");

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args([
            "serve",
            "--config",
            "/dev/null",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .arg("--hosts-dir")
        .arg(hosts.path())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(child);
    let logged = || {
        std::fs::read_to_string(dir.path().join("err")).unwrap_or_default()
            + &std::fs::read_to_string(&log).unwrap_or_default()
    };
    let url = format!("http://127.0.0.1:{port}/v2/app/blobs/{real}?ns=many.test");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = crate::support::try_request(http::Method::GET, &url, &[]).await {
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(&r.bytes()[..], b"cached before the start");
            break;
        }
        assert!(Instant::now() < deadline, "no answer: {}", logged());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        !logged().contains("cache counted"),
        "the first answer came after the count: {}",
        logged()
    );
    crate::support::wait_until("the count", Duration::from_secs(60), || {
        logged().contains("cache counted")
    })
    .await;
    assert!(logged().contains("blobs=150001"), "{}", logged());
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
    let peak: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("peak RSS {} KiB", peak);
    assert!(
        peak < 40 << 10,
        "peak RSS {peak} KiB counting 150,000 blobs"
    );
}

/// A cache file that blocks whoever opens it (a FIFO in place of a blob's
/// origins record, as a stuck disk would): the request for that blob
/// waits, and only it. Other blobs, health and metrics are answered at
/// once, because the store is read on the disk pool and never under the
/// lock every blob request takes. Once the file gives way, the waiting
/// request is answered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_cache_file_holds_only_its_own_request() {
    let hosts = closed_registry("disk.test");
    let cache = tempfile::tempdir().unwrap();
    let stuck = plant_blob(cache.path(), "disk.test", b"behind a stuck file");
    let others: Vec<String> = (0..20u8)
        .map(|i| plant_blob(cache.path(), "disk.test", &[i; 100]))
        .collect();
    let hex = stuck.strip_prefix("sha256:").unwrap();
    let record = cache
        .path()
        .join("origins/sha256")
        .join(&hex[..2])
        .join(hex);
    std::fs::remove_file(&record).unwrap();
    nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let bin = Binary::start_in(
        hosts.path(),
        Some(cache.path()),
        "[cache]\nverify_rate = 0\n",
        &[],
    )
    .await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    let waiting = {
        let url = format!("{base}/v2/app/blobs/{stuck}?ns=disk.test");
        tokio::spawn(async move { get(&url).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the stuck file's request waits");
    for d in &others {
        let url = format!("{base}/v2/app/blobs/{d}?ns=disk.test");
        let r = tokio::time::timeout(Duration::from_secs(2), get(&url))
            .await
            .unwrap_or_else(|_| panic!("{d} waited behind the stuck file"));
        assert_eq!(r.status, StatusCode::OK);
    }
    for path in ["/healthz", "/metrics"] {
        let r = tokio::time::timeout(Duration::from_secs(2), get(&format!("{base}{path}")))
            .await
            .unwrap_or_else(|_| panic!("{path} waited behind the stuck file"));
        assert_eq!(r.status, StatusCode::OK);
    }
    // The file gives way: the request that waited is answered.
    let fifo = record.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
        w.write_all(b"disk.test\n").unwrap();
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered once the file gave way")
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.bytes()[..], b"behind a stuck file");
}

/// Drops `path`'s pages from the page cache (it is synced first, so none
/// is dirty) and tells how many of its pages are still there.
fn evict_from_page_cache(path: &Path) -> usize {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    posix_fadvise(&file, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
    let out = std::process::Command::new("fincore")
        .args(["--raw", "--noheadings", "--output", "PAGES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux)");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The value of a counter on the daemon's `/metrics`.
async fn counter(port: u16, name: &str) -> u64 {
    let r = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    let text = String::from_utf8_lossy(r.bytes()).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not on /metrics"))
}

/// A cached blob whose pages are not in the page cache (as after a
/// reboot, or once memory pressure dropped them): the chunks that sendfile
/// would have read from disk on the connection's worker are read on the
/// disk pool first (the metric counts them), and the client gets every
/// byte right; once they are in memory, nothing is read ahead again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_not_in_memory_is_read_from_disk_off_the_workers() {
    let hosts = closed_registry("cold.test");
    // On the build's disk, not a tmpfs: its pages can leave memory.
    let cache = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let body = noise(8 << 20, 93);
    let digest = plant_blob(cache.path(), "cold.test", &body);
    let file = crate::support::blob_path(cache.path(), &digest);
    let bin = Binary::start_in(
        hosts.path(),
        Some(cache.path()),
        "[cache]\nverify_rate = 0\n",
        &[],
    )
    .await;
    let name = "nodemirror_sendfile_disk_reads_total";
    assert_eq!(counter(bin.port, name).await, 0);
    let left = evict_from_page_cache(&file);
    assert!(
        left < 64,
        "the file system keeps {left} of the blob's pages in memory: this test needs one that lets them go"
    );
    let url = format!(
        "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=cold.test",
        bin.port
    );
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(sha256(r.bytes()), digest, "every byte right");
    let read = counter(bin.port, name).await;
    assert!(read >= 1, "no chunk was read on the disk pool");
    // In memory now: sent as it is.
    let r = get(&url).await;
    assert_eq!(sha256(r.bytes()), digest);
    assert_eq!(counter(bin.port, name).await, read, "nothing to read again");
}

/// Cached blobs around the sendfile threshold (64 KiB: below it the read
/// path, from it sendfile), whole and in ranges, get exactly their bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_cached_blobs_are_served_whole_and_in_ranges() {
    use http::Method;
    let hosts = closed_registry("small.test");
    let cache = tempfile::tempdir().unwrap();
    let sizes = [1usize, 4 << 10, (64 << 10) - 1, 64 << 10, (64 << 10) + 1];
    let blobs: Vec<(Vec<u8>, String)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let body = noise(n, 100 + i as u64);
            let digest = plant_blob(cache.path(), "small.test", &body);
            (body, digest)
        })
        .collect();
    let bin = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;
    for (body, digest) in &blobs {
        let n = body.len();
        let url = format!(
            "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=small.test",
            bin.port
        );
        let r = get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{n} bytes");
        assert_eq!(r.header("content-length"), n.to_string());
        assert_eq!(r.bytes().as_ref(), &body[..], "{n} bytes whole");
        let last = n - 1;
        let cases = [
            (format!("bytes=0-{last}"), 0, n),
            (format!("bytes={}-", last), last, n),
            ("bytes=-1".to_string(), last, n),
            (format!("bytes={}-{}", n / 2, last.max(n / 2)), n / 2, n),
        ];
        for (range, from, to) in cases {
            let r = crate::support::request(Method::GET, &url, &[("range", &range)]).await;
            assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{n} bytes, {range}");
            assert_eq!(
                r.header("content-range"),
                format!("bytes {from}-{}/{n}", to - 1),
                "{n} bytes, {range}"
            );
            assert_eq!(r.bytes().as_ref(), &body[from..to], "{n} bytes, {range}");
        }
        let r =
            crate::support::request(Method::GET, &url, &[("range", &format!("bytes={n}-"))]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{n} bytes");
    }
}
