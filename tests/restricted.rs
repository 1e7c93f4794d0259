//! Restricted networks: upstream connections through real proxies on
//! loopback (Debian's squid with and without credentials, dante for
//! SOCKS5), `NO_PROXY` exceptions, a proxy that refuses, and the
//! admission rules applied to the registry rather than to the proxy.

use std::time::Duration;

use http::StatusCode;

use crate::support::fake::{Behaviour, Fake};
use crate::support::image::Image;
use crate::support::real::{require, Binary, Dante, Squid};
use crate::support::{get, wait_until, Daemon};
use crate::tls::{https, Pki};

const LOGIN: (&str, &str) = ("alice", "s3cret");

fn hosts_dir(entries: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    crate::support::write_hosts(dir.path(), entries);
    dir
}

/// A TLS registry whose token service and blob storage are two more
/// hosts, so that one pull makes three kinds of upstream connection.
struct ThreeHosts {
    pki: Pki,
    registry: Fake,
    token: Fake,
    storage: Fake,
}

async fn three_hosts(img: &Image) -> ThreeHosts {
    let pki = Pki::new();
    let registry = pki.registry(false).await;
    registry.push_image("app", "v1", img);
    let token = Fake::start(Behaviour::default()).await;
    let storage = pki.registry(false).await;
    storage.push_image("app", "v1", img);
    registry.set(|b| {
        b.bearer = Some(None);
        b.realm = Some(format!("{}/token", token.url()));
        b.redirect_blobs = Some(https(&storage));
    });
    ThreeHosts {
        pki,
        registry,
        token,
        storage,
    }
}

async fn pull_all(port: u16, ns: &str, img: &Image) -> StatusCode {
    let base = format!("http://127.0.0.1:{port}/v2/app");
    let r = get(&format!("{base}/manifests/v1?ns={ns}")).await;
    if r.status != StatusCode::OK {
        return r.status;
    }
    assert_eq!(r.bytes().as_ref(), img.manifest.as_slice());
    for b in img.blobs() {
        let d = crate::support::sha256(b);
        let r = get(&format!("{base}/blobs/{d}?ns={ns}")).await;
        if r.status != StatusCode::OK {
            return r.status;
        }
    }
    StatusCode::OK
}

/// `HTTPS_PROXY`/`HTTP_PROXY` with credentials, as a systemd drop-in sets
/// them: the registry, its token service and its storage are all reached
/// through squid; `NO_PROXY` (a name and a CIDR range) goes direct; a
/// mirror the proxy refuses falls back to the next endpoint; wrong
/// credentials fail with a reason that says so.
#[tokio::test]
async fn squid_with_credentials_carries_every_upstream_connection() {
    if !require(&["squid", "htpasswd"]) {
        return;
    }
    let img = Image::build(&[("f", b"through the corporate proxy")]);
    let hosts = three_hosts(&img).await;
    // Direct by NO_PROXY: by name, and by a CIDR range (127.0.0.4/30).
    let by_name = Fake::start(Behaviour::default()).await;
    by_name.push_image("app", "v1", &img);
    let by_range = Fake::start_at("127.0.0.5", Behaviour::default()).await;
    by_range.push_image("app", "v1", &img);
    // The proxy refuses CONNECT to this mirror's port.
    let refused = Fake::start(Behaviour::default()).await;
    refused.push_image("app", "v1", &img);
    let squid = Squid::start(Some(LOGIN), &[refused.addr.port()]).await;

    let server = format!(
        "server = \"{}\"\nca = \"{}\"\n",
        https(&hosts.registry),
        hosts.pki.path("ca.pem")
    );
    let wrong = squid.url(Some(("alice", "wrong")));
    let dir = hosts_dir(&[
        ("reg.test", server.clone()),
        (
            "named.test",
            format!("server = \"http://localhost:{}\"\n", by_name.addr.port()),
        ),
        ("range.test", format!("server = \"{}\"\n", by_range.url())),
        (
            "fallback.test",
            format!(
                "{server}\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                refused.url()
            ),
        ),
        ("wrong.test", format!("proxy = \"{wrong}\"\n{server}")),
    ]);
    let proxy = squid.url(Some(LOGIN));
    let d = Binary::start_with(
        dir.path(),
        None,
        "",
        &[],
        &[
            ("HTTPS_PROXY", &proxy),
            ("HTTP_PROXY", &proxy),
            ("NO_PROXY", "localhost,127.0.0.4/30"),
        ],
        None,
    )
    .await;

    for ns in ["reg.test", "named.test", "range.test", "fallback.test"] {
        let status = pull_all(d.port, ns, &img).await;
        assert_eq!(status, StatusCode::OK, "{ns}: {}", d.proc.log_text());
    }
    assert!(
        refused.seen().is_empty(),
        "the refused mirror was reached around the proxy"
    );
    assert!(hosts.token.hits("/token") > 0, "no token was asked for");
    assert!(
        hosts.storage.hits("/storage/") > 0,
        "no redirect was followed"
    );
    let r = get(&format!(
        "http://127.0.0.1:{}/v2/app/manifests/v1?ns=wrong.test",
        d.port
    ))
    .await;
    assert_ne!(r.status, StatusCode::OK);
    assert!(
        d.proc
            .log_text()
            .contains("proxy authorization required (407)"),
        "{}",
        d.proc.log_text()
    );
    assert!(
        d.proc.log_text().contains("refused the CONNECT"),
        "{}",
        d.proc.log_text()
    );

    // squid logs a tunnel when it closes: stop the daemon first.
    drop(d);
    let port_of = |f: &Fake| format!("127.0.0.1:{} alice", f.addr.port());
    for (what, needle) in [
        ("registry", port_of(&hosts.registry)),
        ("token service", port_of(&hosts.token)),
        ("storage", port_of(&hosts.storage)),
    ] {
        wait_until(
            &format!("a CONNECT to the {what}"),
            Duration::from_secs(10),
            || squid.connects().iter().any(|l| l.contains(&needle)),
        )
        .await;
    }
    let connects = squid.connects().join("\n");
    for direct in [by_name.addr.port(), by_range.addr.port()] {
        assert!(
            !connects.contains(&format!(":{direct} ")),
            "a NO_PROXY host went through the proxy: {connects}"
        );
    }
    assert!(
        connects.contains(&format!(
            "TCP_DENIED/403 0 CONNECT 127.0.0.1:{}",
            refused.addr.port()
        )) || connects.contains(&format!("CONNECT 127.0.0.1:{}", refused.addr.port())),
        "{connects}"
    );
}

/// `socks5://` set for one namespace in its hosts.toml, `socks5h://` (the
/// proxy resolves the name) for another, and config.toml's `proxy =
/// "none"` for the rest whatever the environment says; a target the
/// SOCKS server blocks gets a clear error.
#[tokio::test]
async fn dante_carries_the_namespaces_that_name_it() {
    if !require(&["danted"]) {
        return;
    }
    let img = Image::build(&[("f", b"through socks")]);
    let up = Fake::start(Behaviour::default()).await;
    up.push_image("app", "v1", &img);
    let blocked = Fake::start(Behaviour::default()).await;
    blocked.push_image("app", "v1", &img);
    let other = Fake::start(Behaviour::default()).await;
    other.push_image("app", "v1", &img);
    let dante = Dante::start(&[up.addr.port()]).await;
    let socks = format!("socks5://127.0.0.1:{}", dante.port);
    let socks_h = format!("socks5h://127.0.0.1:{}", dante.port);
    let dir = hosts_dir(&[
        (
            "socks.test",
            format!("proxy = \"{socks}\"\nserver = \"{}\"\n", up.url()),
        ),
        (
            "remote-dns.test",
            format!(
                "proxy = \"{socks_h}\"\nserver = \"http://localhost:{}\"\n",
                up.addr.port()
            ),
        ),
        (
            "blocked.test",
            format!("proxy = \"{socks}\"\nserver = \"{}\"\n", blocked.url()),
        ),
        ("direct.test", format!("server = \"{}\"\n", other.url())),
    ]);
    // The environment names a proxy that is not there: config.toml's
    // `proxy = "none"` wins.
    let d = Binary::start_with(
        dir.path(),
        None,
        "[upstream]\nproxy = \"none\"\n",
        &[],
        &[
            ("HTTPS_PROXY", "http://127.0.0.1:9"),
            ("HTTP_PROXY", "http://127.0.0.1:9"),
        ],
        None,
    )
    .await;
    for ns in ["socks.test", "remote-dns.test", "direct.test"] {
        let status = pull_all(d.port, ns, &img).await;
        assert_eq!(status, StatusCode::OK, "{ns}: {}", d.proc.log_text());
    }
    let r = get(&format!(
        "http://127.0.0.1:{}/v2/app/manifests/v1?ns=blocked.test",
        d.port
    ))
    .await;
    assert_ne!(r.status, StatusCode::OK);
    assert!(blocked.seen().is_empty(), "the blocked target was reached");
    wait_until(
        "the SOCKS refusal in the log",
        Duration::from_secs(10),
        || d.proc.log_text().contains("SOCKS"),
    )
    .await;
    let log = dante.log();
    let up_port = format!("127.0.0.1.{}", up.addr.port());
    assert!(
        log.lines()
            .any(|l| l.contains("pass") && l.contains(&up_port)),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("block")
                && l.contains(&format!("127.0.0.1.{}", blocked.addr.port()))),
        "{log}"
    );
    assert!(
        !log.contains(&format!(".{} ", other.addr.port()))
            && !log.contains(&format!(".{}\n", other.addr.port())),
        "the namespace without a proxy went through dante: {log}"
    );
}

/// The proxy is on loopback and is used; a registry named by a request
/// alone must still be public, judged here before the proxy is asked, so
/// the proxy cannot be used to reach the node's private network.
#[tokio::test]
async fn admission_judges_the_registry_not_the_proxy() {
    if !require(&["squid"]) {
        return;
    }
    let img = Image::build(&[("f", b"admission behind a proxy")]);
    let inside = Fake::start(Behaviour::default()).await;
    inside.push_image("app", "v1", &img);
    let squid = Squid::start(None, &[]).await;
    let mut upstream = crate::support::quick_upstream();
    upstream.proxy = Some(squid.url(None));
    let d = Daemon::builder()
        .hosts("inside.test", format!("server = \"{}\"\n", inside.url()))
        .upstream(upstream)
        .start()
        .await;
    // Configured in hosts.d: trusted as written, through the proxy.
    let r = get(&d.url("/v2/app/manifests/v1?ns=inside.test")).await;
    assert_eq!(r.status, StatusCode::OK);
    // Named by the request alone: refused before any CONNECT.
    let seen_before = inside.seen().len();
    for ns in [
        format!("localhost:{}", inside.addr.port()),
        format!("127.0.0.1:{}", inside.addr.port()),
    ] {
        let r = get(&d.url(&format!("/v2/app/manifests/v1?ns={ns}"))).await;
        assert_ne!(r.status, StatusCode::OK, "{ns}");
    }
    assert_eq!(
        inside.seen().len(),
        seen_before,
        "a private address was reached"
    );
    d.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let connects = squid.connects().join("\n");
    assert!(
        !connects.contains("localhost"),
        "the proxy was asked for a private name: {connects}"
    );
}

/// A proxy the daemon cannot use, named by the environment, stops it at
/// start with the reason (rather than pulls going around it).
#[test]
fn a_proxy_the_daemon_cannot_use_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("hosts")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args(["check-config", "--config", "/dev/null", "--hosts-dir"])
        .arg(dir.path().join("hosts"))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .env("HTTPS_PROXY", "https://proxy.corp:3128")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let said = crate::support::output_text(&out);
    assert!(
        said.contains("in the environment: TLS to the proxy (https://) is not supported"),
        "{said}"
    );
}

/// Cluster peers are reached directly whatever proxy the upstreams use:
/// with config.toml naming a proxy that is not there (the registry itself
/// set to `proxy = "none"`), a node still gets a blob from its owner, and
/// the upstream sends it once.
#[tokio::test]
async fn cluster_peers_never_go_through_the_proxy() {
    use crate::cluster::{owned_by, port_on, settings, Pki};
    use std::net::Ipv4Addr;
    let up = Fake::start(Behaviour::default()).await;
    let pki = Pki::new();
    let me = port_on(Ipv4Addr::new(127, 0, 79, 1));
    let owner = port_on(Ipv4Addr::new(127, 0, 79, 2));
    let members = [me, owner];
    let (content, digest) = owned_by(&members, owner, 1 << 20, 4242);
    up.put_blob("app", &content);
    let hosts = format!("proxy = \"none\"\nserver = \"{}\"\n", up.url());
    let mut nodes = Vec::new();
    for (name, at) in [("me", me), ("owner", owner)] {
        let mut upstream = crate::support::quick_upstream();
        upstream.proxy = Some("http://127.0.0.1:9".into());
        nodes.push(
            Daemon::builder()
                .hosts("shared.test", hosts.clone())
                .upstream(upstream)
                .cluster(settings(&pki, name, at, &members))
                .start()
                .await,
        );
    }
    let r = get(&nodes[0].url(&format!("/v2/app/blobs/{digest}?ns=shared.test"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.bytes().as_ref(), content.as_slice());
    assert_eq!(up.hits(&format!("/blobs/{digest}")), 1);
    // The owner fetched it for the cluster: the node asked it as a peer.
    let path = nodes[1].blob_path(&digest);
    wait_until("the blob at its owner", Duration::from_secs(10), || {
        path.exists()
    })
    .await;
    for d in nodes {
        d.stop().await;
    }
}
