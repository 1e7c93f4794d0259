//! End to end with real components: two Debian docker-registry upstreams,
//! the nodemirror binary, and a private containerd whose
//! `certs.d/_default/hosts.toml` points at it; `ctr images pull
//! --hosts-dir` pulls images of both upstreams through the mirror. The
//! image hosts are names that resolve nowhere, so a pull can only succeed
//! through nodemirror's ?ns= routing. Then both registries stop and a fresh
//! containerd pulls the same images from nodemirror's cache.

use std::time::{Duration, Instant};

use crate::support::image::Image;
use crate::support::real::{require, Binary, Containerd, Registry};
use crate::support::{free_port, write_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_from_two_registries_through_the_mirror() {
    if !require(&["containerd", "ctr", "docker-registry"]) {
        return;
    }
    let (reg_a, reg_b) = (Registry::start().await, Registry::start().await);
    let noise: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let img_a = Image::build(&[("a.txt", b"from registry a"), ("noise.bin", &noise)]);
    let img_b = Image::build(&[("b.txt", b"from registry b")]);
    reg_a.push("team/app", "v1", &img_a).await;
    reg_b.push("library/tool", "1.0", &img_b).await;

    // nodemirror's routes: registry-b's first endpoint is dead.
    let hosts = tempfile::tempdir().unwrap();
    let dead = free_port();
    write_hosts(
        hosts.path(),
        &[
            ("registry-a.test:5000", format!("server = \"{}\"\n", reg_a.url())),
            (
                "registry-b.test",
                format!(
                    "server = \"{}\"\n\n[host.\"http://127.0.0.1:{dead}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                    reg_b.url()
                ),
            ),
        ],
    );
    // tag_ttl = 0: every tag lookup revalidates upstream, so the offline
    // pulls below go through "every endpoint failed, serve the last known".
    let nm = Binary::start_in(hosts.path(), None, "[cache]\ntag_ttl = 0\n", &[]).await;

    // containerd's view: every registry goes to nodemirror.
    let certs = crate::e2e::certs_to(nm.port);
    let ctrd = Containerd::start().await;
    let certs_dir = certs.path().to_str().unwrap();
    for (reference, image) in [
        ("registry-a.test:5000/team/app:v1", &img_a),
        ("registry-b.test/library/tool:1.0", &img_b),
    ] {
        let took = pull(&ctrd, certs_dir, reference, &image.digest, &nm);
        eprintln!("e2e: ctr images pull {reference} through nodemirror took {took:?}");
    }

    // Every layer is in containerd's content store, and the mirror served
    // both namespaces.
    let content = ctrd.ctr(&["content", "ls", "-q"]);
    let content = String::from_utf8_lossy(&content.stdout);
    for blob in img_a.blobs().chain(img_b.blobs()) {
        let d = crate::support::sha256(blob);
        assert!(
            content.contains(&d),
            "{d} missing from containerd's content store"
        );
    }
    // Both registries go away; a fresh containerd (an empty content store,
    // like a new node) still pulls both images by tag from nodemirror.
    drop((reg_a, reg_b));
    let fresh = Containerd::start().await;
    for (reference, image) in [
        ("registry-a.test:5000/team/app:v1", &img_a),
        ("registry-b.test/library/tool:1.0", &img_b),
    ] {
        let took = pull(&fresh, certs_dir, reference, &image.digest, &nm);
        eprintln!("e2e: offline pull of {reference} from the warm cache took {took:?}");
    }

    let log = nm.proc.log_text();
    assert!(log.contains("serving the last known manifest"), "{log}");
    let unique = img_a.blobs().count() + img_b.blobs().count();
    assert_eq!(
        log.matches("blob cached").count(),
        unique,
        "each blob fetched once: {log}"
    );
    assert!(log.contains("ns=registry-a.test:5000"), "{log}");
    assert!(log.contains("ns=registry-b.test"), "{log}");
    assert!(
        log.contains(&format!("127.0.0.1:{dead}")),
        "dead endpoint was tried and reported: {log}"
    );
}

/// containerd's hosts folder (`certs.d`) sending every registry to the
/// daemon on `port`; its `server` is a closed loopback port: containerd
/// tries `server` after the hosts (and without one `https://<registry>`),
/// so a failed pull never looks a registry name up.
pub fn certs_to(port: u16) -> tempfile::TempDir {
    let certs = tempfile::tempdir().unwrap();
    write_hosts(
        certs.path(),
        &[(
            "_default",
            format!(
                "server = \"http://127.0.0.1:9\"\n\n[host.\"http://127.0.0.1:{port}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )],
    );
    certs
}

/// `ctr images pull` of `reference` through `certs_dir`; asserts success and
/// the digest `ctr images ls` shows. Returns how long the pull took.
pub fn pull(
    ctrd: &Containerd,
    certs_dir: &str,
    reference: &str,
    digest: &str,
    nm: &Binary,
) -> Duration {
    let start = Instant::now();
    let out = ctrd.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        certs_dir,
        "--snapshotter",
        "native",
        reference,
    ]);
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "pull of {reference} failed:\n{}\n{}\n--- nodemirror log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        nm.proc.log_text()
    );
    let listed = ctrd.ctr(&["images", "ls"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    let line = listed
        .lines()
        .find(|l| l.starts_with(reference))
        .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{listed}"));
    assert!(
        line.contains(digest),
        "wrong digest for {reference}: {line}"
    );
    took
}
