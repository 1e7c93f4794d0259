//! The nodemirror binary: configuration errors and exit codes, graceful
//! exit on SIGTERM, and bounded memory while streaming a 1 GiB blob.

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use sha2::Digest as _;

use crate::support::fake::{Behaviour, Fake};
use crate::support::real::Binary;
use crate::support::stream_on;

fn nodemirror(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args(args)
        .output()
        .unwrap()
}

fn check_config(
    config: &std::path::Path,
    hosts: &std::path::Path,
    cache: &std::path::Path,
) -> std::process::Output {
    nodemirror(&[
        "check-config",
        "--config",
        config.to_str().unwrap(),
        "--hosts-dir",
        hosts.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ])
}

#[test]
fn bad_config_exits_64_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:1\"\ncache_dri = \"/x\"\n").unwrap();
    let out = nodemirror(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2: unknown key `cache_dri`", cfg.display())),
        "{err}"
    );
}

#[test]
fn broken_hosts_toml_exits_64_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "").unwrap();
    let hosts = dir.path().join("hosts.d");
    let file = hosts.join("reg.test").join("hosts.toml");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(
        &file,
        "server = \"https://x\"\n[host.\"http://m\"\ncapabilities = 1\n",
    )
    .unwrap();
    let out = check_config(&cfg, &hosts, &dir.path().join("c"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2: TOML syntax error", file.display())),
        "{err}"
    );

    std::fs::write(
        &file,
        "server = \"https://x\"\n\n[host.\"http://m\"]\ncapabilities = [\"pul\"]\n",
    )
    .unwrap();
    let out = check_config(&cfg, &hosts, &dir.path().join("c"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:4: unknown capability \"pul\"", file.display())),
        "{err}"
    );
}

#[test]
fn check_config_accepts_a_good_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:5999\"\ncache_dir = \"cache\"\nhosts_dir = \"hosts.d\"\n[upstream]\nfirst_byte_timeout = \"5s\"\n",
    )
    .unwrap();
    let out = nodemirror(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("127.0.0.1:5999"), "{text}");
}

/// Mistakes in config.toml, hosts.toml, auth.json and the cluster's files
/// are caught at load, each with its file and line (or without a line
/// when the file as a whole is wrong).
#[test]
fn configuration_mistakes_are_caught_at_load_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    let hosts = dir.path().join("hosts.d");
    let cache = dir.path().join("cache");
    let auth = dir.path().join("auth.json");
    let config = |text: &str| std::fs::write(&cfg, text).unwrap();
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).to_string();
    let run = || {
        nodemirror(&[
            "check-config",
            "--config",
            cfg.to_str().unwrap(),
            "--hosts-dir",
            hosts.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--auth-file",
            auth.to_str().unwrap(),
        ])
    };
    std::fs::write(&auth, "{}").unwrap();
    let c = cfg.display();
    for (text, says) in [
        (
            "[upstream]\nidle_timeout = 0\n",
            format!("{c}:2: `idle_timeout` must be at least 100ms"),
        ),
        (
            "[cache]\ngc_interval = \"0s\"\n",
            format!("{c}:2: `gc_interval` must be at least 1s"),
        ),
        (
            "[upstream]\nmin_rate = 0\n",
            format!("{c}:2: `min_rate` must be at least 1 byte/s"),
        ),
        (
            "[upstream]\nbackoff = \"5124095576030431h\"\n",
            format!("{c}:2: `backoff` must be at most 8784h"),
        ),
        (
            "\nlisten = \"0.0.0.0:5780\"\n",
            format!("{c}:2: `listen` 0.0.0.0:5780 is beyond loopback"),
        ),
    ] {
        config(text);
        let out = run();
        assert_eq!(out.status.code(), Some(64), "{text}");
        assert!(stderr(&out).contains(&says), "{}", stderr(&out));
    }
    config("");
    let a = auth.display();
    for (json, says) in [
        ("[]", format!("{a}: a docker config.json is a JSON object")),
        (
            "{\"auths\": {\n  \"a.test\": {\"auth\": \"dTpw\"},\n  \"b.test\": {\"auth\": \"!!\"}\n}}",
            format!("{a}:3: auths.b.test.auth is not base64"),
        ),
        ("{\"auths\": 5}", format!("{a}:1: `auths` must be an object")),
    ] {
        std::fs::write(&auth, json).unwrap();
        let out = run();
        assert_eq!(out.status.code(), Some(64), "{json}");
        assert!(stderr(&out).contains(&says), "{}", stderr(&out));
    }
    // Not a regular file: said without a line, and nothing hangs.
    std::fs::remove_file(&auth).unwrap();
    nix::unistd::mkfifo(&auth, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains(&format!("{a}: not a regular file")),
        "{}",
        stderr(&out)
    );
    std::fs::remove_file(&auth).unwrap();
    std::fs::write(&auth, "{}").unwrap();
    // The cluster's `ca` must be a CA, not a node's certificate.
    let pki = dir.path().join("pki");
    nodemirror::cluster::certs::write_ca(&pki).unwrap();
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    nodemirror::cluster::certs::write_cert(&pki, "node", &[ip], &[], &pki).unwrap();
    config(&format!(
        "[cluster]\nlisten = \"127.0.0.1:5781\"\npeers = [\"127.0.0.1:5781\"]\nca = \"{0}/node.pem\"\ncert = \"{0}/node.pem\"\nkey = \"{0}/node-key.pem\"\n",
        pki.display()
    ));
    let out = run();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("not a CA certificate"),
        "{}",
        stderr(&out)
    );
}

/// A cache folder the daemon cannot write to stops it at start with its
/// own exit code (73), as a real unprivileged user.
#[test]
fn an_unwritable_cache_is_an_error_at_start() {
    if !crate::support::real::require(&["runuser"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // A cache laid out already (by root), so only writing can fail.
    nodemirror::cache::Store::open(&cache).unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "").unwrap();
    let chmod = std::process::Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(chmod.success());
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(env!("CARGO_BIN_EXE_nodemirror"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--hosts-dir",
            "/nonexistent",
        ])
        .arg("--cache-dir")
        .arg(&cache)
        .env("NODEMIRROR_CONFIG", &cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{err}");
    assert!(err.contains("cannot write to it"), "{err}");
    // Reading it is another matter: `cache stats` works for that user.
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(env!("CARGO_BIN_EXE_nodemirror"))
        .args(["cache", "stats", "--cache-dir"])
        .arg(&cache)
        .env("NODEMIRROR_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let hosts = tempfile::tempdir().unwrap();
    let mut bin = Binary::start(hosts.path(), &[]).await;
    let pid = nix::unistd::Pid::from_raw(bin.proc.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = bin.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", bin.proc.log_text());
}

/// A 1 GiB blob streams through with memory bounded far below its size,
/// given back once the daemon is idle; once cached, it is sent from the
/// file with sendfile, on a keep-alive connection, whole and as a range,
/// without its pages ever being read into the daemon (peak RSS would grow
/// by the blob's size).
#[tokio::test]
async fn a_1gib_blob_streams_in_bounded_memory_and_is_then_sent_from_the_file() {
    const CHUNK: usize = 1 << 20;
    const COUNT: usize = 1024;
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let mut h = sha2::Sha256::new();
    for _ in 0..COUNT {
        h.update(&chunk);
    }
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    let up = Fake::start(Behaviour::default()).await;
    up.put_repeated_blob("big", &digest, Bytes::from(chunk.clone()), COUNT);

    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("reg.test", format!("server = \"{}\"\n", up.url()))],
    );
    let cache = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;
    let url = format!(
        "http://127.0.0.1:{}/v2/big/blobs/{digest}?ns=reg.test",
        bin.port
    );
    let client = crate::support::http_client();
    let whole = (StatusCode::OK, Ok(((CHUNK * COUNT) as u64, digest.clone())));
    assert_eq!(stream_on(&client, &url, None, None).await, whole);
    let peak_mib = bin.peak_rss_kib() / 1024;
    eprintln!("peak RSS of nodemirror while streaming 1 GiB: {peak_mib} MiB");
    assert!(
        peak_mib < 64,
        "peak RSS {peak_mib} MiB: the blob was buffered"
    );

    // Bytes of cached blobs sent with sendfile: all of them, less those of
    // blobs still being fetched (a leader that lagged goes on from the file).
    let sent_by_sendfile = || async {
        let text = crate::support::get(&format!("http://127.0.0.1:{}/metrics", bin.port)).await;
        let text = String::from_utf8(text.bytes().to_vec()).unwrap();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{name} in /metrics"))
        };
        value("nodemirror_sendfile_bytes_total")
            - value("nodemirror_sendfile_in_flight_bytes_total")
    };
    assert_eq!(sent_by_sendfile().await, 0, "nothing was cached yet");
    crate::support::wait_until("the blob to be committed", Duration::from_secs(30), || {
        crate::support::blob_path(cache.path(), &digest).exists()
    })
    .await;
    // Idle again: the buffers the fetch freed go back to the kernel (two
    // seconds after it ended), rather than stay with the allocator.
    let anon = || bin.anon_rss_kib() / 1024;
    eprintln!("anonymous RSS once the blob is stored: {} MiB", anon());
    crate::support::wait_until(
        "freed memory to be given back (anonymous RSS under 6 MiB)",
        Duration::from_secs(10),
        || anon() < 6,
    )
    .await;
    eprintln!("anonymous RSS once idle: {} MiB", anon());
    // Twice on one keep-alive connection, then a range across a chunk
    // boundary: the client pool reuses the connection.
    for _ in 0..2 {
        assert_eq!(stream_on(&client, &url, None, None).await, whole);
    }
    let (a, b) = (5 * CHUNK - 10, 7 * CHUNK + 9);
    let mut want = sha2::Sha256::new();
    want.update(&chunk[CHUNK - 10..]);
    want.update(&chunk);
    want.update(&chunk);
    want.update(&chunk[..10]);
    assert_eq!(
        stream_on(&client, &url, Some(&format!("bytes={a}-{b}")), None).await,
        (
            StatusCode::PARTIAL_CONTENT,
            Ok((
                (b - a + 1) as u64,
                format!("sha256:{}", hex::encode(want.finalize()))
            ))
        )
    );
    assert_eq!(
        sent_by_sendfile().await,
        (2 * CHUNK * COUNT + (b - a + 1)) as u64,
        "every cached byte went out with sendfile"
    );
    assert_eq!(up.hits("/blobs/"), 1, "one upstream fetch in all");
    let peak_mib = bin.peak_rss_kib() / 1024;
    eprintln!("peak RSS of nodemirror after sending 2 GiB from the cache: {peak_mib} MiB");
    assert!(
        peak_mib < 64,
        "peak RSS {peak_mib} MiB: the mapped blob was read into memory"
    );

    // A client that stops reading holds the mapping; once it hangs up, the
    // mapping is gone and the daemon serves on.
    let blob_file = crate::support::blob_path(cache.path(), &digest);
    let mapped = || {
        std::fs::read_to_string(format!("/proc/{}/maps", bin.proc.child.id()))
            .unwrap()
            .contains(blob_file.to_str().unwrap())
    };
    assert!(!mapped(), "no mapping outlives its response");
    let resp = client
        .request(Request::get(&url).body(Empty::new()).unwrap())
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    assert!(mapped(), "the response in progress maps the blob");
    drop(body);
    crate::support::wait_until(
        "the mapping to be released",
        Duration::from_secs(10),
        || !mapped(),
    )
    .await;
    assert_eq!(stream_on(&client, &url, None, None).await, whole);
}

/// SIGHUP re-reads hosts.d; a broken file is reported with path and line
/// and the routes in force stay.
#[tokio::test]
async fn sighup_reloads_hosts_and_keeps_the_last_good_config() {
    let up = Fake::start(Behaviour::default()).await;
    let img = crate::support::image::Image::build(&[("f", b"reload")]);
    up.push_image("app", "v1", &img);
    let hosts = tempfile::tempdir().unwrap();
    // No registry without a folder is contacted (nothing is looked up).
    let config = "[upstream]\nimplicit_namespaces = \"off\"\n";
    let bin = Binary::start_in(hosts.path(), None, config, &[]).await;
    let url = format!(
        "http://127.0.0.1:{}/v2/app/manifests/v1?ns=reg.test",
        bin.port
    );
    let pid = nix::unistd::Pid::from_raw(bin.proc.child.id() as i32);
    let hup = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();

    // Unconfigured: refused by policy.
    assert_eq!(
        crate::support::get(&url).await.status,
        StatusCode::FORBIDDEN
    );

    crate::support::write_hosts(
        hosts.path(),
        &[("reg.test", format!("server = \"{}\"\n", up.url()))],
    );
    hup();
    crate::support::wait_for("reload to take effect", Duration::from_secs(10), || {
        crate::support::answers_ok(&url)
    })
    .await;

    let file = hosts.path().join("reg.test").join("hosts.toml");
    std::fs::write(
        &file,
        format!("server = \"{}\"\nskip_verify = \"no\"\n", up.url()),
    )
    .unwrap();
    hup();
    let expected = format!("{}:2", file.display());
    bin.proc.wait_for_log(&expected).await;
    assert_eq!(
        crate::support::get(&url).await.status,
        StatusCode::OK,
        "last good config stays"
    );
}

#[test]
fn shipped_hosts_d_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "").unwrap();
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/hosts.d");
    let cache = dir.path().join("cache");
    let out = check_config(&cfg, std::path::Path::new(shipped), &cache);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for ns in [
        "docker.io",
        "registry.k8s.io",
        "quay.io",
        "ghcr.io",
        "gcr.io",
        "mcr.microsoft.com",
    ] {
        assert!(
            std::path::Path::new(shipped)
                .join(ns)
                .join("hosts.toml")
                .exists(),
            "{ns}"
        );
    }
}

/// `prefetch` pulls an image (an index, one platform) through a running
/// daemon; `cache stats`, `gc` and `verify` then inspect and maintain it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_then_cache_stats_gc_and_verify() {
    use crate::support::image::Image;
    let up = Fake::start(Behaviour::default()).await;
    let amd = Image::build(&[("a", b"amd64 layer")]);
    let arm = Image::build(&[("b", b"arm64 layer")]);
    up.push_image("app", "amd", &amd);
    up.push_image("app", "arm", &arm);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": amd.media_type, "digest": amd.digest, "size": amd.manifest.len(),
             "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": arm.media_type, "digest": arm.digest, "size": arm.manifest.len(),
             "platform": {"os": "linux", "architecture": "arm64"}},
        ]
    })
    .to_string();
    up.put_manifest(
        "app",
        Some("v1"),
        "application/vnd.oci.image.index.v1+json",
        index.as_bytes(),
    );

    let cache_dir = tempfile::tempdir().unwrap();
    let d = crate::support::Daemon::builder()
        .hosts("reg.test", crate::proxy::hosts_toml(&[], Some(&up.url())))
        .cache_dir(cache_dir.path())
        .start()
        .await;
    let cache = d.cache_dir.to_str().unwrap().to_string();
    let server = d.url("");
    let out = tokio::task::spawn_blocking(move || {
        nodemirror(&[
            "prefetch",
            "--server",
            &server,
            "--platform",
            "linux/arm64",
            "reg.test/app:v1",
        ])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 manifests, 2 blobs"), "{text}");
    // Clients finish once digests are verified; the commits follow.
    for blob in arm.blobs() {
        let path = d.blob_path(&crate::support::sha256(blob));
        crate::support::wait_until(
            "the prefetched blob in the cache",
            Duration::from_secs(10),
            || path.exists(),
        )
        .await;
    }
    for blob in amd.layers.iter() {
        assert!(
            !d.blob_path(&crate::support::sha256(blob)).exists(),
            "other platform not fetched"
        );
    }
    d.stop().await;

    let cfg = tempfile::NamedTempFile::new().unwrap();
    let run = |args: &[&str]| {
        let mut all = vec![
            args[0],
            args[1],
            "--config",
            cfg.path().to_str().unwrap(),
            "--cache-dir",
            &cache,
        ];
        all.extend_from_slice(&args[2..]);
        nodemirror(&all)
    };
    let stats = run(&["cache", "stats"]);
    assert!(stats.status.success());
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(text.contains("blobs:           2 ("), "{text}");
    assert!(text.contains("manifests:       2"), "{text}");

    // Corrupt one blob: verify quarantines it and says so with exit 1.
    let victim = crate::support::blob_path(
        std::path::Path::new(&cache),
        &crate::support::sha256(&arm.layers[0]),
    );
    std::fs::write(&victim, b"bit rot").unwrap();
    let v = run(&["cache", "verify"]);
    assert_eq!(v.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&v.stdout).contains("checked 4 files, 1 corrupt"));
    assert!(!victim.exists());
    assert!(run(&["cache", "verify"]).status.success());

    let gc = run(&["cache", "gc", "--max-size", "0", "--min-free", "0"]);
    assert!(gc.status.success());
    // Blobs, manifests and tags all go with a limit of 0.
    assert!(
        String::from_utf8_lossy(&gc.stdout).contains("1 of 1 blobs"),
        "{}",
        String::from_utf8_lossy(&gc.stdout)
    );
    let text = String::from_utf8_lossy(&run(&["cache", "stats"]).stdout).to_string();
    assert!(text.contains("blobs:           0 (0 bytes)"), "{text}");
    assert!(text.contains("manifests:       0 (0 bytes)"), "{text}");
}

/// A client that follows a blob still being fetched gets it with sendfile
/// from the growing file (no copy through the daemon), and right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_of_a_fetch_get_the_growing_file_by_sendfile() {
    let up = Fake::start(Behaviour {
        rate: Some(4 << 20),
        ..Behaviour::default()
    })
    .await;
    let content: Vec<u8> = (0..(3u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let digest = up.put_blob("app", &content);
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("slow.test", format!("server = \"{}\"\n", up.url()))],
    );
    let bin = Binary::start(hosts.path(), &[]).await;
    let url = format!(
        "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=slow.test",
        bin.port
    );
    let (leader, follower) = (crate::support::http_client(), crate::support::http_client());
    let first = stream_on(&leader, &url, None, None);
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream_on(&follower, &url, None, None).await
    };
    let (a, b) = tokio::join!(first, second);
    let whole = (StatusCode::OK, Ok((content.len() as u64, digest.clone())));
    assert_eq!(a, whole);
    assert_eq!(b, whole);
    let text = crate::support::get(&format!("http://127.0.0.1:{}/metrics", bin.port)).await;
    let text = String::from_utf8(text.bytes().to_vec()).unwrap();
    let in_flight: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("nodemirror_sendfile_in_flight_bytes_total "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    // The follower's body but its last byte (held until the digest matched).
    assert!(in_flight >= content.len() as u64 - 1, "{in_flight}");
    assert_eq!(up.blob_bytes(), content.len() as u64, "fetched once");
}
