//! What an operator meets: credentials keyed the way docker and podman
//! write them (and credential helpers), a credentials file watched
//! wherever it is, refused credentials said as such, and registries that
//! label manifests with the wrong type. Real components: Debian's
//! docker-registry with htpasswd, a credential helper program, containerd.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::image::{Image, DOCKER_MANIFEST, OCI_MANIFEST};
use crate::support::real::{require, Binary, Registry};
use crate::support::{get, request, wait_for, write_hosts};

/// `docker-credential-<name>` in `dir`, answering `robot`/`s3cret` for
/// any server and counting its calls in `<dir>/<name>.calls`.
fn helper(dir: &Path, name: &str, body: &str) {
    let p = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\necho called >> {}/{name}.calls\n{body}\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

const ROBOT: &str =
    r#"read server; printf '{"ServerURL":"%s","Username":"robot","Secret":"s3cret"}' "$server""#;

fn calls(dir: &Path, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("{name}.calls"))).map_or(0, |t| t.lines().count())
}

/// A registry with htpasswd auth, and credentials for it written every way
/// docker and podman write them, one after the other into a credentials
/// file outside the config folder (each edit applies by itself): by the
/// registry's name, by `host:port`, Docker Hub's `https://index.docker.io/v1/`,
/// a `credHelpers` helper (asked once for several pulls) and `credsStore`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_as_docker_and_podman_write_them() {
    if !require(&["docker-registry", "htpasswd"]) {
        return;
    }
    let reg = Registry::with_htpasswd("robot", "s3cret").await;
    let img = Image::build(&[("f", b"behind a password")]);
    // A repository of its own for each way of writing the credentials,
    // so that each pull reaches the registry.
    for repo in [
        "team/a",
        "team/b",
        "library/c",
        "team/d",
        "team/e",
        "team/f",
        "team/g",
    ] {
        reg.push(repo, "v1", &img).await;
    }
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[
            ("corp.test", hosts_toml(&[], Some(&reg.url()))),
            ("docker.io", hosts_toml(&[], Some(&reg.url()))),
        ],
    );
    // The credentials file in a folder of its own; helpers on the PATH.
    let creds = tempfile::tempdir().unwrap();
    let auth = creds.path().join("auth.json");
    std::fs::write(&auth, "{}").unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    helper(bin_dir.path(), "nmtest", ROBOT);
    helper(bin_dir.path(), "nmstore", ROBOT);
    let path = format!(
        "{}:{}",
        bin_dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "",
        &["--auth-file", auth.to_str().unwrap()],
        &[("PATH", &path)],
        None,
    )
    .await;
    let url = |ns: &str, repo: &str| {
        format!(
            "http://127.0.0.1:{}/v2/{repo}/manifests/v1?ns={ns}",
            bin.port
        )
    };
    let accept = [("accept", OCI_MANIFEST)];
    // Without credentials: the registry asks for them; none are sent.
    let r = request(Method::GET, &url("corp.test", "team/a"), &accept).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let port = reg.port;
    for (json, ns, repo) in [
        (
            r#"{"auths": {"corp.test": {"username": "robot", "password": "s3cret"}}}"#.to_string(),
            "corp.test",
            "team/a",
        ),
        (
            format!(r#"{{"auths": {{"127.0.0.1:{port}": {{"auth": "cm9ib3Q6czNjcmV0"}}}}}}"#),
            "corp.test",
            "team/b",
        ),
        (
            r#"{"auths": {"https://index.docker.io/v1/": {"auth": "cm9ib3Q6czNjcmV0"}}}"#
                .to_string(),
            "docker.io",
            "library/c",
        ),
        (
            r#"{"credHelpers": {"corp.test": "nmtest"}}"#.to_string(),
            "corp.test",
            "team/d",
        ),
        (
            r#"{"credsStore": "nmstore"}"#.to_string(),
            "corp.test",
            "team/e",
        ),
    ] {
        std::fs::write(&auth, &json).unwrap();
        let u = url(ns, repo);
        wait_for(&format!("{json} to apply"), Duration::from_secs(10), || {
            let u = u.clone();
            async move {
                let r = request(Method::GET, &u, &[("accept", OCI_MANIFEST)]).await;
                r.status == StatusCode::OK
            }
        })
        .await;
        let r = request(Method::GET, &u, &accept).await;
        assert_eq!(r.header("docker-content-digest"), img.digest, "{json}");
    }
    // The store was asked once for several pulls of several repositories.
    let before = calls(bin_dir.path(), "nmstore");
    for repo in ["team/f", "team/g"] {
        let r = request(Method::GET, &url("corp.test", repo), &accept).await;
        assert_eq!(r.status, StatusCode::OK, "{repo}");
    }
    assert_eq!(calls(bin_dir.path(), "nmstore"), before, "asked again");
    assert!(calls(bin_dir.path(), "nmtest") >= 1);
}

/// A helper that never answers is given up after a bounded time: the pull
/// fails quickly instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_helper_that_hangs_is_given_up() {
    if !require(&["docker-registry", "htpasswd"]) {
        return;
    }
    let reg = Registry::with_htpasswd("robot", "s3cret").await;
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[("corp.test", hosts_toml(&[], Some(&reg.url())))],
    );
    let bin_dir = tempfile::tempdir().unwrap();
    helper(bin_dir.path(), "slow", "sleep 60");
    let creds = tempfile::tempdir().unwrap();
    let auth = creds.path().join("auth.json");
    std::fs::write(&auth, r#"{"credHelpers": {"corp.test": "slow"}}"#).unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.path().display(),
        std::env::var("PATH").unwrap()
    );
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "[upstream]\nfirst_byte_timeout = \"30s\"\n",
        &["--auth-file", auth.to_str().unwrap()],
        &[("PATH", &path)],
        None,
    )
    .await;
    let began = Instant::now();
    let r = get(&format!(
        "http://127.0.0.1:{}/v2/team/app/manifests/v1?ns=corp.test",
        bin.port
    ))
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "{:?}",
        began.elapsed()
    );
    bin.proc.wait_for_log("no answer within 10s").await;
}

/// Credentials the registry refuses: the client gets 403 DENIED saying so
/// (not 404), the log has one warning line naming the registry, the
/// endpoint and the status, and a metric counts it. A repository that is
/// not there, with good credentials, is still a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_said_as_such() {
    if !require(&["docker-registry", "htpasswd"]) {
        return;
    }
    let reg = Registry::with_htpasswd("robot", "s3cret").await;
    let img = Image::build(&[("f", b"refused")]);
    reg.push("team/app", "v1", &img).await;
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[("corp.test", hosts_toml(&[], Some(&reg.url())))],
    );
    let creds = tempfile::tempdir().unwrap();
    let auth = creds.path().join("auth.json");
    std::fs::write(
        &auth,
        r#"{"auths": {"corp.test": {"username": "robot", "password": "wrong"}}}"#,
    )
    .unwrap();
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "",
        &["--auth-file", auth.to_str().unwrap()],
        &[],
        None,
    )
    .await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    let r = get(&format!("{base}/v2/team/app/manifests/v1?ns=corp.test")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "DENIED");
    assert!(String::from_utf8_lossy(r.bytes()).contains("refused the credentials"));
    bin.proc
        .wait_for_log("the upstream registry refused the credentials")
        .await;
    let log = bin.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refused the credentials"))
        .unwrap();
    for says in [
        "registry=corp.test",
        &format!("127.0.0.1:{}", reg.port),
        "status=401",
    ] {
        assert!(line.contains(says), "{line}");
    }
    let metrics =
        String::from_utf8_lossy(get(&format!("{base}/metrics")).await.bytes()).to_string();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("nodemirror_upstream_credentials_refused_total")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    // Good credentials: not there is 404.
    std::fs::write(
        &auth,
        r#"{"auths": {"corp.test": {"username": "robot", "password": "s3cret"}}}"#,
    )
    .unwrap();
    let missing = format!("{base}/v2/team/nothing/manifests/v1?ns=corp.test");
    wait_for("the good credentials", Duration::from_secs(10), || {
        let u = format!("{base}/v2/team/app/manifests/v1?ns=corp.test");
        async move { crate::support::answers_ok(&u).await }
    })
    .await;
    assert_eq!(get(&missing).await.status, StatusCode::NOT_FOUND);
}

/// A registry (a proxy in front of one, in the wild) that serves OCI image
/// manifests labelled as Docker manifests: the body's own type and the
/// digest decide, the answer carries the body's type, and a real
/// containerd pulls the image through the daemon; a body that is no
/// manifest is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_labelled_with_another_type_is_served_as_what_it_is() {
    let up = Fake::start(Behaviour::default()).await;
    let img = Image::build(&[("f", b"mislabelled")]);
    for blob in img.blobs() {
        up.put_blob("team/app", blob);
    }
    up.put_manifest("team/app", Some("v1"), DOCKER_MANIFEST, &img.manifest);
    up.put_manifest(
        "team/app",
        Some("junk"),
        DOCKER_MANIFEST,
        br#"{"hello":"world"}"#,
    );
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[("mislabel.test", hosts_toml(&[], Some(&up.url())))],
    );
    let bin = Binary::start(hosts.path(), &[]).await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    let r = request(
        Method::GET,
        &format!("{base}/v2/team/app/manifests/v1?ns=mislabel.test"),
        &[("accept", crate::support::image::CONTAINERD_ACCEPT)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), OCI_MANIFEST);
    assert_eq!(r.header("docker-content-digest"), img.digest);
    let r = get(&format!(
        "{base}/v2/team/app/manifests/junk?ns=mislabel.test"
    ))
    .await;
    assert_ne!(r.status, StatusCode::OK, "not a manifest");
    if require(&["containerd", "ctr"]) {
        let certs = tempfile::tempdir().unwrap();
        write_hosts(
            certs.path(),
            &[(
                "_default",
                format!(
                    "server = \"http://127.0.0.1:9\"\n\n[host.\"http://127.0.0.1:{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                    bin.port
                ),
            )],
        );
        let ctrd = crate::support::real::Containerd::start().await;
        let out = ctrd.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            certs.path().to_str().unwrap(),
            "mislabel.test/team/app:v1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = ctrd.ctr(&["images", "ls"]);
        assert!(String::from_utf8_lossy(&listed.stdout).contains(&img.digest));
    }
}
