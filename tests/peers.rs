//! The safety contract across the cluster: the peer port judges by where
//! content came from (a peer naming a public namespace gets no private
//! content), a trickling namespace captures no pull on any node, and a
//! member removed from the cluster loses access on the connections it
//! already has.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use crate::cluster::{
    cluster, dns_node, members_at, mtls_client, mtls_config, peer_get, port_on, settings, url, Pki,
};
use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::image::Image;
use crate::support::real::require;
use crate::support::{curl_as, http_client, noise, stream_on, wait_until, Daemon, Dns};

/// `n` nodes on 127.0.<net>.1 …, each with `hosts` and `auth`.
async fn nodes_with_auth(
    pki: &Pki,
    net: u8,
    n: u8,
    hosts: &[(&str, String)],
    auth: &str,
) -> (Vec<Daemon>, Vec<SocketAddr>) {
    let addrs: Vec<SocketAddr> = (1..=n)
        .map(|i| port_on(Ipv4Addr::new(127, 0, net, i)))
        .collect();
    let mut nodes = Vec::new();
    for (i, at) in addrs.iter().enumerate() {
        let mut b = Daemon::builder()
            .cluster(settings(pki, &format!("n{net}-{i}"), *at, &addrs))
            .auth(auth);
        for (ns, text) in hosts {
            b = b.hosts(ns, text.clone());
        }
        nodes.push(b.start().await);
    }
    (nodes, addrs)
}

/// Private content (credentials) pulled by root on one node of three:
/// no peer gets it by naming a public namespace, nobody on another node
/// gets it through that node, and content of a namespace that says
/// `share = true` goes to peers only under that namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_content_goes_to_no_peer_whatever_namespace_it_names() {
    if !require(&["runuser", "curl"]) {
        return;
    }
    let image = Image::build(&[("secret.txt", b"cluster private layer")]);
    let private = Fake::start(Behaviour {
        basic: Some(("robot".into(), "s3cret".into())),
        ..Behaviour::default()
    })
    .await;
    private.push_image("team/app", "v1", &image);
    let public = Fake::start(Behaviour::default()).await;
    let auth = format!(
        r#"{{"auths": {{"{}": {{"username": "robot", "password": "s3cret"}}}}}}"#,
        private.addr
    );
    let shared = format!("share = true\n{}", hosts_toml(&[], Some(&private.url())));
    let hosts = [
        ("private.test", hosts_toml(&[], Some(&private.url()))),
        ("shared.test", shared),
        ("public.test", hosts_toml(&[], Some(&public.url()))),
    ];
    let pki = Pki::new();
    let (nodes, addrs) = nodes_with_auth(&pki, 81, 3, &hosts, &auth).await;
    let layer = crate::support::sha256(&image.layers[0]);
    let config = crate::support::sha256(&image.config);
    let url =
        |d: &Daemon, ns: &str, digest: &str| d.url(&format!("/v2/team/app/blobs/{digest}?ns={ns}"));
    // root pulls through node 0: the layer as private.test, the config
    // as shared.test.
    for (ns, digest) in [("private.test", &layer), ("shared.test", &config)] {
        let (status, _) = stream_on(&http_client(), &url(&nodes[0], ns, digest), None, None).await;
        assert_eq!(status, StatusCode::OK, "{ns}");
    }
    // Node 0's peer port, asked with a member's certificate.
    let (cert, key) = pki.node("asker", addrs[1].ip());
    let peer = mtls_client(&pki.path().join("ca.pem"), Some((&cert, &key)));
    let at0 = |ns: &str, kind: &str, digest: &str| {
        format!("https://{}/v2/team/app/{kind}/{digest}?ns={ns}", addrs[0])
    };
    for (ns, digest, want) in [
        ("public.test", &layer, StatusCode::NOT_FOUND),
        ("public.test", &config, StatusCode::NOT_FOUND),
        ("private.test", &layer, StatusCode::FORBIDDEN),
        ("shared.test", &config, StatusCode::OK),
        // Shared under shared.test, not under the private namespace.
        ("shared.test", &layer, StatusCode::NOT_FOUND),
    ] {
        let (status, _) = peer_get(&peer, &at0(ns, "blobs", digest)).await.unwrap();
        assert_eq!(status, want, "{ns} {digest}");
    }
    let (status, _) = peer_get(&peer, &at0("public.test", "manifests", &image.digest))
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "manifest under public.test");
    // Through the other nodes, under the public namespace (whose registry
    // does not have them): nobody and root alike get 404.
    for node in &nodes[1..] {
        for digest in [&layer, &config] {
            let u = url(node, "public.test", digest);
            assert_eq!(curl_as("nobody", "GET", &u).0, 404, "{u}");
            assert_eq!(curl_as("nobody", "HEAD", &u).0, 404, "{u}");
            let (status, _) = stream_on(&http_client(), &u, None, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "root: {u}");
        }
    }
    for d in nodes {
        d.stop().await;
    }
}

/// A namespace that trickles a blob on one node holds no other
/// namespace's pull of that digest on another node: its owner, asked
/// under another namespace, starts that namespace's own fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_namespace_captures_no_pull_across_the_cluster() {
    let hostile = Fake::trickling(40 << 10).await;
    let good = Fake::start(Behaviour::default()).await;
    let blob = noise(2 << 20, 82);
    let digest = hostile.put_blob("app", &blob);
    good.put_blob("app", &blob);
    let hosts = [
        ("hostile.test", hosts_toml(&[], Some(&hostile.url()))),
        ("good.test", hosts_toml(&[], Some(&good.url()))),
    ];
    let pki = Pki::new();
    let (nodes, _) = cluster(&pki, 82, 3, &hosts).await;
    let client = http_client();
    let slow = tokio::spawn({
        let (client, u) = (client.clone(), url(&nodes[0], "hostile.test", &digest));
        async move { stream_on(&client, &u, None, None).await }
    });
    wait_until("the trickle to start", Duration::from_secs(10), || {
        hostile.hits(&format!("/blobs/{digest}")) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in &nodes[1..] {
        let began = Instant::now();
        let (status, body) = stream_on(&client, &url(node, "good.test", &digest), None, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.unwrap(), (blob.len() as u64, digest.clone()));
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "held {:?} behind the trickle",
            began.elapsed()
        );
    }
    assert!(
        !slow.is_finished(),
        "the trickle ended first: no capture to show"
    );
    assert!(good.hits(&format!("/blobs/{digest}")) >= 1);
    slow.abort();
    for d in nodes {
        d.stop().await;
    }
}

/// A member removed from the cluster (its address gone from the DNS
/// name) is refused on the connection it already has open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_loses_its_open_connection_at_once() {
    let up = Fake::start(Behaviour::default()).await;
    let digest = up.put_blob("app", &noise(100_000, 83));
    let dns = Dns::start().await;
    let pki = Pki::new();
    let ip = |i| Ipv4Addr::new(127, 0, 83, i);
    dns.set(&[ip(1), ip(2)]);
    let hosts = [("shared.test", hosts_toml(&[], Some(&up.url())))];
    let (node, me) = dns_node(&pki, &dns, 83, &hosts).await;
    let status_url = node.url("/cluster/status");
    let members = || async { members_at(&status_url).await.len() };
    let deadline = Instant::now() + Duration::from_secs(10);
    while members().await != 2 {
        assert!(Instant::now() < deadline, "the second member never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The member at 127.0.83.2 opens one connection to the peer port.
    let (cert, key) = pki.node("member", ip(2).into());
    let config = mtls_config(&pki.path().join("ca.pem"), Some((&cert, &key)));
    let tcp = tokio::net::TcpStream::connect(me).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(me.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let path = format!("/v2/app/blobs/{digest}?ns=shared.test");
    let ask = |send: &mut hyper::client::conn::http1::SendRequest<
        http_body_util::Empty<bytes::Bytes>,
    >| {
        let req = http::Request::get(path.as_str())
            .header("host", me.to_string())
            .header("x-nodemirror-peer", "owner")
            .body(http_body_util::Empty::new())
            .unwrap();
        send.send_request(req)
    };
    let resp = ask(&mut send).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    // Gone from the DNS name: the node drops it from its members...
    dns.set(&[ip(1)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while members().await != 1 {
        assert!(Instant::now() < deadline, "the member was never removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and its open connection gets nothing more.
    match ask(&mut send).await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::FORBIDDEN),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
    conn.abort();
    node.stop().await;
}
