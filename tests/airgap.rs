//! Nodes without a network: `nodemirror cache import` of archives real
//! tools write (skopeo's oci-archive and OCI layout folder, docker save's
//! format as skopeo's docker-archive writes it), offline and into a
//! running daemon; `nodemirror cache export` read back by skopeo and
//! `ctr import`; and end to end, containerd and podman pulling by tag
//! from a daemon whose upstreams are all closed ports.

use std::path::Path;
use std::process::Command;

use http::{Method, StatusCode};

use crate::support::image::{index, Image, OCI_INDEX};
use crate::support::real::{require, Binary, Containerd, Registry};
use crate::support::{noise, output_text, request, sha256, tool, write_hosts};

/// Every upstream of the namespace is this closed loopback port.
const CLOSED: &str = "127.0.0.1:9";

fn skopeo_copy(args: &[&str]) {
    let out = Command::new("skopeo")
        .arg("copy")
        .args(["--src-tls-verify=false", "--quiet"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        output_text(&out)
    );
}

/// `nodemirror cache ...` on `cache`, beside a daemon on `port` if one runs.
fn cache_tool(port: u16, cache: &Path, args: &[&str]) -> (Option<i32>, String) {
    tool(&format!("127.0.0.1:{port}"), cache, args)
}

/// The digest the daemon answers `image` (`repo:tag` under `ns`) with, as
/// containerd asks; and each blob of `img` must come too.
async fn pulled(port: u16, ns: &str, repo_tag: &str) -> (StatusCode, String) {
    let (repo, tag) = repo_tag.rsplit_once(':').unwrap();
    let r = request(
        Method::GET,
        &format!("http://127.0.0.1:{port}/v2/{repo}/manifests/{tag}?ns={ns}"),
        &[("accept", "*/*")],
    )
    .await;
    (r.status, r.header("docker-content-digest").to_string())
}

async fn blobs_served(port: u16, ns: &str, repo: &str, img: &Image) {
    for b in img.blobs() {
        let r = crate::support::get(&format!(
            "http://127.0.0.1:{port}/v2/{repo}/blobs/{}?ns={ns}",
            sha256(b)
        ))
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.bytes().as_ref(), b.as_slice());
    }
}

/// A registry with a two-platform OCI index, an OCI image with a 24 MiB
/// layer and a Docker schema 2 image.
struct Upstream {
    reg: Registry,
    arches: [Image; 2],
    index: String,
    big: Image,
    docker: Image,
}

async fn upstream() -> Upstream {
    let reg = Registry::start().await;
    let arches = [
        Image::build(&[("a", b"airgap amd64")]),
        Image::build(&[("b", b"airgap arm64")]),
    ];
    for (i, img) in arches.iter().enumerate() {
        reg.push("app/multi", &format!("arch{i}"), img).await;
    }
    let (body, index_digest) = index(OCI_INDEX, &[&arches[0], &arches[1]]);
    reg.push_manifest("app/multi", "v1", OCI_INDEX, &body).await;
    let big = Image::build(&[("noise.bin", &noise(24 << 20, 7))]);
    reg.push("app/big", "v1", &big).await;
    let docker = Image::build_docker(&[("d", b"a docker schema 2 image")]);
    reg.push("app/docker", "v2", &docker).await;
    Upstream {
        reg,
        arches,
        index: index_digest,
        big,
        docker,
    }
}

/// skopeo's three archive kinds imported: the index offline (then served
/// with every upstream closed, under the registry's digest, each platform
/// whole); a layout folder and a docker-archive into the running daemon,
/// which does the writing; the big one shows progress. A tampered archive
/// is refused with the file named and leaves no tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_what_skopeo_writes_offline_and_into_a_running_daemon() {
    if !require(&["docker-registry", "skopeo"]) {
        return;
    }
    let up = upstream().await;
    let work = tempfile::tempdir().unwrap();
    let w = |name: &str| work.path().join(name).display().to_string();
    let src = |repo_tag: &str| {
        format!(
            "docker://{}/{repo_tag}",
            up.reg.url().trim_start_matches("http://")
        )
    };
    skopeo_copy(&[
        "--all",
        &src("app/multi:v1"),
        &format!("oci-archive:{}:v1", w("multi.tar")),
    ]);
    skopeo_copy(&[&src("app/big:v1"), &format!("oci:{}:v1", w("big-layout"))]);
    skopeo_copy(&[
        &src("app/docker:v2"),
        &format!("docker-archive:{}:app/docker:v2", w("docker.tar")),
    ]);

    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[(CLOSED, format!("server = \"http://{CLOSED}\"\n"))],
    );
    let cache = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();

    // Offline: no daemon holds the cache.
    let (code, said) = cache_tool(
        port,
        cache.path(),
        &[
            "cache",
            "import",
            &w("multi.tar"),
            "--as",
            &format!("{CLOSED}/app/multi:v1"),
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains(&format!("{CLOSED}/app/multi:v1@{}", up.index)),
        "{said}"
    );

    let nm = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;
    assert_eq!(
        pulled(nm.port, CLOSED, "app/multi:v1").await,
        (StatusCode::OK, up.index.clone())
    );
    for img in &up.arches {
        let r = crate::support::get(&format!(
            "http://127.0.0.1:{}/v2/app/multi/manifests/{}?ns={CLOSED}",
            nm.port, img.digest
        ))
        .await;
        assert_eq!(r.status, StatusCode::OK, "every platform is kept");
        blobs_served(nm.port, CLOSED, "app/multi", img).await;
    }

    // Into the running daemon: a layout folder (with progress) and a
    // docker save archive.
    let (code, said) = cache_tool(
        nm.port,
        cache.path(),
        &[
            "cache",
            "import",
            &w("big-layout"),
            "--as",
            &format!("{CLOSED}/app/big:v1"),
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("import: ") && said.contains("(100%)"),
        "progress: {said}"
    );
    let (code, said) = cache_tool(
        nm.port,
        cache.path(),
        &[
            "cache",
            "import",
            &w("docker.tar"),
            "--as",
            &format!("{CLOSED}/app/docker:v2"),
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    let log = nm.proc.log_text();
    assert_eq!(log.matches("imported into the cache").count(), 2, "{log}");
    assert_eq!(
        pulled(nm.port, CLOSED, "app/big:v1").await,
        (StatusCode::OK, up.big.digest.clone())
    );
    blobs_served(nm.port, CLOSED, "app/big", &up.big).await;
    // docker save keeps no registry manifest: one is made, with the
    // layers and config as they were.
    let (status, _) = pulled(nm.port, CLOSED, "app/docker:v2").await;
    assert_eq!(status, StatusCode::OK);
    let r = crate::support::get(&format!(
        "http://127.0.0.1:{}/v2/app/docker/blobs/{}?ns={CLOSED}",
        nm.port,
        sha256(&up.docker.config)
    ))
    .await;
    assert_eq!(r.status, StatusCode::OK);

    // A tampered layout: one byte of one blob changed (one the cache
    // does not hold: those it holds are not read again).
    let fresh = Image::build(&[("f", b"not yet in the cache")]);
    up.reg.push("app/fresh", "v1", &fresh).await;
    let layer = sha256(&fresh.layers[0]);
    let bad = work.path().join("bad-layout");
    skopeo_copy(&[&src("app/fresh:v1"), &format!("oci:{}:v1", bad.display())]);
    let blob = bad
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let (code, said) = cache_tool(
        nm.port,
        cache.path(),
        &[
            "cache",
            "import",
            bad.to_str().unwrap(),
            "--as",
            &format!("{CLOSED}/app/bad:v1"),
        ],
    );
    assert_ne!(code, Some(0), "{said}");
    assert!(
        said.contains(&format!("not the {layer} it is named by")),
        "{said}"
    );
    assert_ne!(
        pulled(nm.port, CLOSED, "app/bad:v1").await.0,
        StatusCode::OK
    );
    assert_eq!(
        crate::support::temp_files(cache.path()),
        0,
        "staged files are removed"
    );
}

/// End to end: a connected daemon's cache is exported (skopeo and `ctr
/// import` read the tar), imported on a node whose every upstream is a
/// closed port, and there a real containerd and a real podman pull the
/// images by tag with the registry's digests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_air_gapped_node_pulls_exported_images_with_containerd_and_podman() {
    if !require(&["docker-registry", "skopeo", "podman", "containerd", "ctr"]) {
        return;
    }
    let up = upstream().await;
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("images.tar");

    // The connected node: its cache filled through the daemon.
    let online_hosts = tempfile::tempdir().unwrap();
    write_hosts(
        online_hosts.path(),
        &[(CLOSED, format!("server = \"{}\"\n", up.reg.url()))],
    );
    let online_cache = tempfile::tempdir().unwrap();
    let online = Binary::start_in(online_hosts.path(), Some(online_cache.path()), "", &[]).await;
    let multi = format!("{CLOSED}/app/multi:v1");
    let docker = format!("{CLOSED}/app/docker:v2");
    let (code, said) = cache_tool(
        online.port,
        online_cache.path(),
        &["prefetch", "--all-platforms", &multi, &docker],
    );
    assert_eq!(code, Some(0), "{said}");
    // Exported at once, as the README shows: the export waits a moment
    // for a blob the daemon is still storing.
    let (code, said) = cache_tool(
        online.port,
        online_cache.path(),
        &[
            "cache",
            "export",
            &multi,
            &docker,
            "-o",
            archive.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    drop(online);

    // skopeo and containerd read the export.
    let raw = Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            &format!("oci-archive:{}:v1", archive.display()),
        ])
        .output()
        .unwrap();
    assert!(raw.status.success(), "{}", output_text(&raw));
    assert_eq!(sha256(&raw.stdout), up.index);
    let ctrd = Containerd::start().await;
    let out = ctrd.ctr(&[
        "images",
        "import",
        "--snapshotter",
        "native",
        archive.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "ctr import: {}", output_text(&out));
    let listed = output_text(&ctrd.ctr(&["images", "ls"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&multi) && l.contains(&up.index)),
        "{listed}"
    );
    ctrd.ctr(&["images", "rm", &multi, &docker]);

    // The air-gapped node: every upstream closed; the archive imported
    // before the daemon starts.
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[(CLOSED, format!("server = \"http://{CLOSED}\"\n"))],
    );
    let cache = tempfile::tempdir().unwrap();
    let (code, said) = cache_tool(
        crate::support::free_port(),
        cache.path(),
        &[
            "cache",
            "import",
            archive.to_str().unwrap(),
            "--as",
            &multi,
            "--as",
            &docker,
        ],
    );
    assert_eq!(code, Some(0), "{said}");
    let nm = Binary::start_in(hosts.path(), Some(cache.path()), "", &[]).await;

    // containerd, through a hosts.toml sending every registry to the daemon.
    let certs = crate::e2e::certs_to(nm.port);
    crate::e2e::pull(
        &ctrd,
        certs.path().to_str().unwrap(),
        &multi,
        &up.index,
        &nm,
    );

    // podman, through the CRI-O drop-in `nodemirror crio install` writes.
    let conf_d = work.path().join("registries.conf.d");
    let out = Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args(["crio", "install", "--dir", conf_d.to_str().unwrap()])
        .args(["--mirror", &format!("http://127.0.0.1:{}", nm.port)])
        .args([
            "--config",
            "/dev/null",
            "--hosts-dir",
            hosts.path().to_str().unwrap(),
        ])
        .arg("--state-dir")
        .arg(work.path().join("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    let storage = work.path().join("podman");
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .env(
                "CONTAINERS_REGISTRIES_CONF",
                conf_d.join("50-nodemirror.conf"),
            )
            .arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "none"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}\n{}",
            output_text(&out),
            nm.proc.log_text()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    podman(&["pull", "--quiet", &docker]);
    assert_eq!(
        podman(&["image", "inspect", "--format", "{{.Digest}}", &docker]),
        up.docker.digest
    );
    assert!(
        !nm.proc.log_text().contains("blob cached"),
        "nothing came from an upstream"
    );
}

/// An import whose upload stops sending is given up after `[server]
/// send_timeout`: a 408 that says so, and nothing of it left in `tmp/`
/// (its staged blob removed, its room given back); the next import works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stops_ends_its_import_and_leaves_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let d = crate::support::Daemon::builder()
        .server(nodemirror::config::ServerSettings {
            send_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        })
        .start()
        .await;
    // An OCI layout with one 4 MiB blob, as a tar.
    let layout = tempfile::tempdir().unwrap();
    let blob = noise(4 << 20, 55);
    let hex = sha256(&blob).trim_start_matches("sha256:").to_string();
    std::fs::create_dir_all(layout.path().join("blobs/sha256")).unwrap();
    std::fs::write(layout.path().join("blobs/sha256").join(&hex), &blob).unwrap();
    let tar = layout.path().join("x.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(layout.path())
        .args(["-cf", tar.to_str().unwrap(), "blobs"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&tar).unwrap();
    let mut conn = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let head = format!(
        "POST /cache/import?as={CLOSED}/app/x:v1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        bytes.len() + 1_000_000
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    // Half the blob, then silence.
    conn.write_all(&bytes[..2 << 20]).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a stalled upload");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("sent nothing"), "{text}");
    crate::support::wait_until("tmp/ empty", std::time::Duration::from_secs(10), || {
        crate::support::temp_files(&d.cache_dir) == 0
    })
    .await;
    d.stop().await;
}
