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

/// The binary with `auth` as its credentials file and the credential
/// helpers in `helpers` first on its PATH.
async fn with_helpers(hosts: &Path, config: &str, auth: &Path, helpers: &Path) -> Binary {
    let path = format!("{}:{}", helpers.display(), std::env::var("PATH").unwrap());
    Binary::start_with(
        hosts,
        None,
        config,
        &["--auth-file", auth.to_str().unwrap()],
        &[("PATH", &path)],
        None,
    )
    .await
}

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
    let bin = with_helpers(hosts.path(), "", &auth, bin_dir.path()).await;
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
    let config = "[upstream]\nfirst_byte_timeout = \"30s\"\n";
    let bin = with_helpers(hosts.path(), config, &auth, bin_dir.path()).await;
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
        let certs = crate::e2e::certs_to(bin.port);
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

/// The sum and count of a histogram's series, from `/metrics`.
async fn histogram(d: &crate::support::Daemon, name: &str, labels: &str) -> (f64, u64) {
    let text = String::from_utf8_lossy(get(&d.url("/metrics")).await.bytes()).to_string();
    let value = |suffix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix}{{{labels}}} ")))
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    (value("sum"), value("count") as u64)
}

/// Latency an operator can graph: a blob fetched from a registry that
/// sends 1 MiB a second shows a fetch of a second or more in
/// `nodemirror_upstream_fetch_duration_seconds`, and its request's first
/// byte well before its last. A cached 24 MiB blob (sent with sendfile)
/// read by a client at about 12 MiB/s shows a request duration of the
/// client's pace, not the moment the daemon handed the file over; its
/// first byte is quick. Registries named by requests alone are `other`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_histograms_cover_the_whole_transfer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let slow = Fake::trickling(1 << 20).await;
    let small = crate::support::noise(1 << 20, 71);
    let small_digest = slow.put_blob("app", &small);
    let fast = Fake::start(Behaviour::default()).await;
    let big = crate::support::noise(24 << 20, 72);
    let big_digest = fast.put_blob("app", &big);
    let d = crate::support::Daemon::builder()
        .hosts("slow-hist.test", hosts_toml(&[], Some(&slow.url())))
        .hosts("fast-hist.test", hosts_toml(&[], Some(&fast.url())))
        .start()
        .await;

    let r = get(&d.url(&format!("/v2/app/blobs/{small_digest}?ns=slow-hist.test"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes().len(), small.len());
    // The fetch ends (verified and committed) just after the last byte.
    let fetch_labels = "ns=\"slow-hist.test\",kind=\"blob\",result=\"ok\"";
    let name = "nodemirror_upstream_fetch_duration_seconds";
    wait_for("the fetch's duration", Duration::from_secs(10), || async {
        histogram(&d, name, fetch_labels).await.1 == 1
    })
    .await;
    let (fetch, n) = histogram(&d, name, fetch_labels).await;
    assert!(n == 1 && fetch >= 0.7, "fetch took {fetch} s ({n})");
    let labels = "ns=\"slow-hist.test\",kind=\"blob\",status_class=\"2xx\"";
    let (whole, n) = histogram(&d, "nodemirror_request_duration_seconds", labels).await;
    assert!(n == 1 && whole >= 0.7, "request took {whole} s ({n})");
    let (first, _) = histogram(&d, "nodemirror_request_first_byte_seconds", labels).await;
    assert!(first < whole / 2.0, "first byte {first} s of {whole} s");

    // Cached: warm it, then read it slowly over a small receive buffer.
    let path = format!("/v2/app/blobs/{big_digest}?ns=fast-hist.test");
    assert_eq!(get(&d.url(&path)).await.bytes().len(), big.len());
    let labels = "ns=\"fast-hist.test\",kind=\"blob\",status_class=\"2xx\"";
    let before = histogram(&d, "nodemirror_request_duration_seconds", labels).await;
    let first_before = histogram(&d, "nodemirror_request_first_byte_seconds", labels).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 << 10).unwrap();
    let mut conn = socket.connect(d.addr).await.unwrap();
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut read = 0usize;
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        read += n;
        // About 12 MiB a second.
        let due = Duration::from_secs_f64(read as f64 / (12 << 20) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    assert!(read > big.len(), "headers and the whole body");
    let after = histogram(&d, "nodemirror_request_duration_seconds", labels).await;
    let first_after = histogram(&d, "nodemirror_request_first_byte_seconds", labels).await;
    let took = after.0 - before.0;
    assert_eq!(after.1, before.1 + 1);
    assert!(
        took >= 1.0,
        "the cached blob's request took {took} s by the histogram; the client read for {:?}",
        started.elapsed()
    );
    assert!(first_after.0 - first_before.0 < 0.5);

    // A registry named by a request alone is counted as `other`.
    let _ = get(&d.url("/v2/app/manifests/v1?ns=10.255.0.1")).await;
    let text = String::from_utf8_lossy(get(&d.url("/metrics")).await.bytes()).to_string();
    assert!(!text.contains("10.255.0.1"), "{text}");
    assert!(
        text.contains("nodemirror_request_duration_seconds_count{ns=\"other\",kind=\"manifest\"")
    );
}

/// The dashboard and alert rules the packages ship: the rules pass
/// `promtool check rules` and `promtool test rules` (each alert fires on
/// its fault and not on a healthy node), every dashboard query is valid
/// PromQL (as recording rules), the dashboard shows p50 and p99 of the
/// request, first-byte and upstream-fetch histograms, and every metric
/// they name is on `/metrics` of a running daemon (the binary, in cluster
/// mode with a dead peer, after pulls, a dead endpoint, refused
/// credentials and a collection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_ships_dashboards_and_alerts_that_name_real_metrics() {
    if !require(&["promtool", "docker-registry", "htpasswd"]) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let alerts = root.join("packaging/monitoring/nodemirror-alerts.yml");
    let dashboard = root.join("packaging/monitoring/nodemirror-dashboard.json");
    let promtool = |args: &[&str]| {
        let out = std::process::Command::new("promtool")
            .args(args)
            .output()
            .unwrap();
        let said = crate::support::output_text(&out);
        assert!(
            out.status.success() && said.contains("SUCCESS"),
            "promtool {args:?}: {said}"
        );
        said
    };
    let said = promtool(&["check", "rules", alerts.to_str().unwrap()]);
    assert!(said.contains("9 rules found"), "{said}");
    promtool(&[
        "test",
        "rules",
        root.join("tests/fixtures/monitoring/alerts-test.yml")
            .to_str()
            .unwrap(),
    ]);

    // The dashboard's queries, as recording rules promtool parses.
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{panel}");
        exprs.extend(
            targets
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string()),
        );
    }
    for histogram in [
        "nodemirror_request_duration_seconds_bucket",
        "nodemirror_request_first_byte_seconds_bucket",
        "nodemirror_upstream_fetch_duration_seconds_bucket",
    ] {
        for q in ["0.5", "0.99"] {
            assert!(
                exprs
                    .iter()
                    .any(|e| e.starts_with(&format!("histogram_quantile({q},"))
                        && e.contains(histogram)),
                "no p{q} of {histogram} on the dashboard"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        rules.push_str(&format!(
            "      - record: nodemirror:dashboard:{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    let recording = dir.path().join("dashboard.yml");
    std::fs::write(&recording, rules).unwrap();
    promtool(&["check", "rules", recording.to_str().unwrap()]);

    // A running daemon: cluster mode with one dead peer, a registry with a
    // dead first endpoint, one refusing the credentials.
    let pki = crate::cluster::Pki::new();
    let me = crate::cluster::port_on(std::net::Ipv4Addr::new(127, 0, 69, 1));
    let gone = crate::cluster::port_on(std::net::Ipv4Addr::new(127, 0, 69, 2));
    // A node watches only the members it uses: one of the image's blobs is
    // owned by the dead peer, so pulling it finds that peer down.
    let img = (0u32..)
        .map(|i| Image::build(&[("m", format!("monitored {i}").as_bytes())]))
        .find(|img| {
            img.blobs().any(|b| {
                let d = crate::support::sha256(b).parse().unwrap();
                nodemirror::cluster::rank(&[me, gone], &d)[0] == gone
            })
        })
        .unwrap();
    let reg = Registry::start().await;
    reg.push("team/app", "v1", &img).await;
    let locked = Registry::with_htpasswd("robot", "s3cret").await;
    let hosts = tempfile::tempdir().unwrap();
    let dead = crate::support::free_port();
    write_hosts(
        hosts.path(),
        &[
            (
                "reg.test",
                hosts_toml(&[format!("http://127.0.0.1:{dead}")], Some(&reg.url())),
            ),
            ("corp.test", hosts_toml(&[], Some(&locked.url()))),
        ],
    );
    let auth = dir.path().join("auth.json");
    std::fs::write(
        &auth,
        r#"{"auths": {"corp.test": {"username": "robot", "password": "wrong"}}}"#,
    )
    .unwrap();
    let bin = crate::cluster::binary_node(
        &pki,
        "a",
        me,
        &[me, gone],
        hosts.path(),
        &format!("auth_file = \"{}\"\n", auth.display()),
    )
    .await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    for _ in 0..2 {
        let m = get(&format!("{base}/v2/team/app/manifests/v1?ns=reg.test")).await;
        assert_eq!(m.status, StatusCode::OK);
        for blob in img.blobs() {
            let digest = crate::support::sha256(blob);
            let r = get(&format!("{base}/v2/team/app/blobs/{digest}?ns=reg.test")).await;
            assert_eq!(r.bytes(), &blob[..]);
        }
    }
    let r = get(&format!("{base}/v2/team/app/manifests/v1?ns=corp.test")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let gc = crate::support::request(Method::POST, &format!("{base}/cache/gc"), &[]).await;
    assert_eq!(gc.status, StatusCode::OK);
    let metrics = || async {
        String::from_utf8_lossy(get(&format!("{base}/metrics")).await.bytes()).to_string()
    };
    wait_for(
        "the dead peer seen down",
        Duration::from_secs(20),
        || async {
            metrics()
                .await
                .contains("nodemirror_cluster_peers{state=\"down\"} 1")
        },
    )
    .await;
    let text = metrics().await;
    // Sample names, and the families they belong to (a histogram's).
    let exposed: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .collect();
    let rules_text = std::fs::read_to_string(&alerts).unwrap();
    let mut named = std::collections::BTreeSet::new();
    for source in exprs
        .iter()
        .map(String::as_str)
        .chain([rules_text.as_str()])
    {
        let mut rest = source;
        while let Some(at) = rest.find("nodemirror_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            named.insert(name);
        }
    }
    // Names in the alerts' prose (`nodemirror doctor`) are not metrics.
    named.retain(|n| n != "nodemirror_");
    assert!(named.len() > 15, "{named:?}");
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !exposed.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "not on /metrics: {missing:?}\n{text}");
}
