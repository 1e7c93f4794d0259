//! The right image for every client: containerd (one `Accept` line, `?ns=`)
//! and containers/image clients (podman, skopeo, CRI-O: one line per type,
//! no `?ns=`, path-prefixed mirrors) through one daemon, against a real
//! distribution registry, which answers by the client's `Accept` list
//! (404 for an OCI index the list lacks, schema 1 for a client that takes
//! no schema 2).

use http::{Method, StatusCode};

use crate::proxy::hosts_toml;
use crate::support::image::{
    index, Image, CONTAINERD_ACCEPT, CONTAINERS_IMAGE_ACCEPT, DOCKER_LIST, DOCKER_MANIFEST,
    DOCKER_SCHEMA1, OCI_INDEX,
};
use crate::support::real::{require, Registry};
use crate::support::{request, Daemon, Reply};

/// Three tags on a real registry: a multi-arch OCI index, a multi-arch
/// Docker manifest list, a single-arch Docker schema 2 image.
struct Upstream {
    reg: Registry,
    oci_index: String,
    docker_list: String,
    docker: Image,
}

async fn upstream() -> Upstream {
    let reg = Registry::start().await;
    let (a, b) = (
        Image::build(&[("a", b"oci amd64")]),
        Image::build(&[("b", b"oci arm64")]),
    );
    for (i, img) in [&a, &b].into_iter().enumerate() {
        reg.push("app/oci", &format!("arch{i}"), img).await;
    }
    let (body, oci_index) = index(OCI_INDEX, &[&a, &b]);
    reg.push_manifest("app/oci", "v1", OCI_INDEX, &body).await;
    let (c, d) = (
        Image::build_docker(&[("c", b"docker amd64")]),
        Image::build_docker(&[("d", b"docker arm64")]),
    );
    for (i, img) in [&c, &d].into_iter().enumerate() {
        reg.push("app/list", &format!("arch{i}"), img).await;
    }
    let (body, docker_list) = index(DOCKER_LIST, &[&c, &d]);
    reg.push_manifest("app/list", "v1", DOCKER_LIST, &body)
        .await;
    let docker = Image::build_docker(&[("e", b"single docker image")]);
    reg.push("app/docker", "v1", &docker).await;
    Upstream {
        reg,
        oci_index,
        docker_list,
        docker,
    }
}

async fn get_manifest(d: &Daemon, path: &str, accept: &[&str]) -> Reply {
    let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
    request(Method::GET, &d.url(path), &headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accept_line_counts() {
    if !require(&["docker-registry"]) {
        return;
    }
    let up = upstream().await;
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.reg.url())))
        .start()
        .await;
    for (repo, digest, media_type) in [
        ("app/oci", &up.oci_index, OCI_INDEX),
        ("app/list", &up.docker_list, DOCKER_LIST),
        ("app/docker", &up.docker.digest, DOCKER_MANIFEST),
    ] {
        // containers/image's lines; then containerd's one line.
        for accept in [&CONTAINERS_IMAGE_ACCEPT[..], &[CONTAINERD_ACCEPT]] {
            let path = format!("/v2/{repo}/manifests/v1?ns=reg.test");
            let r = get_manifest(&d, &path, accept).await;
            assert_eq!(r.status, StatusCode::OK, "{repo} {accept:?}");
            assert_eq!(r.header("docker-content-digest"), digest.as_str(), "{repo}");
            assert_eq!(r.header("content-type"), media_type, "{repo}");
            assert_eq!(&crate::support::sha256(r.bytes()), digest, "{repo}");
        }
    }
    d.stop().await;
}

/// A client that takes no schema 2 gets the registry's schema 1
/// conversion (a different digest); it is never cached, and clients that
/// take schema 2 keep getting the image the registry holds, whichever
/// asked first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema1_conversions_never_reach_other_clients() {
    if !require(&["docker-registry"]) {
        return;
    }
    let up = upstream().await;
    let d = Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.reg.url())))
        .start()
        .await;
    let path = "/v2/app/docker/manifests/v1?ns=reg.test";
    let old = get_manifest(&d, path, &[DOCKER_SCHEMA1]).await;
    assert_eq!(
        old.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(old.bytes())
    );
    assert!(
        old.header("content-type").contains("manifest.v1"),
        "{}",
        old.header("content-type")
    );
    let converted = old.header("docker-content-digest").to_string();
    assert_ne!(converted, up.docker.digest, "the registry converted it");

    let new = get_manifest(&d, path, &[CONTAINERD_ACCEPT]).await;
    assert_eq!(new.header("docker-content-digest"), up.docker.digest);
    assert_eq!(new.header("content-type"), DOCKER_MANIFEST);
    let podman = get_manifest(&d, path, &CONTAINERS_IMAGE_ACCEPT).await;
    assert_eq!(podman.header("docker-content-digest"), up.docker.digest);

    // The old client again, now that schema 2 is cached: it is not given
    // a type it does not take. (The registry signs each conversion anew,
    // so its digest differs every time.)
    let old = get_manifest(&d, path, &[DOCKER_SCHEMA1]).await;
    assert!(old.header("content-type").contains("manifest.v1"));
    assert_ne!(old.header("docker-content-digest"), up.docker.digest);
    // By digest too.
    let by_digest = format!("/v2/app/docker/manifests/{}?ns=reg.test", up.docker.digest);
    let r = get_manifest(&d, &by_digest, &[CONTAINERD_ACCEPT]).await;
    assert_eq!(r.header("docker-content-digest"), up.docker.digest);

    // Nothing of schema 1 is in the cache.
    let manifests = walk(&d.cache_dir.join("manifests"));
    assert!(!manifests.is_empty());
    for f in manifests {
        let text = std::fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&text)
                .starts_with("application/vnd.docker.distribution.manifest.v1"),
            "schema 1 cached at {}",
            f.display()
        );
    }
    d.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
