//! Partial and lazy pullers: requests with several ranges answered with
//! `206 multipart/byteranges` for cold, in-flight and cached blobs (never
//! the whole blob), and a client reading ranges the way stargz and SOCI
//! snapshotters do: the footer, then scattered spans, several at once.

use std::time::Duration;

use http::StatusCode;

use crate::support::fake::{Behaviour, Fake};
use crate::support::{get, http_client, noise, request, sha256, stream_on, Daemon};

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
    let (blob, _up, digest, d) = slow_blob(4 << 20, 31, 8 << 20).await;
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
