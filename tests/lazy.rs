//! Partial and lazy pullers: requests with several ranges answered with
//! `206 multipart/byteranges` for cold, in-flight and cached blobs (never
//! the whole blob), and a client reading ranges the way stargz and SOCI
//! snapshotters do: the footer, then scattered spans, several at once.

use std::time::Duration;

use http::StatusCode;

use crate::support::fake::{Behaviour, Fake};
use crate::support::{
    get, http_client, noise, quick_upstream, request, sha256, stream_on, wait_until, Daemon,
};

/// The parts of a `multipart/byteranges` body: each part's
/// `Content-Range` and bytes.
fn parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let boundary = content_type
        .strip_prefix("multipart/byteranges; boundary=")
        .unwrap_or_else(|| panic!("not multipart: {content_type}"));
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut out = Vec::new();
    let mut at = 0;
    let find = |from: usize, needle: &[u8]| {
        text[from..]
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    loop {
        let start = find(at, delimiter.as_bytes()).expect("a delimiter");
        let after = start + delimiter.len();
        if text[after..].starts_with(b"--") {
            assert_eq!(
                &text[after..],
                b"--\r\n",
                "the closing delimiter ends the body"
            );
            return out;
        }
        let head_end = find(after, b"\r\n\r\n").expect("part headers");
        let head = String::from_utf8_lossy(&text[after..head_end]).to_string();
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Range: bytes "))
            .expect("a Content-Range per part")
            .to_string();
        let (a, b) = range.split_once('/').unwrap().0.split_once('-').unwrap();
        let len = b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1;
        let data_start = head_end + 4;
        out.push((range, text[data_start..data_start + len].to_vec()));
        at = data_start + len;
        assert_eq!(&text[at..at + 2], b"\r\n", "CRLF before the next delimiter");
    }
}

async fn multi(d: &Daemon, digest: &str, header: &str) -> (StatusCode, Vec<(String, Vec<u8>)>) {
    let r = request(
        http::Method::GET,
        &d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test")),
        &[("range", header)],
    )
    .await;
    assert_eq!(
        r.header("content-length"),
        r.bytes().len().to_string(),
        "sized exactly"
    );
    let ct = r.header("content-type").to_string();
    (r.status, parts(&ct, r.bytes()))
}

fn expect(blob: &[u8], got: &[(String, Vec<u8>)], ranges: &[(usize, usize)]) {
    assert_eq!(
        got.len(),
        ranges.len(),
        "{:?}",
        got.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    for ((range, bytes), &(a, b)) in got.iter().zip(ranges) {
        assert_eq!(range, &format!("{a}-{b}/{}", blob.len()));
        assert_eq!(bytes.as_slice(), &blob[a..=b], "{range}");
    }
}

/// A blob of `len` bytes of noise on a registry sending `rate` bytes a
/// second, and a daemon with `reg.test` served by it.
async fn slow_blob(len: usize, seed: u64, rate: u64) -> (Vec<u8>, Fake, String, Daemon) {
    let blob = noise(len, seed);
    let up = Fake::start(Behaviour {
        rate: Some(rate),
        ..Behaviour::default()
    })
    .await;
    let digest = up.put_blob("app", &blob);
    let d = Daemon::builder()
        .hosts("reg.test", format!("server = \"{}\"\n", up.url()))
        .start()
        .await;
    (blob, up, digest, d)
}

/// Several ranges in one request: a cold blob (the request starts its
/// fetch), the same while another client's fetch of it is under way, and
/// cached; each a 206 with one part per range in the order asked.
#[tokio::test]
async fn several_ranges_get_one_part_each_cold_in_flight_and_cached() {
    let (blob, up, digest, d) = slow_blob(3 << 20, 24, 4 << 20).await;
    let header = "bytes=3145000-3145727,0-99,1048576-1048675";
    let want = [(3_145_000, 3_145_727), (0, 99), (1_048_576, 1_048_675)];

    // Cold: the request itself starts the fetch.
    let (status, got) = multi(&d, &digest, header).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    expect(&blob, &got, &want);

    // In flight: another blob, a whole read under way.
    let blob2 = noise(3 << 20, 25);
    let digest2 = up.put_blob("app", &blob2);
    let client = http_client();
    let url = d.url(&format!("/v2/app/blobs/{digest2}?ns=reg.test"));
    let whole = tokio::spawn(async move { stream_on(&client, &url, None, None).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, got) = multi(&d, &digest2, "bytes=-10,5-9").await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    expect(&blob2, &got, &[(blob2.len() - 10, blob2.len() - 1), (5, 9)]);
    let (status, read) = whole.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read.unwrap().1, digest2);

    // Cached.
    let (status, got) = multi(&d, &digest, header).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    expect(&blob, &got, &want);
    // Unsatisfiable ones are left out; all of them: 416.
    let r = request(
        http::Method::GET,
        &d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test")),
        &[("range", "bytes=10-19,9999999-")],
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::PARTIAL_CONTENT,
        "one range left is a plain 206"
    );
    assert_eq!(
        r.header("content-range"),
        format!("bytes 10-19/{}", blob.len())
    );
    assert_eq!(r.bytes().as_ref(), &blob[10..20]);
    let r = request(
        http::Method::GET,
        &d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test")),
        &[("range", "bytes=9999999-,8888888-")],
    )
    .await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    // Each blob's bytes came from the upstream once, in ranges.
    assert_eq!(up.blob_bytes(), (blob.len() + blob2.len()) as u64);
    d.stop().await;
}

/// A lazy puller's reads of a cold blob, as stargz and SOCI snapshotters
/// make them: the footer first, then the table of contents it points to,
/// then scattered file spans, four at once; every answer a 206 with the
/// right bytes.
#[tokio::test]
async fn a_lazy_pullers_scattered_reads_get_the_right_bytes() {
    let (blob, up, digest, d) = slow_blob(4 << 20, 31, 8 << 20).await;
    let url = d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
    let read = |a: usize, b: usize| {
        let url = url.clone();
        async move {
            let r = request(
                http::Method::GET,
                &url,
                &[("range", &format!("bytes={a}-{b}"))],
            )
            .await;
            (
                r.status,
                r.header("content-range").to_string(),
                r.bytes().to_vec(),
            )
        }
    };
    let n = blob.len();
    // The footer (stargz: the last 51 bytes; SOCI reads the zTOC's end).
    let (status, range, bytes) = read(n - 51, n - 1).await;
    assert_eq!(
        (status, range),
        (
            StatusCode::PARTIAL_CONTENT,
            format!("bytes {}-{}/{n}", n - 51, n - 1)
        )
    );
    assert_eq!(bytes, &blob[n - 51..]);
    // The table of contents it names, then file spans, four at a time.
    let (status, _, bytes) = read(n - 70_000, n - 52).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bytes, &blob[n - 70_000..n - 51]);
    let spans: Vec<(usize, usize)> = (0..12)
        .map(|i| {
            let a = (i * 331_777) % (n - 40_000);
            (a, a + 4_095 + i * 1_000)
        })
        .collect();
    for batch in spans.chunks(4) {
        let reads = batch.iter().map(|&(a, b)| read(a, b));
        for ((status, _, bytes), &(a, b)) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .zip(batch)
        {
            assert_eq!(status, StatusCode::PARTIAL_CONTENT);
            assert_eq!(bytes, &blob[a..=b], "{a}-{b}");
        }
    }
    assert_eq!(sha256(&blob), digest);
    let r = get(&url).await;
    assert_eq!(
        r.bytes().as_ref(),
        blob.as_slice(),
        "and the whole blob after"
    );
    // The reads' ranges first, the rest in the background: the upstream
    // sent each byte once.
    assert_eq!(up.blob_bytes(), n as u64);
    d.stop().await;
}

/// Bytes `a..=b` of the blob at `url`: status, Content-Range, bytes.
async fn range_of(url: &str, a: usize, b: usize) -> (StatusCode, String, Vec<u8>) {
    let r = request(
        http::Method::GET,
        url,
        &[("range", &format!("bytes={a}-{b}"))],
    )
    .await;
    (
        r.status,
        r.header("content-range").to_string(),
        r.bytes().to_vec(),
    )
}

/// With `range_rest = "on-demand"`: a 64 KiB read near the end of a cold
/// 8 MiB blob is asked of the upstream at once, as its own range (with a
/// little read-ahead), not after the 7 MiB before it; a later read over
/// it and past it fetches only the bytes not there yet; a whole read then
/// fetches the rest, each byte once, and the blob is verified and stored.
#[tokio::test]
async fn a_cold_range_is_asked_for_at_once_and_later_reads_fetch_only_what_is_missing() {
    let len = 8 << 20;
    let blob = noise(len, 41);
    let up = Fake::start(Behaviour {
        rate: Some(4 << 20),
        ..Behaviour::default()
    })
    .await;
    let digest = up.put_blob("app", &blob);
    let d = Daemon::builder()
        .hosts("reg.test", format!("server = \"{}\"\n", up.url()))
        .upstream(nodemirror::config::UpstreamSettings {
            range_rest_background: false,
            ..quick_upstream()
        })
        .start()
        .await;
    let url = d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
    let (a, b) = (7 << 20, (7 << 20) + (64 << 10) - 1);
    let (status, range, bytes) = range_of(&url, a, b).await;
    assert_eq!(
        (status, range),
        (StatusCode::PARTIAL_CONTENT, format!("bytes {a}-{b}/{len}"))
    );
    assert_eq!(bytes, &blob[a..=b]);
    let asked: Vec<String> = up
        .seen()
        .iter()
        .filter_map(|s| Some(s.headers.get("range")?.to_str().ok()?.to_string()))
        .collect();
    let read_ahead = a + (256 << 10);
    assert_eq!(asked, [format!("bytes={a}-{}", read_ahead - 1)]);
    assert_eq!(up.blob_bytes(), 256 << 10);
    // Over what is there and past it: only the missing bytes are asked.
    let c = (7 << 20) + (512 << 10) - 1;
    let (status, _, bytes) = range_of(&url, a, c).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bytes, &blob[a..=c]);
    assert_eq!(up.blob_bytes(), 512 << 10);
    assert!(
        !d.blob_path(&digest).exists(),
        "ranges alone are never stored"
    );
    // A whole read: the rest, once.
    let (status, body) = stream_on(&http_client(), &url, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (len as u64, digest.clone()));
    let path = d.blob_path(&digest);
    wait_until("the blob stored", Duration::from_secs(20), || path.exists()).await;
    assert_eq!(up.blob_bytes(), len as u64);
    d.stop().await;
}

/// By default a cold range read is answered from its own range and the
/// rest of the blob follows in the background, though nobody reads it:
/// the blob is verified and stored, and the upstream sent each byte once.
#[tokio::test]
async fn a_cold_range_read_fetches_the_rest_in_the_background() {
    let len = 8 << 20;
    let (blob, up, digest, d) = slow_blob(len, 42, 2 << 20).await;
    let url = d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
    let (a, b) = (len - 51, len - 1);
    let (status, _, bytes) = range_of(&url, a, b).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(bytes, &blob[a..=b]);
    // Answered long before the blob could have come (4 s at this rate).
    assert!(
        up.blob_bytes() < len as u64 / 2,
        "{} bytes fetched before the footer was answered",
        up.blob_bytes()
    );
    let path = d.blob_path(&digest);
    wait_until("the blob stored", Duration::from_secs(30), || path.exists()).await;
    assert_eq!(up.blob_bytes(), len as u64);
    d.stop().await;
}

/// Zero waste: a cold blob read by a dozen clients at once, whole, in
/// single ranges (one that hangs up early, as containerd's parallel fetch
/// does with `bytes=N-`) and in several ranges at once, from an upstream
/// behind a front that caps each connection (so the rest is also split
/// over several connections). The upstream writes each answer as fast as
/// its socket takes it, as a registry does: a connection the daemon
/// closed early would have cost it what it wrote ahead. Every client gets
/// its bytes, and the upstream sent the blob's bytes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_of_a_cold_blob_cost_the_upstream_its_bytes_once() {
    let len = 6 << 20;
    let blob = noise(len, 43);
    let up = Fake::start(Behaviour::default()).await;
    let digest = up.put_blob("app", &blob);
    let (front, _task) = crate::support::capped_front(up.addr, 2 << 20).await;
    let d = Daemon::builder()
        .hosts(
            "reg.test",
            format!(
                "server = \"http://{front}\"\nparallel_fetches = 4\nparallel_threshold = \"1MiB\"\n"
            ),
        )
        .start()
        .await;
    let url = d.url(&format!("/v2/app/blobs/{digest}?ns=reg.test"));
    let whole = |delay: u64| {
        let url = url.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let (status, body) = stream_on(&http_client(), &url, None, None).await;
            assert_eq!(status, StatusCode::OK);
            body.unwrap().1
        }
    };
    let single = |a: usize, b: usize| {
        let url = url.clone();
        async move { range_of(&url, a, b).await }
    };
    let early = {
        let url = url.clone();
        async move {
            let header = format!("bytes={}-", 3 << 20);
            let (status, _) = stream_on(&http_client(), &url, Some(&header), Some(512 << 10)).await;
            status
        }
    };
    let several = |header: &'static str| multi(&d, &digest, header);
    let (w, s, e, m) = tokio::join!(
        futures_util::future::join_all([whole(0), whole(50), whole(300), whole(900)]),
        futures_util::future::join_all([
            single(len - 51, len - 1),
            single(5 << 20, (5 << 20) + 70_000),
            single(1_000_000, 2_500_000),
            single(100, 4_195),
        ]),
        early,
        futures_util::future::join_all([
            several("bytes=0-99,4194304-4198399,6000000-6000999"),
            several("bytes=2097152-2162687,-4096"),
        ]),
    );
    assert!(w.iter().all(|got| *got == digest), "{w:?}");
    for ((status, _, bytes), (a, b)) in s.into_iter().zip([
        (len - 51, len - 1),
        (5 << 20, (5 << 20) + 70_000),
        (1_000_000, 2_500_000),
        (100, 4_195),
    ]) {
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(bytes, &blob[a..=b], "{a}-{b}");
    }
    assert_eq!(e, StatusCode::PARTIAL_CONTENT);
    let (status, got) = &m[0];
    assert_eq!(*status, StatusCode::PARTIAL_CONTENT);
    expect(
        &blob,
        got,
        &[(0, 99), (4194304, 4198399), (6000000, 6000999)],
    );
    let (status, got) = &m[1];
    assert_eq!(*status, StatusCode::PARTIAL_CONTENT);
    expect(&blob, got, &[(2097152, 2162687), (len - 4096, len - 1)]);
    let path = d.blob_path(&digest);
    wait_until("the blob stored", Duration::from_secs(30), || path.exists()).await;
    assert_eq!(
        up.blob_bytes(),
        len as u64,
        "the upstream sent each byte once"
    );
    d.stop().await;
}

/// containers/image's zstd:chunked partial pull, with Debian's podman
/// (4.3) on overlay with `enable_partial_images`: it reads the layer's
/// footer and table of contents, then every chunk it lacks in one request
/// with many ranges. Through the daemon it pulls the image with the
/// registry's digest as a partial pull, every answer for the layer a 206
/// (the chunks as multipart/byteranges, never the whole blob), the daemon
/// sends the layer about once and the registry sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_pulls_a_zstd_chunked_image_partially_through_the_daemon() {
    use crate::support::real::{require, Binary, Registry};
    use std::process::Command;
    if !require(&["docker-registry", "podman", "tar"]) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = |p: &str| work.path().join(p);
    // An image with a big file and many small ones.
    let rootfs = w("rootfs");
    std::fs::create_dir_all(rootfs.join("data")).unwrap();
    std::fs::write(rootfs.join("data/big"), noise(3_000_000, 41)).unwrap();
    for i in 0..40u64 {
        std::fs::write(rootfs.join(format!("data/f{i}")), noise(20_000, 100 + i)).unwrap();
    }
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            crate::support::output_text(&out)
        );
        out
    };
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(w("rootfs.tar"))
        .arg("."));
    let reg = Registry::start().await;
    let (front, sent, _task) =
        crate::support::counted_front(reg.url().trim_start_matches("http://").parse().unwrap())
            .await;
    let podman = |root: &str, storage_conf: Option<&std::path::Path>| {
        let mut c = Command::new("podman");
        if let Some(conf) = storage_conf {
            c.env("CONTAINERS_STORAGE_CONF", conf);
        } else {
            c.arg("--root")
                .arg(w(root))
                .arg("--runroot")
                .arg(w(&format!("{root}-run")));
            c.args(["--storage-driver", "overlay"]);
        }
        c.args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"]);
        c
    };
    run(podman("build", None)
        .arg("import")
        .arg(w("rootfs.tar"))
        .arg("localhost/zc:v1"));
    run(podman("build", None).args([
        "push",
        "--tls-verify=false",
        "--compression-format",
        "zstd:chunked",
        "localhost/zc:v1",
        &format!("docker://{}/zc:v1", reg.url().trim_start_matches("http://")),
    ]));
    let m = request(
        http::Method::GET,
        &format!("{}/v2/zc/manifests/v1", reg.url()),
        &[("accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .await;
    let manifest: serde_json::Value = serde_json::from_slice(m.bytes()).unwrap();
    let layer = &manifest["layers"][0];
    assert!(
        layer["annotations"]["io.containers.zstd-chunked.manifest-position"].is_string(),
        "a zstd:chunked layer: {manifest}"
    );
    let layer_size = layer["size"].as_u64().unwrap();
    let layer_digest = layer["digest"].as_str().unwrap().to_string();
    let digest = sha256(m.bytes());

    // The registry's own address is a closed port: only the daemon serves.
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("127.0.0.1:9", format!("server = \"http://{front}\"\n"))],
    );
    let nm = Binary::start(hosts.path(), &[]).await;
    std::fs::write(
        w("registries.conf"),
        format!(
            "[[registry]]\nlocation = \"127.0.0.1:9\"\ninsecure = true\n[[registry.mirror]]\n\
             location = \"127.0.0.1:{}/127.0.0.1_9\"\ninsecure = true\n",
            nm.port
        ),
    )
    .unwrap();
    std::fs::write(
        w("storage.conf"),
        format!(
            "[storage]\ndriver = \"overlay\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n\
             [storage.options]\npull_options = {{enable_partial_images = \"true\", use_hard_links = \"false\"}}\n",
            w("pull-run").display(),
            w("pull").display()
        ),
    )
    .unwrap();
    let before = sent.load(std::sync::atomic::Ordering::Relaxed);
    let out = run(podman("", Some(&w("storage.conf")))
        .env("CONTAINERS_REGISTRIES_CONF", w("registries.conf"))
        .args(["--log-level", "debug", "pull", "127.0.0.1:9/zc:v1"]));
    let said = crate::support::output_text(&out);
    assert!(
        said.contains("Retrieved partial blob"),
        "not a partial pull:\n{said}"
    );
    let got = run(podman("", Some(&w("storage.conf"))).args([
        "image",
        "inspect",
        "--format",
        "{{.Digest}}",
        "127.0.0.1:9/zc:v1",
    ]));
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), digest);
    // What the daemon sent of the layer, and what the registry sent.
    let log = nm.proc.log_text();
    let to_podman: u64 = log
        .lines()
        .filter(|l| l.contains(&format!("blobs/{layer_digest}")) && l.contains("served"))
        .filter_map(|l| {
            l.split("length=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    // Every answer for the layer is a 206: the footer, the table of
    // contents and the many-range request for the chunks (Debian's
    // containers/image reads its parts out of a 200 too, so the byte
    // counts alone would not tell).
    let layer_answers: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("blobs/{layer_digest}")) && l.contains("served"))
        .collect();
    assert!(layer_answers.len() >= 2, "{log}");
    assert!(
        layer_answers.iter().all(|l| l.contains("status=206")),
        "{layer_answers:#?}"
    );
    assert!(
        to_podman <= layer_size + layer_size / 20,
        "the daemon sent {to_podman} bytes of a {layer_size}-byte layer:\n{log}"
    );
    let from_registry = sent.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(
        from_registry < layer_size + layer_size / 10,
        "the registry sent {from_registry} bytes for a {layer_size}-byte layer"
    );
}
