//! The files for cluster mode on Kubernetes (packaging/kubernetes): the
//! DaemonSet and headless Service that give the DNS name of the members,
//! and the script that makes each node's certificate. No Kubernetes here:
//! the manifests are parsed and checked against each other and the
//! documented configuration, and the script runs against a stand-in
//! `kubectl`; the certificates it makes are then used by two nodes whose
//! mutual-TLS probes must pass.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use nodemirror::config::cluster::ClusterSettings;

use crate::cluster::port_on;
use crate::support::{get, Daemon};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn manifests() -> Vec<serde_yaml_ng::Value> {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join("packaging/kubernetes/nodemirror-peers.yaml"))
            .unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("each document parses"))
        .collect()
}

/// The DaemonSet marks every node (host network, every taint tolerated),
/// is ready only while the node's peer port answers, and the headless
/// Service selects exactly its pods and publishes only ready ones, on the
/// peer port; its name is the one the README and the shipped config give
/// `peers_dns`.
#[test]
fn the_manifests_give_the_members_dns_name() {
    let docs = manifests();
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let (ds, svc) = (kind("DaemonSet"), kind("Service"));
    assert_eq!(docs.len(), 2);
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    assert_eq!(svc["apiVersion"].as_str(), Some("v1"));
    let pod = &ds["spec"]["template"];
    assert_eq!(
        ds["spec"]["selector"]["matchLabels"],
        pod["metadata"]["labels"]
    );
    let selector = svc["spec"]["selector"].as_mapping().unwrap();
    let labels = pod["metadata"]["labels"].as_mapping().unwrap();
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "the Service selects the marker pods"
        );
    }
    let spec = &pod["spec"];
    assert_eq!(
        spec["hostNetwork"].as_bool(),
        Some(true),
        "pod IP = node IP"
    );
    assert_eq!(spec["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    assert_eq!(spec["tolerations"][0]["operator"].as_str(), Some("Exists"));
    let containers = spec["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let probe = &containers[0]["readinessProbe"]["tcpSocket"]["port"];
    assert_eq!(
        probe.as_u64(),
        Some(5781),
        "ready while the peer port answers"
    );
    assert_eq!(svc["spec"]["clusterIP"].as_str(), Some("None"), "headless");
    assert_eq!(
        svc["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(false)
    );
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(5781));
    assert_eq!(ds["metadata"]["namespace"], svc["metadata"]["namespace"]);
    let name = format!(
        "{}.{}.svc.cluster.local:5781",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap()
    );
    for doc in ["README.md", "packaging/config.toml"] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(doc)).unwrap();
        assert!(
            text.contains(&format!("peers_dns = \"{name}\"")),
            "{doc} names {name}"
        );
    }
}

fn cluster_settings(
    dir: &Path,
    name: &str,
    at: SocketAddr,
    peers: &[SocketAddr],
) -> ClusterSettings {
    crate::cluster::settings_with(
        at,
        peers,
        dir.join("ca/ca.pem"),
        dir.join(format!("certs/{name}/{name}.pem")),
        dir.join(format!("certs/{name}/{name}-key.pem")),
    )
}

/// `node-certs` makes one certificate per node that `kubectl get nodes`
/// lists, naming its InternalIPs (keys 0600), keeps existing ones on a
/// second run, and the certificates work: node a, with b down, marks b
/// failing after a pull of a blob b owns; once b starts with its
/// certificate, a's mutual-TLS probe of b passes. The DaemonSet's TCP readiness probe on the peer port leaves no
/// warning in the log.
#[tokio::test]
async fn the_certificate_script_makes_working_node_certificates() {
    use std::os::unix::fs::PermissionsExt;
    let a = port_on(Ipv4Addr::new(127, 0, 73, 1));
    let b = port_on(Ipv4Addr::new(127, 0, 73, 2));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bin = env!("CARGO_BIN_EXE_nodemirror");
    let out = std::process::Command::new(bin)
        .args(["cluster", "ca", "--out"])
        .arg(d.join("ca"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // A kubectl that lists two nodes as `get nodes -o jsonpath=...` would.
    let kubectl = d.join("kubectl");
    std::fs::write(
        &kubectl,
        format!(
            "#!/bin/sh\n[ \"$1 $2\" = \"get nodes\" ] || exit 3\nprintf 'node-a {}\\nnode-b {} ::1\\n'\n",
            a.ip(),
            b.ip()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&kubectl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = || {
        let out =
            std::process::Command::new(Path::new(ROOT).join("packaging/kubernetes/node-certs"))
                .arg(d.join("ca"))
                .arg(d.join("certs"))
                .env("KUBECTL", &kubectl)
                .env("NODEMIRROR", bin)
                .output()
                .unwrap();
        let text = crate::support::output_text(&out);
        assert!(out.status.success(), "{text}");
        text
    };
    let text = run();
    assert!(text.contains("made 2, kept 0"), "{text}");
    for n in ["node-a", "node-b"] {
        let key = d.join(format!("certs/{n}/{n}-key.pem"));
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{n}");
    }
    let text = run();
    assert!(text.contains("made 0, kept 2"), "{text}");

    let members = [a, b];
    // Node a is the binary (its log is read below), b in-process.
    let s = cluster_settings(d, "node-a", a, &members);
    let config = format!(
        "[cluster]\nlisten = \"{a}\"\npeers = [\"{a}\", \"{b}\"]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        s.ca.display(),
        s.cert.display(),
        s.key.display()
    );
    let up = crate::support::fake::Fake::start(crate::support::fake::Behaviour::default()).await;
    let hosts = tempfile::tempdir().unwrap();
    crate::support::write_hosts(
        hosts.path(),
        &[("shared.test", format!("server = \"{}\"\n", up.url()))],
    );
    let node = crate::support::real::Binary::start_in(hosts.path(), None, &config, &[]).await;
    // A pull of a blob b owns while b is down: from the upstream, and b is
    // now watched by a's probe.
    let (content, digest) = crate::cluster::owned_by(&members, b, 1000, 7300);
    up.put_blob("app", &content);
    let r = get(&format!(
        "http://127.0.0.1:{}/v2/app/blobs/{digest}?ns=shared.test",
        node.port
    ))
    .await;
    assert_eq!(r.status, http::StatusCode::OK);
    let status = format!("http://127.0.0.1:{}/cluster/status", node.port);
    let health_of_b = || crate::cluster::health_at(&status, b);
    crate::support::wait_for("b marked failing", Duration::from_secs(15), || async {
        health_of_b().await.starts_with("failing")
    })
    .await;
    // One probe period: the probe's own mark, cleared when b answers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let other = Daemon::builder()
        .cluster(cluster_settings(d, "node-b", b, &members))
        .start()
        .await;
    crate::support::wait_for(
        "b ok with its scripted certificate",
        Duration::from_secs(15),
        || async { health_of_b().await == "ok" },
    )
    .await;
    // The marker's readiness probe: a TCP connection closed at once. It
    // is no peer and no fault: nothing is logged above debug.
    for _ in 0..3 {
        drop(tokio::net::TcpStream::connect(a).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = node.proc.log_text();
    assert!(!log.contains("handshake refused"), "{log}");
    other.stop().await;
}
