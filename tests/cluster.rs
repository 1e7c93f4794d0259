//! Cluster mode: nodes share their caches, each blob comes from its
//! upstream once; peers talk mutual TLS; dead, corrupt and private cases;
//! membership from a DNS name served on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use nodemirror::cluster::certs;
use nodemirror::config::cluster::ClusterSettings;

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::{get, http_client, stream_on, wait_until, Daemon, Dns};

/// The cluster's CA and node certificates, in one folder.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        certs::write_ca(dir.path()).unwrap();
        Pki { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A node certificate naming `ip`: (cert, key).
    pub fn node(&self, name: &str, ip: IpAddr) -> (PathBuf, PathBuf) {
        certs::write_cert(self.path(), name, &[ip], &[], self.path()).unwrap();
        (
            self.path().join(format!("{name}.pem")),
            self.path().join(format!("{name}-key.pem")),
        )
    }
}

/// A free port on `ip`.
pub fn port_on(ip: Ipv4Addr) -> SocketAddr {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap()
}

pub fn settings(pki: &Pki, name: &str, at: SocketAddr, peers: &[SocketAddr]) -> ClusterSettings {
    let (cert, key) = pki.node(name, at.ip());
    settings_with(at, peers, pki.path().join("ca.pem"), cert, key)
}

/// A static cluster at `at` with `peers`, the test timings, and this CA and
/// node certificate.
pub fn settings_with(
    at: SocketAddr,
    peers: &[SocketAddr],
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
) -> ClusterSettings {
    ClusterSettings {
        listen: at,
        advertise: at,
        peers: peers.to_vec(),
        peers_dns: None,
        dns_server: None,
        refresh: Duration::from_secs(1),
        peer_timeout: Duration::from_millis(300),
        ca,
        cert,
        key,
    }
}

/// `n` nodes on 127.0.<net>.1 …, each with its own cache, all with
/// `hosts` and each other as static peers.
pub async fn cluster(
    pki: &Pki,
    net: u8,
    n: u8,
    hosts: &[(&str, String)],
) -> (Vec<Daemon>, Vec<SocketAddr>) {
    let addrs: Vec<SocketAddr> = (1..=n)
        .map(|i| port_on(Ipv4Addr::new(127, 0, net, i)))
        .collect();
    let mut nodes = Vec::new();
    for (i, at) in addrs.iter().enumerate() {
        let mut b = Daemon::builder().cluster(settings(pki, &format!("node{i}"), *at, &addrs));
        for (ns, text) in hosts {
            b = b.hosts(ns, text.clone());
        }
        nodes.push(b.start().await);
    }
    (nodes, addrs)
}

/// 1 MiB of seeded noise.
fn blob(seed: u64) -> Vec<u8> {
    crate::support::noise(1 << 20, seed)
}

pub fn url(d: &Daemon, ns: &str, digest: &str) -> String {
    d.url(&format!("/v2/app/blobs/{digest}?ns={ns}"))
}

async fn metric(d: &Daemon, line_start: &str) -> u64 {
    let text = String::from_utf8_lossy(get(&d.url("/metrics")).await.bytes()).to_string();
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Three nodes pull the same eight blobs at the same moment, cold: every
/// pull is right, and the upstream sends each blob once.
#[tokio::test]
async fn a_cluster_fetches_each_blob_from_its_upstream_once() {
    let up = Fake::start(Behaviour::default()).await;
    let blobs: Vec<Vec<u8>> = (0..8).map(blob).collect();
    let digests: Vec<String> = blobs.iter().map(|b| up.put_blob("app", b)).collect();
    let pki = Pki::new();
    let hosts = [("shared.test", hosts_toml(&[], Some(&up.url())))];
    let (nodes, _) = cluster(&pki, 61, 3, &hosts).await;
    let client = http_client();
    for (content, digest) in blobs.iter().zip(&digests) {
        let urls: Vec<String> = nodes
            .iter()
            .map(|d| url(d, "shared.test", digest))
            .collect();
        let pulls = urls.iter().map(|u| stream_on(&client, u, None, None));
        for (status, body) in futures_util::future::join_all(pulls).await {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
        }
    }
    for digest in &digests {
        assert_eq!(up.hits(&format!("/blobs/{digest}")), 1, "{digest}");
    }
    // (Metrics are the process's, shared by the in-process nodes and the
    // other tests: the upstream's own count is the measure here.)
    // The status lists every member and a share of the digests.
    let status = get(&nodes[0].url("/cluster/status")).await;
    let v: serde_json::Value = serde_json::from_slice(status.bytes()).unwrap();
    assert_eq!(v["members"].as_array().unwrap().len(), 3, "{v}");
    let share = v["ownership_share"].as_f64().unwrap();
    assert!((0.2..0.5).contains(&share), "{v}");
    for d in nodes {
        d.stop().await;
    }
}

/// The owner of a digest is down (its port closed): the blob comes from
/// the upstream, and the dead peer is not asked again for a while.
#[tokio::test]
async fn a_dead_owner_costs_one_refused_connect_then_is_skipped() {
    let up = Fake::start(Behaviour::default()).await;
    let pki = Pki::new();
    let alive = port_on(Ipv4Addr::new(127, 0, 62, 1));
    let dead = port_on(Ipv4Addr::new(127, 0, 62, 2));
    let members = [alive, dead];
    // Blobs the dead node owns (searches that start far apart).
    let owned: Vec<_> = (0..3)
        .map(|i| owned_by(&members, dead, 1 << 20, 100 + 1000 * i))
        .collect();
    for (b, _) in &owned {
        up.put_blob("app", b);
    }
    let node = Daemon::builder()
        .hosts("shared.test", hosts_toml(&[], Some(&up.url())))
        .cluster(settings(&pki, "alive", alive, &members))
        .start()
        .await;
    for (content, digest) in &owned {
        let (status, body) = stream_on(
            &http_client(),
            &url(&node, "shared.test", digest),
            None,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    }
    let status = get(&node.url("/cluster/status")).await;
    let text = String::from_utf8_lossy(status.bytes()).to_string();
    assert!(text.contains("failing"), "{text}");
    // One failed connect; the next blobs did not ask the dead peer first.
    let errors = metric(
        &node,
        &format!("nodemirror_upstream_errors_total{{endpoint=\"https://{dead}/v2\""),
    )
    .await;
    assert_eq!(errors, 1, "dead peer tried once");
    node.stop().await;
}

/// The owner serves a corrupt copy (its disk flipped a byte): the node
/// that asked keeps nothing corrupt, marks the owner bad, and gets the
/// blob from the upstream.
#[tokio::test]
async fn a_corrupt_peer_is_marked_bad_and_the_upstream_serves() {
    let up = Fake::start(Behaviour::default()).await;
    let pki = Pki::new();
    let hosts = [("shared.test", hosts_toml(&[], Some(&up.url())))];
    let (nodes, addrs) = cluster(&pki, 63, 2, &hosts).await;
    // A blob owned by node 1, cached there with a byte changed.
    let (content, digest) = owned_by(&addrs, addrs[1], 1 << 20, 200);
    up.put_blob("app", &content);
    let mut bad = content.clone();
    bad[1000] ^= 0xff;
    let path = nodes[1].blob_path(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &bad).unwrap();
    crate::support::write_origin(&nodes[1].cache_dir, &digest, "shared.test");
    let u = url(&nodes[0], "shared.test", &digest);
    let (status, body) = stream_on(&http_client(), &u, None, None).await;
    assert!(
        status != StatusCode::OK || body.is_err(),
        "corrupt bytes were delivered whole"
    );
    assert!(!nodes[0].blob_path(&digest).exists());
    let (status, body) = stream_on(&http_client(), &u, None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    assert_eq!(up.hits(&format!("/blobs/{digest}")), 1);
    wait_until("the good copy stored", Duration::from_secs(10), || {
        std::fs::read(nodes[0].blob_path(&digest)).is_ok_and(|b| b == content)
    })
    .await;
    for d in nodes {
        d.stop().await;
    }
}

/// Namespaces with credentials or `private = true` are not shared: each
/// node fetches for itself, and the peer port refuses them.
#[tokio::test]
async fn private_namespaces_are_not_shared() {
    let up = Fake::start(Behaviour::default()).await;
    let pki = Pki::new();
    let private = format!("private = true\n{}", hosts_toml(&[], Some(&up.url())));
    let shared_anyway = format!(
        "private = true\nshare = true\n{}",
        hosts_toml(&[], Some(&up.url()))
    );
    let hosts = [("private.test", private), ("shared.test", shared_anyway)];
    let (nodes, addrs) = cluster(&pki, 64, 2, &hosts).await;
    let (a, b) = (blob(300), blob(301));
    let (da, db) = (up.put_blob("app", &a), up.put_blob("app", &b));
    for d in &nodes {
        for (ns, content, digest) in [("private.test", &a, &da), ("shared.test", &b, &db)] {
            let (status, body) = stream_on(&http_client(), &url(d, ns, digest), None, None).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
        }
    }
    assert_eq!(
        up.hits(&format!("/blobs/{da}")),
        2,
        "private: each node fetched"
    );
    assert_eq!(
        up.hits(&format!("/blobs/{db}")),
        1,
        "share = true: fetched once"
    );
    // Asked directly with a member's certificate, the peer port refuses
    // the private namespace and tags, and answers the shared blob.
    let (cert, key) = pki.node("asker", addrs[0].ip());
    let client = mtls_client(&pki.path().join("ca.pem"), Some((&cert, &key)));
    let peer = |path: &str| format!("https://{}{path}", addrs[1]);
    let (status, _) = peer_get(
        &client,
        &peer(&format!("/v2/app/blobs/{da}?ns=private.test")),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = peer_get(&client, &peer("/v2/app/manifests/latest?ns=shared.test"))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, len) = peer_get(
        &client,
        &peer(&format!("/v2/app/blobs/{db}?ns=shared.test")),
    )
    .await
    .unwrap();
    assert_eq!((status, len), (StatusCode::OK, b.len()));
    for d in nodes {
        d.stop().await;
    }
}

/// The peer port answers nothing without a certificate from the cluster's
/// CA that names a member's address.
#[tokio::test]
async fn the_peer_port_wants_a_members_certificate() {
    let up = Fake::start(Behaviour::default()).await;
    let content = blob(400);
    let digest = up.put_blob("app", &content);
    let pki = Pki::new();
    let hosts = [("shared.test", hosts_toml(&[], Some(&up.url())))];
    let (nodes, addrs) = cluster(&pki, 65, 1, &hosts).await;
    let ca = pki.path().join("ca.pem");
    let target = format!("https://{}/v2/app/blobs/{digest}?ns=shared.test", addrs[0]);
    // No client certificate.
    let none = mtls_client(&ca, None);
    assert!(peer_get(&none, &target).await.is_err());
    // A certificate from another CA.
    let other = Pki::new();
    let (cert, key) = other.node("stranger", IpAddr::V4(Ipv4Addr::new(127, 0, 65, 1)));
    let stranger = mtls_client(&ca, Some((&cert, &key)));
    assert!(peer_get(&stranger, &target).await.is_err());
    // The right CA, but an address that is not a member.
    let (cert, key) = pki.node("outsider", IpAddr::V4(Ipv4Addr::new(127, 0, 65, 99)));
    let outsider = mtls_client(&ca, Some((&cert, &key)));
    assert!(peer_get(&outsider, &target).await.is_err());
    // A member's certificate.
    let (cert, key) = pki.node("member", addrs[0].ip());
    let member = mtls_client(&ca, Some((&cert, &key)));
    let (status, len) = peer_get(&member, &target).await.unwrap();
    assert_eq!((status, len), (StatusCode::OK, content.len()));
    for d in nodes {
        d.stop().await;
    }
}

/// A node at 127.0.<net>.1 whose members are the A records of a name
/// that `dns` answers (as set before), with `hosts`.
pub async fn dns_node(
    pki: &Pki,
    dns: &Dns,
    net: u8,
    hosts: &[(&str, String)],
) -> (Daemon, SocketAddr) {
    let port = port_on(Ipv4Addr::new(127, 0, net, 1)).port();
    let me = SocketAddr::from(([127, 0, net, 1], port));
    let (cert, key) = pki.node(&format!("dns-node-{net}"), me.ip());
    let mut b = Daemon::builder().cluster(ClusterSettings {
        peers: Vec::new(),
        peers_dns: Some(("peers.cluster.test".into(), port)),
        dns_server: Some(dns.addr),
        cert,
        key,
        ..settings(pki, "unused", me, &[])
    });
    for (ns, text) in hosts {
        b = b.hosts(ns, text.clone());
    }
    (b.start().await, me)
}

/// The members a node's `/cluster/status` lists, sorted.
/// How the node whose `/cluster/status` is at `status_url` sees `member`
/// (`ok`, `failing ...`, `self`).
pub async fn health_at(status_url: &str, member: SocketAddr) -> String {
    let v: serde_json::Value = serde_json::from_slice(get(status_url).await.bytes()).unwrap();
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["address"] == member.to_string())
        .map(|m| m["health"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{member} is not a member: {v}"))
}

pub async fn members_at(status_url: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(get(status_url).await.bytes()).unwrap();
    let mut m: Vec<String> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["address"].as_str().unwrap().to_string())
        .collect();
    m.sort();
    m
}

/// Members come from a DNS name, asked of a server on loopback: a node
/// joins and leaves as the records change.
#[tokio::test]
async fn members_follow_the_dns_name() {
    let dns = Dns::start().await;
    let pki = Pki::new();
    let ip = |i| Ipv4Addr::new(127, 0, 66, i);
    dns.set(&[ip(1), ip(2)]);
    let (node, me) = dns_node(&pki, &dns, 66, &[]).await;
    let port = me.port();
    let url = node.url("/cluster/status");
    let members = || members_at(&url);
    let want = |ips: &[u8]| -> Vec<String> {
        ips.iter().map(|i| format!("127.0.66.{i}:{port}")).collect()
    };
    for (records, expect) in [
        (vec![ip(1), ip(2)], want(&[1, 2])),
        (vec![ip(1), ip(2), ip(3)], want(&[1, 2, 3])),
        (vec![ip(3)], want(&[1, 3])),
    ] {
        dns.set(&records);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = members().await;
            if got == expect {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "members {got:?}, want {expect:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    node.stop().await;
}

pub type PeerClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// An HTTPS client trusting `ca`, with a client certificate if given.
pub fn mtls_client(ca: &Path, identity: Option<(&PathBuf, &PathBuf)>) -> PeerClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(mtls_config(ca, identity))
        .https_only()
        .enable_http1()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// A TLS client configuration trusting `ca`, with a client certificate
/// if given.
pub fn mtls_config(ca: &Path, identity: Option<(&PathBuf, &PathBuf)>) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// GET through the peer port: the status and the body's length.
pub async fn peer_get(client: &PeerClient, url: &str) -> Result<(StatusCode, usize), String> {
    use http_body_util::BodyExt;
    let req = http::Request::get(url)
        .header("x-nodemirror-peer", "owner")
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body.len()))
}

/// A node as its own process (the binary), so it can be stopped and
/// killed: `[cluster]` at `at` with `members`.
pub(crate) async fn binary_node(
    pki: &Pki,
    name: &str,
    at: SocketAddr,
    members: &[SocketAddr],
    hosts: &Path,
    extra: &str,
) -> crate::support::real::Binary {
    let (cert, key) = pki.node(name, at.ip());
    let peers: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    let config = format!(
        "{extra}\n[cluster]\nlisten = \"{at}\"\npeers = [{}]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        peers.join(", "),
        pki.path().join("ca.pem").display(),
        cert.display(),
        key.display()
    );
    crate::support::real::Binary::start_in(hosts, None, &config, &[]).await
}

/// A real containerd pulls `reference` through `node` only (its hosts
/// folder's `server` is a closed port) and gets `digest`.
async fn containerd_pull_through(
    node: &crate::support::real::Binary,
    reference: &str,
    digest: &str,
) {
    let certs = crate::e2e::certs_to(node.port);
    let ctrd = crate::support::real::Containerd::start().await;
    crate::e2e::pull(
        &ctrd,
        certs.path().to_str().unwrap(),
        reference,
        digest,
        node,
    );
}

/// A blob of `size` bytes whose owner among `members` is `owner`.
pub fn owned_by(
    members: &[SocketAddr],
    owner: SocketAddr,
    size: usize,
    mut seed: u64,
) -> (Vec<u8>, String) {
    loop {
        let b = crate::support::noise(size, seed);
        let d: nodemirror::reference::Digest = crate::support::sha256(&b).parse().unwrap();
        if nodemirror::cluster::rank(members, &d)[0] == owner {
            return (b, d.to_string());
        }
        seed += 1;
    }
}

/// The owner streams a blob it is still fetching from a slow upstream,
/// then stops answering (`kill -STOP`), or dies (`kill -9`): the node that
/// asked resumes from the upstream where the owner's stream stopped (the
/// stopped one found by the cluster's probe, not by a timeout), and its
/// client gets one right body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_stops_or_dies_mid_stream_is_resumed_from_the_upstream() {
    let up = Fake::start(Behaviour {
        rate: Some(1 << 20),
        ..Behaviour::default()
    })
    .await;
    let pki = Pki::new();
    let me = port_on(Ipv4Addr::new(127, 0, 67, 1));
    let owner = port_on(Ipv4Addr::new(127, 0, 67, 2));
    let members = [me, owner];
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("slow.test", hosts_toml(&[], Some(&up.url())))],
    );
    for (signal, seed) in [("-STOP", 500), ("-KILL", 600)] {
        let (content, digest) = owned_by(&members, owner, 3 << 20, seed);
        up.put_blob("app", &content);
        // The owner first: a member that does not answer a node's first
        // probe sits out a back-off.
        let b = binary_node(
            &pki,
            &format!("owner{seed}"),
            owner,
            &members,
            hosts.path(),
            "",
        )
        .await;
        // A fresh node each time: the last round's failure keeps the owner
        // out of this node's plans for its back-off.
        // Timeouts far longer than the test may take: a stopped owner keeps
        // its sockets open, and only the cluster's probe of its members
        // tells it is gone.
        let patient = nodemirror::config::UpstreamSettings {
            idle_timeout: Duration::from_secs(600),
            first_byte_timeout: Duration::from_secs(600),
            ..crate::support::quick_upstream()
        };
        let node = Daemon::builder()
            .hosts("slow.test", hosts_toml(&[], Some(&up.url())))
            .upstream(patient)
            .cluster(settings(&pki, &format!("me{seed}"), me, &members))
            .start()
            .await;
        let client = http_client();
        let u = url(&node, "slow.test", &digest);
        let pull = tokio::spawn(async move { stream_on(&client, &u, None, None).await });
        // Mid-stream: about a third has come through the owner.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let pid = b.proc.child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
        let (status, body) = tokio::time::timeout(Duration::from_secs(60), pull)
            .await
            .unwrap_or_else(|_| panic!("{signal}: the pull waited on the stopped owner"))
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{signal}");
        assert_eq!(
            body.unwrap(),
            (content.len() as u64, digest.clone()),
            "{signal}"
        );
        // The owner's bounded ranges, then this node's Range from where
        // the owner's stream stopped (to the end: a blob asked of peers is
        // one whole stream).
        let ranges: Vec<String> = up
            .seen()
            .iter()
            .filter(|s| s.uri.contains(&digest))
            .filter_map(|s| Some(s.headers.get("range")?.to_str().ok()?.to_string()))
            .filter(|r| r.ends_with('-'))
            .collect();
        assert_eq!(ranges.len(), 1, "{signal}: {ranges:?}");
        let from: u64 = ranges[0]
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{ranges:?}"));
        assert!(
            from > 0 && from < content.len() as u64,
            "{signal}: resumed from {from}"
        );
        if signal == "-STOP" {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status();
        }
        drop(b);
        node.stop().await;
    }
}

/// The whole path: a real containerd on one node of a two-node cluster
/// pulls an image from a real registry; the blobs the other node owns come
/// through it, and the image is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_a_cluster_node() {
    use crate::support::real::{require, Registry};
    if !require(&["containerd", "ctr", "docker-registry"]) {
        return;
    }
    let reg = Registry::start().await;
    let img = crate::support::image::Image::build(&[
        ("a.bin", &blob(700)),
        ("b.bin", &blob(701)),
        ("c.bin", &blob(702)),
        ("d.txt", b"through the cluster"),
    ]);
    reg.push("team/app", "v1", &img).await;
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[(
            "registry.cluster.test",
            format!("server = \"{}\"\n", reg.url()),
        )],
    );
    let pki = Pki::new();
    let a = port_on(Ipv4Addr::new(127, 0, 68, 1));
    let b = port_on(Ipv4Addr::new(127, 0, 68, 2));
    let members = [a, b];
    let node_b = binary_node(&pki, "b", b, &members, hosts.path(), "").await;
    let node_a = binary_node(&pki, "a", a, &members, hosts.path(), "").await;
    containerd_pull_through(&node_a, "registry.cluster.test/team/app:v1", &img.digest).await;
    // The blobs node b owns came to node a from b, which fetched them.
    let owned_by_b = img
        .blobs()
        .filter(|blob| {
            let d: nodemirror::reference::Digest = crate::support::sha256(blob).parse().unwrap();
            nodemirror::cluster::rank(&members, &d)[0] == b
        })
        .count() as u64;
    let metric_of = |port: u16, line: &'static str| async move {
        let text = String::from_utf8_lossy(
            get(&format!("http://127.0.0.1:{port}/metrics"))
                .await
                .bytes(),
        )
        .to_string();
        text.lines()
            .filter(|l| l.starts_with(line))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!(
        metric_of(
            node_a.port,
            "nodemirror_blob_fetches_total{source=\"peer\"}"
        )
        .await,
        owned_by_b
    );
    assert_eq!(
        metric_of(
            node_b.port,
            "nodemirror_blob_fetches_total{source=\"upstream\"}"
        )
        .await,
        owned_by_b
    );
    let total = img.blobs().count() as u64;
    assert_eq!(
        metric_of(
            node_a.port,
            "nodemirror_blob_fetches_total{source=\"upstream\"}"
        )
        .await,
        total - owned_by_b
    );
}

/// The owner is down: the runner-up fetches for the others, so the
/// cluster still fetches the blob once.
#[tokio::test]
async fn with_the_owner_down_the_runner_up_fetches_for_the_cluster() {
    let up = Fake::start(Behaviour::default()).await;
    let pki = Pki::new();
    let a = port_on(Ipv4Addr::new(127, 0, 69, 1));
    let b = port_on(Ipv4Addr::new(127, 0, 69, 2));
    let dead = port_on(Ipv4Addr::new(127, 0, 69, 3));
    let members = [a, b, dead];
    let (content, digest) = owned_by(&members, dead, 1 << 20, 900);
    up.put_blob("app", &content);
    let mut nodes = Vec::new();
    for (name, at) in [("a", a), ("b", b)] {
        nodes.push(
            Daemon::builder()
                .hosts("shared.test", hosts_toml(&[], Some(&up.url())))
                .cluster(settings(&pki, name, at, &members))
                .start()
                .await,
        );
    }
    let client = http_client();
    let urls: Vec<String> = nodes
        .iter()
        .map(|d| url(d, "shared.test", &digest))
        .collect();
    let pulls = urls.iter().map(|u| stream_on(&client, u, None, None));
    for (status, body) in futures_util::future::join_all(pulls).await {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    }
    assert_eq!(up.hits(&format!("/blobs/{digest}")), 1);
    for d in nodes {
        d.stop().await;
    }
}

/// `nodemirror cluster ca|cert|status` as an operator runs them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_commands_make_certificates_and_show_the_members() {
    let bin = env!("CARGO_BIN_EXE_nodemirror");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    let ca = dir.path().join("ca");
    let out = run(&["cluster", "ca", "--out", ca.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    // Not overwritten by a second run.
    assert!(!run(&["cluster", "ca", "--out", ca.to_str().unwrap()])
        .status
        .success());
    let me = port_on(Ipv4Addr::new(127, 0, 70, 1));
    let other = SocketAddr::from(([127, 0, 70, 2], me.port()));
    let node = dir.path().join("node");
    let out = run(&[
        "cluster",
        "cert",
        "--ca",
        ca.to_str().unwrap(),
        "--name",
        "n1",
        "--ip",
        "127.0.70.1",
        "--out",
        node.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.join("n1-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // Without --ip: refused with a reason.
    let out = run(&[
        "cluster",
        "cert",
        "--ca",
        ca.to_str().unwrap(),
        "--name",
        "n2",
        "--out",
        node.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let hosts = tempfile::tempdir().unwrap();
    let config = format!(
        "[cluster]\nlisten = \"{me}\"\npeers = [\"{me}\", \"{other}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        ca.join("ca.pem").display(),
        node.join("n1.pem").display(),
        node.join("n1-key.pem").display()
    );
    let daemon = crate::support::real::Binary::start_in(hosts.path(), None, &config, &[]).await;
    let server = format!("http://127.0.0.1:{}", daemon.port);
    let out = run(&["cluster", "status", "--server", &server]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains(&format!("self {me}")), "{text}");
    assert!(text.contains(&format!("{other}")), "{text}");
    assert!(text.contains("% of digests"), "{text}");
    // A daemon without [cluster] says so.
    let plain = crate::support::real::Binary::start(hosts.path(), &[]).await;
    let out = run(&[
        "cluster",
        "status",
        "--server",
        &format!("http://127.0.0.1:{}", plain.port),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in cluster mode"),
        "{out:?}"
    );
}

/// A member a request found down is probed until it answers, marked
/// failing meanwhile, and cleared once it answers (a node restarted for an
/// upgrade is used again within seconds, not after a long back-off).
#[tokio::test]
async fn a_member_that_comes_back_is_used_again() {
    let up = Fake::start(Behaviour::default()).await;
    let pki = Pki::new();
    let a = port_on(Ipv4Addr::new(127, 0, 71, 1));
    let b = port_on(Ipv4Addr::new(127, 0, 71, 2));
    let members = [a, b];
    let node = Daemon::builder()
        .cluster(settings(&pki, "a", a, &members))
        .hosts("shared.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    // A pull of a blob b owns, while b is down: it comes from the
    // upstream, and b is now watched.
    let (content, digest) = owned_by(&members, b, 1000, 7100);
    up.put_blob("app", &content);
    let r = get(&url(&node, "shared.test", &digest)).await;
    assert_eq!(r.status, StatusCode::OK);
    let status = node.url("/cluster/status");
    let health_of_b = || health_at(&status, b);
    crate::support::wait_for("b marked failing", Duration::from_secs(15), || async {
        health_of_b().await.starts_with("failing")
    })
    .await;
    // The probe (every 2 s) finds it down too: its own mark, which it
    // clears when b answers. (A request's mark alone waits out the
    // back-off: a peer that sent wrong bytes is not forgiven early.)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let other = Daemon::builder()
        .cluster(settings(&pki, "b", b, &members))
        .start()
        .await;
    crate::support::wait_for("b ok again", Duration::from_secs(15), || async {
        health_of_b().await == "ok"
    })
    .await;
    other.stop().await;
    node.stop().await;
}

/// A reload (SIGHUP) changes the static members and where the DNS members
/// come from, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_members() {
    let (dns_a, dns_b) = (Dns::start().await, Dns::start().await);
    let ip = |i| Ipv4Addr::new(127, 0, 72, i);
    dns_a.set(&[ip(1), ip(2)]);
    dns_b.set(&[ip(3)]);
    let pki = Pki::new();
    let me = port_on(ip(1));
    let port = me.port();
    let (cert, key) = pki.node("reloaded", me.ip());
    let config = |members: &str| {
        format!(
            "[cluster]\nlisten = \"{me}\"\n{members}\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            pki.path().join("ca.pem").display(),
            cert.display(),
            key.display()
        )
    };
    let hosts = tempfile::tempdir().unwrap();
    let first = config(&format!(
        "peers_dns = \"peers.cluster.test:{port}\"\ndns_server = \"{}\"\nrefresh = \"1s\"",
        dns_a.addr
    ));
    let bin = crate::support::real::Binary::start_in(hosts.path(), None, &first, &[]).await;
    let status = format!("http://127.0.0.1:{}/cluster/status", bin.port);
    let members = || members_at(&status);
    let want = |ips: &[u8]| -> Vec<String> {
        ips.iter().map(|i| format!("127.0.72.{i}:{port}")).collect()
    };
    let reach = |expect: Vec<String>| async move {
        crate::support::wait_for(
            &format!("members {expect:?}"),
            Duration::from_secs(15),
            || {
                let (members, expect) = (members, expect.clone());
                async move { members().await == expect }
            },
        )
        .await;
    };
    reach(want(&[1, 2])).await;
    let hup = |text: String| {
        std::fs::write(bin.config_file(), text).unwrap();
        let pid = bin.proc.child.id().to_string();
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    // A static list instead of the name.
    hup(config(&format!("peers = [\"127.0.72.5:{port}\"]")));
    reach(want(&[1, 5])).await;
    // Another DNS server, whose records say otherwise.
    hup(config(&format!(
        "peers_dns = \"peers.cluster.test:{port}\"\ndns_server = \"{}\"\nrefresh = \"1s\"",
        dns_b.addr
    )));
    reach(want(&[1, 3])).await;
}

/// `prefetch --cluster`: an image preheated through one node of two is
/// fetched from the upstream once per blob, each blob by its owner (the
/// node the command ran on keeps only the blobs it owns); a real
/// containerd then pulls it through that node with no new blob fetch
/// upstream. A blob the upstream does not have fails that blob, the rest
/// are still preheated, and the exit status says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_preheat_puts_each_blob_at_its_owner() {
    use crate::support::real::require;
    if !require(&["containerd", "ctr"]) {
        return;
    }
    let up = Fake::start(Behaviour::default()).await;
    let img = crate::support::image::Image::build(&[
        ("a.bin", &blob(710)),
        ("b.bin", &blob(711)),
        ("c.bin", &blob(712)),
        ("d.txt", b"preheated"),
    ]);
    up.push_image("team/app", "v1", &img);
    // Another image whose second layer the upstream lacks.
    let broken = crate::support::image::Image::build(&[("x", b"here"), ("y", b"missing")]);
    up.put_blob("team/broken", &broken.config);
    up.put_blob("team/broken", &broken.layers[0]);
    up.put_manifest(
        "team/broken",
        Some("v1"),
        &broken.media_type,
        &broken.manifest,
    );
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[(
            "registry.cluster.test",
            format!("server = \"{}\"\n", up.url()),
        )],
    );
    let pki = Pki::new();
    let a = port_on(Ipv4Addr::new(127, 0, 74, 1));
    let b = port_on(Ipv4Addr::new(127, 0, 74, 2));
    let members = [a, b];
    let node_b = binary_node(&pki, "b", b, &members, hosts.path(), "").await;
    let node_a = binary_node(&pki, "a", a, &members, hosts.path(), "").await;
    let cache_of = |n: &crate::support::real::Binary| n.config_file().with_file_name("cache");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args(["prefetch", "--cluster", "registry.cluster.test/team/app:v1"])
        .args(["--config", "/dev/null", "--server"])
        .arg(format!("http://127.0.0.1:{}", node_a.port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let blobs: Vec<String> = img.blobs().map(|b| crate::support::sha256(b)).collect();
    let sizes: Vec<u64> = img.blobs().map(|b| b.len() as u64).collect();
    assert!(text.contains(&format!("[{0}/{0}]", blobs.len())), "{text}");
    assert!(
        text.contains(&format!("{0} of {0} blobs at their owners", blobs.len())),
        "{text}"
    );
    for (d, size) in blobs.iter().zip(&sizes) {
        assert_eq!(up.blob_bytes_of(d), *size, "{d} fetched once");
        let owner = nodemirror::cluster::rank(&members, &d.parse().unwrap())[0];
        let (holder, other) = if owner == a {
            (&node_a, &node_b)
        } else {
            (&node_b, &node_a)
        };
        let at = |n| crate::support::blob_path(&cache_of(n), d).exists();
        // The owner commits a blob just after its last byte went out.
        wait_until("stored at its owner", Duration::from_secs(10), || {
            at(holder)
        })
        .await;
        assert!(!at(other), "{d} not stored elsewhere");
    }

    // The rollout: containerd pulls through node a; no blob comes from
    // the upstream again.
    containerd_pull_through(&node_a, "registry.cluster.test/team/app:v1", &img.digest).await;
    for (d, size) in blobs.iter().zip(&sizes) {
        assert_eq!(up.blob_bytes_of(d), *size, "{d}: no new upstream fetch");
    }

    // A blob the upstream lacks: that one fails, the others are preheated.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args([
            "prefetch",
            "--cluster",
            "registry.cluster.test/team/broken:v1",
        ])
        .args(["--config", "/dev/null", "--server"])
        .arg(format!("http://127.0.0.1:{}", node_a.port))
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    let missing = crate::support::sha256(&broken.layers[1]);
    assert!(stderr.contains(&format!("{missing} failed")), "{stderr}");
    assert!(stdout.contains("2 of 3 blobs at their owners"), "{stdout}");
}

/// An idle node probes nobody: the cost of failure detection per node does
/// not grow with the cluster. A member starts being watched when a request
/// uses it (here one that accepts connections and closes them at once: the
/// request goes on to the upstream, and the member is probed after it).
#[tokio::test]
async fn an_idle_node_probes_no_member() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let up = Fake::start(Behaviour::default()).await;
    let pki = Pki::new();
    let a = port_on(Ipv4Addr::new(127, 0, 75, 1));
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::new(127, 0, 75, 2), 0))
        .await
        .unwrap();
    let x = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let closing = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            drop(conn);
        }
    });
    let members = [a, x];
    let node = Daemon::builder()
        .cluster(settings(&pki, "a", a, &members))
        .hosts("shared.test", hosts_toml(&[], Some(&up.url())))
        .start()
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        connections.load(Ordering::Relaxed),
        0,
        "an idle node probed a member (every 2 s, before)"
    );
    let (content, digest) = owned_by(&members, x, 1000, 7500);
    up.put_blob("app", &content);
    let r = get(&url(&node, "shared.test", &digest)).await;
    assert_eq!(r.status, StatusCode::OK);
    wait_until("the member in use probed", Duration::from_secs(10), || {
        connections.load(Ordering::Relaxed) >= 2
    })
    .await;
    node.stop().await;
    closing.abort();
}

/// No hot owner: twelve nodes (each its own process) pull a new blob at
/// the same moment from a slow upstream. The upstream sends it once, every
/// node gets the right bytes, and no node sends more than four copies to
/// its peers: askers beyond four are sent on (307) to nodes receiving it,
/// which serve it as it arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_spreads_as_a_tree_no_node_sends_more_than_four_copies() {
    let up = Fake::start(Behaviour {
        rate: Some(4 << 20),
        ..Behaviour::default()
    })
    .await;
    let content = crate::support::noise(3 << 20, 777);
    let digest = up.put_blob("app", &content);
    let pki = Pki::new();
    let members: Vec<SocketAddr> = (1..=12)
        .map(|i| port_on(Ipv4Addr::new(127, 0, 78, i)))
        .collect();
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("slow.test", hosts_toml(&[], Some(&up.url())))],
    );
    let mut nodes = Vec::new();
    for (i, at) in members.iter().enumerate() {
        nodes.push(binary_node(&pki, &format!("tree{i}"), *at, &members, hosts.path(), "").await);
    }
    let pulls = nodes.iter().map(|n| {
        let url = format!(
            "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=slow.test",
            n.port
        );
        async move { stream_on(&http_client(), &url, None, None).await }
    });
    for (status, body) in futures_util::future::join_all(pulls).await {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    }
    assert_eq!(
        up.hits(&format!("/blobs/{digest}")),
        1,
        "fetched upstream once"
    );
    let mut sent_on = 0;
    let mut copies = Vec::new();
    for n in &nodes {
        let text = String::from_utf8_lossy(
            get(&format!("http://127.0.0.1:{}/metrics", n.port))
                .await
                .bytes(),
        )
        .to_string();
        let count = |status: &str| -> u64 {
            text.lines()
                .filter(|l| {
                    l.starts_with("nodemirror_peer_requests_total{")
                        && l.contains(&format!("status=\"{status}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        copies.push(count("200"));
        sent_on += count("307");
    }
    assert!(
        copies.iter().all(|&c| c <= 4),
        "copies sent per node: {copies:?}"
    );
    assert!(sent_on > 0, "nobody was sent on: {copies:?}");
    assert_eq!(
        copies.iter().sum::<u64>(),
        11,
        "each other node got one copy from a peer: {copies:?}"
    );
}

/// A relay of the tree that stops (`kill -STOP`, a hung node) while a node
/// reads a blob from it: the cluster's probe finds it down and the node
/// goes on from the next endpoint, instead of waiting for its idle timeout
/// (600 s here); sent on to the stopped relay again, it moves on at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_is_left_for_the_next_endpoint() {
    let up = Fake::start(Behaviour {
        rate: Some(1 << 20),
        ..Behaviour::default()
    })
    .await;
    let pki = Pki::new();
    let members: Vec<SocketAddr> = (1..=6)
        .map(|i| port_on(Ipv4Addr::new(127, 0, 80, i)))
        .collect();
    let owner = members[0];
    let (content, digest) = owned_by(&members, owner, 6 << 20, 9090);
    up.put_blob("app", &content);
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("slow.test", hosts_toml(&[], Some(&up.url())))],
    );
    // Only the probe may cut a silent stream.
    let patient = "[upstream]\nidle_timeout = \"600s\"\nfirst_byte_timeout = \"600s\"\n";
    let mut nodes = Vec::new();
    for (i, at) in members.iter().enumerate() {
        nodes.push(
            binary_node(
                &pki,
                &format!("relay{i}"),
                *at,
                &members,
                hosts.path(),
                patient,
            )
            .await,
        );
    }
    let pull = |i: usize| {
        let url = format!(
            "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=slow.test",
            nodes[i].port
        );
        tokio::spawn(async move { stream_on(&http_client(), &url, None, None).await })
    };
    let served = |i: usize, to: SocketAddr| {
        nodes[i].proc.log_text().lines().any(|l| {
            l.contains("peer request served")
                && l.contains(&format!("peer=Some({to})"))
                && l.contains("status=200")
        })
    };
    // Four nodes take the owner's four places.
    let first: Vec<_> = (1..=4).map(pull).collect();
    wait_until(
        "four receivers at the owner",
        Duration::from_secs(20),
        || (1..=4).all(|i| served(0, members[i])),
    )
    .await;
    // The fifth is sent on to one of them; that one stops.
    let last = pull(5);
    wait_until(
        "the fifth served by a relay",
        Duration::from_secs(20),
        || (1..=4).any(|i| served(i, members[5])),
    )
    .await;
    let relay = (1..=4).find(|&i| served(i, members[5])).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = nodes[relay].proc.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let (status, body) = tokio::time::timeout(Duration::from_secs(60), last)
        .await
        .expect("the node waited on the stopped relay")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    for (i, p) in first.into_iter().enumerate() {
        if i + 1 == relay {
            continue;
        }
        let (status, body) = p.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (content.len() as u64, digest.clone()));
    }
}

/// A lazy puller's cold range on a node that does not own the blob: the
/// node asks its owner for that range and the owner asks the upstream for
/// it at once, so the range is answered long before the blob could have
/// come; the rest follows in the background (the owner from the
/// upstream, the node from the owner), and the upstream sends the blob's
/// bytes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_range_goes_to_the_owner_as_a_range() {
    let up = Fake::start(Behaviour {
        rate: Some(2 << 20),
        ..Behaviour::default()
    })
    .await;
    let pki = Pki::new();
    let hosts = [("slow.test", hosts_toml(&[], Some(&up.url())))];
    let (nodes, members) = cluster(&pki, 84, 2, &hosts).await;
    let len = 8 << 20;
    let (content, digest) = owned_by(&members, members[1], len, 900);
    up.put_blob("app", &content);
    let r = crate::support::request(
        http::Method::GET,
        &url(&nodes[0], "slow.test", &digest),
        &[("range", &format!("bytes={}-{}", len - 51, len - 1))],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().as_ref(), &content[len - 51..]);
    assert!(
        up.blob_bytes() < len as u64 / 2,
        "{} bytes fetched before the range was answered",
        up.blob_bytes()
    );
    let first = up
        .seen()
        .iter()
        .find_map(|s| Some(s.headers.get("range")?.to_str().ok()?.to_string()));
    // (With read-ahead: the size is not known yet, the answer ends at the
    // blob's end.)
    assert!(
        first
            .as_deref()
            .is_some_and(|r| r.starts_with(&format!("bytes={}-", len - 51))),
        "the owner asked the upstream for the range first: {first:?}"
    );
    for node in &nodes {
        let path = node.blob_path(&digest);
        wait_until("the blob stored", Duration::from_secs(30), || path.exists()).await;
    }
    assert_eq!(up.blob_bytes(), len as u64, "the upstream sent it once");
    for d in nodes {
        d.stop().await;
    }
}
