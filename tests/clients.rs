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

/// A daemon with `reg.test` served by `up`'s registry.
async fn daemon_on(up: &Upstream) -> Daemon {
    Daemon::builder()
        .hosts("reg.test", hosts_toml(&[], Some(&up.reg.url())))
        .start()
        .await
}

/// GET with one `Accept` line per entry of `accept`.
async fn get_accepting(d: &Daemon, path: &str, accept: &[&str]) -> Reply {
    let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("accept", *a)).collect();
    request(Method::GET, &d.url(path), &headers).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accept_line_counts() {
    if !require(&["docker-registry"]) {
        return;
    }
    let up = upstream().await;
    let d = daemon_on(&up).await;
    for (repo, digest, media_type) in [
        ("app/oci", &up.oci_index, OCI_INDEX),
        ("app/list", &up.docker_list, DOCKER_LIST),
        ("app/docker", &up.docker.digest, DOCKER_MANIFEST),
    ] {
        // containers/image's lines; then containerd's one line.
        for accept in [&CONTAINERS_IMAGE_ACCEPT[..], &[CONTAINERD_ACCEPT]] {
            let path = format!("/v2/{repo}/manifests/v1?ns=reg.test");
            let r = get_accepting(&d, &path, accept).await;
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
    let d = daemon_on(&up).await;
    let path = "/v2/app/docker/manifests/v1?ns=reg.test";
    let old = get_accepting(&d, path, &[DOCKER_SCHEMA1]).await;
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

    let new = get_accepting(&d, path, &[CONTAINERD_ACCEPT]).await;
    assert_eq!(new.header("docker-content-digest"), up.docker.digest);
    assert_eq!(new.header("content-type"), DOCKER_MANIFEST);
    let podman = get_accepting(&d, path, &CONTAINERS_IMAGE_ACCEPT).await;
    assert_eq!(podman.header("docker-content-digest"), up.docker.digest);

    // The old client again, now that schema 2 is cached: it is not given
    // a type it does not take. (The registry signs each conversion anew,
    // so its digest differs every time.)
    let old = get_accepting(&d, path, &[DOCKER_SCHEMA1]).await;
    assert!(old.header("content-type").contains("manifest.v1"));
    assert_ne!(old.header("docker-content-digest"), up.docker.digest);
    // By digest too.
    let by_digest = format!("/v2/app/docker/manifests/{}?ns=reg.test", up.docker.digest);
    let r = get_accepting(&d, &by_digest, &[CONTAINERD_ACCEPT]).await;
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

pub fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
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

/// Without `?ns=`, a first path component that names a registry (host-like
/// or configured in hosts.d) routes there; anything else is the default
/// registry's repository.
#[tokio::test]
async fn requests_without_ns_are_routed_by_their_path_prefix() {
    use crate::support::fake::{Behaviour, Fake};
    let hub = Fake::start(Behaviour::default()).await;
    let other = Fake::start(Behaviour::default()).await;
    let local = Fake::start(Behaviour::default()).await;
    let (a, b, c) = (
        Image::build(&[("a", b"hub's team/app")]),
        Image::build(&[("b", b"registry-b's team/app")]),
        Image::build(&[("c", b"a configured single-label registry")]),
    );
    hub.push_image("team/app", "v1", &a);
    other.push_image("team/app", "v1", &b);
    local.push_image("team/app", "v1", &c);
    let d = Daemon::builder()
        .hosts("docker.io", hosts_toml(&[], Some(&hub.url())))
        .hosts("registry-b.test:5000", hosts_toml(&[], Some(&other.url())))
        .hosts("myreg", hosts_toml(&[], Some(&local.url())))
        .start()
        .await;
    for (path, want) in [
        ("/v2/team/app/manifests/v1", &a.digest),
        ("/v2/docker.io/team/app/manifests/v1", &a.digest),
        ("/v2/registry-b.test:5000/team/app/manifests/v1", &b.digest),
        ("/v2/myreg/team/app/manifests/v1", &c.digest),
        // ?ns= (containerd) is unchanged.
        (
            "/v2/team/app/manifests/v1?ns=registry-b.test:5000",
            &b.digest,
        ),
    ] {
        let r = get_accepting(&d, path, &CONTAINERS_IMAGE_ACCEPT).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("docker-content-digest"), want.as_str(), "{path}");
    }
    // Blobs too.
    let blob = crate::support::sha256(&b.layers[0]);
    let r = request(
        Method::GET,
        &d.url(&format!("/v2/registry-b.test:5000/team/app/blobs/{blob}")),
        &[],
    )
    .await;
    assert_eq!(r.bytes().as_ref(), b.layers[0].as_slice());
    assert_eq!(hub.hits("/blobs/"), 0);
    d.stop().await;
}

/// tags/list (with paging and a Link back to the mirror), _catalog and
/// referrers pass through, by ?ns= and by path prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_referrers_apis_pass_through() {
    if !require(&["docker-registry"]) {
        return;
    }
    use crate::support::fake::{Behaviour, Fake};
    let reg = Registry::start().await;
    let img = Image::build(&[("t", b"tagged")]);
    for tag in ["a", "b", "c"] {
        reg.push("team/app", tag, &img).await;
    }
    reg.push("team/other", "v1", &img).await;
    let referrers = Fake::start(Behaviour::default()).await;
    let index_body = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":1,"artifactType":"application/x.sig"}}]}}"#,
        img.digest
    );
    referrers.put_at(
        &format!("team/app/referrers/{}", img.digest),
        OCI_INDEX,
        index_body.as_bytes(),
    );
    let d = Daemon::builder()
        .hosts("reg.test:5000", hosts_toml(&[], Some(&reg.url())))
        .hosts("sig.test", hosts_toml(&[], Some(&referrers.url())))
        .start()
        .await;

    for path in [
        "/v2/team/app/tags/list?ns=reg.test:5000",
        "/v2/reg.test:5000/team/app/tags/list",
    ] {
        let r = get_accepting(&d, path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        let v: serde_json::Value = serde_json::from_slice(r.bytes()).unwrap();
        let mut tags: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
        tags.sort();
        assert_eq!(tags, ["a", "b", "c"], "{path}");
    }
    // Paging (distribution 2.8 pages the catalog; its tags/list does not
    // page): the Link points back at the mirror, with the client's ns.
    let r = get_accepting(&d, "/v2/_catalog?ns=reg.test:5000&n=1", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(r.bytes()).unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["team/app"]));
    let link = r.header("link").to_string();
    assert!(link.starts_with("</v2/_catalog?"), "{link}");
    assert!(
        link.contains("last=team%2Fapp") && link.contains("ns=reg.test%3A5000"),
        "{link}"
    );
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let r = get_accepting(&d, next, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{next}");
    let v: serde_json::Value = serde_json::from_slice(r.bytes()).unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["team/other"]),
        "{next}"
    );
    let r = get_accepting(&d, "/v2/team/nope/tags/list?ns=reg.test:5000", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "NAME_UNKNOWN");

    let path = format!(
        "/v2/sig.test/team/app/referrers/{}?artifactType=application%2Fx.sig",
        img.digest
    );
    let r = get_accepting(&d, &path, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), OCI_INDEX);
    assert_eq!(r.bytes().as_ref(), index_body.as_bytes());
    assert!(referrers
        .seen()
        .iter()
        .any(|s| s.uri.contains("artifactType=application%2Fx.sig")));
    d.stop().await;
}

/// Real containers/image clients through `nodemirror crio install`'s
/// drop-in: skopeo inspects and podman pulls a multi-arch OCI index and a
/// Docker schema 2 image of a registry whose own address is a closed
/// loopback port, so they can only succeed through the mirror (and a
/// failure never looks a name up); skopeo lists tags from the mirror
/// addressed with a path prefix. Uninstall removes the drop-in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_and_podman_pull_through_the_crio_drop_in() {
    if !require(&["docker-registry", "skopeo", "podman"]) {
        return;
    }
    use crate::support::real::Binary;
    use std::process::Command;
    let up = upstream().await;
    let hosts = tempfile::tempdir().unwrap();
    // The registry's own address is closed: only the mirror can serve.
    let registry = "127.0.0.1:9";
    crate::support::write_hosts(
        hosts.path(),
        &[(registry, format!("server = \"{}\"\n", up.reg.url()))],
    );
    let nm = Binary::start(hosts.path(), &[]).await;
    let work = tempfile::tempdir().unwrap();
    let conf_d = work.path().join("registries.conf.d");
    let nm_cmd = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nodemirror"))
            .args(args)
            .arg("--state-dir")
            .arg(work.path().join("state"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mirror = format!("http://127.0.0.1:{}", nm.port);
    let config = nm.config_file();
    let said = nm_cmd(&[
        "crio",
        "install",
        "--dir",
        conf_d.to_str().unwrap(),
        "--mirror",
        &mirror,
        "--config",
        config.to_str().unwrap(),
        "--hosts-dir",
        hosts.path().to_str().unwrap(),
    ]);
    assert!(said.starts_with("updated"), "{said}");
    let drop_in = conf_d.join("50-nodemirror.conf");
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}:\n{}\n--- nodemirror ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            nm.proc.log_text()
        );
        out.stdout
    };
    let skopeo = || {
        let mut c = Command::new("skopeo");
        c.arg("--registries-conf").arg(&drop_in);
        c
    };
    let raw = run(skopeo().args([
        "inspect",
        "--raw",
        &format!("docker://{registry}/app/oci:v1"),
    ]));
    assert_eq!(crate::support::sha256(&raw), up.oci_index);
    let info = run(skopeo().args([
        "inspect",
        "--no-tags",
        &format!("docker://{registry}/app/docker:v1"),
    ]));
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    assert_eq!(info["Digest"], up.docker.digest.as_str());
    let prefixed = format!("docker://127.0.0.1:{}/127.0.0.1_9/app/oci", nm.port);
    let tags = run(Command::new("skopeo").args(["list-tags", "--tls-verify=false", &prefixed]));
    let tags: serde_json::Value = serde_json::from_slice(&tags).unwrap();
    assert!(
        tags["Tags"].as_array().unwrap().iter().any(|t| t == "v1"),
        "{tags}"
    );

    // podman, as CRI-O would: it reads the same file.
    let storage = work.path().join("podman");
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_REGISTRIES_CONF", &drop_in)
            .arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "none",
            ])
            .args(args);
        run(&mut c)
    };
    for (image, digest) in [
        ("app/docker:v1", &up.docker.digest),
        ("app/oci:v1", &up.oci_index),
    ] {
        let reference = format!("{registry}/{image}");
        podman(&["pull", "--quiet", &reference]);
        let got = podman(&["image", "inspect", "--format", "{{.Digest}}", &reference]);
        assert_eq!(
            String::from_utf8_lossy(&got).trim(),
            digest.as_str(),
            "{reference}"
        );
    }
    let log = nm.proc.log_text();
    assert!(log.contains("ns=127.0.0.1:9"), "{log}");

    let said = nm_cmd(&["crio", "uninstall"]);
    assert!(said.starts_with("restored"), "{said}");
    assert!(!drop_in.exists());
}
