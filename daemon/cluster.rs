//! Cluster mode: the nodes share their caches, so a cluster fetches each
//! blob from its upstream once.
//!
//! Every digest has an owner: the member ranked first by rendezvous
//! (highest random weight) hashing of the digest over the current members
//! ([`rank`]). A node that misses a blob (or a manifest by digest) asks the
//! owner first; the owner answers from its cache or fetches the blob once
//! for the whole cluster with its own single-flight, streaming it while it
//! arrives. Peers are endpoints like any other: they come before the
//! namespace's own chain (the owner) and after it (the next candidates,
//! asked only for what they hold), so fallback, the circuit breaker
//! (health back-off), resume with `Range` and digest verification are the
//! upstreams' own. A peer that fails costs a connect timeout
//! (`peer_timeout`) once, then sits out its back-off; when every peer
//! fails the namespace's chain still runs, so cluster mode never makes a
//! pull fail that would have worked without it.
//!
//! Peers talk HTTPS with mutual TLS against the cluster's CA; a client's
//! certificate must name the address of a current member. The peer port
//! answers blobs and manifests by digest of shareable namespaces only
//! ([`crate::upstream::Config::shareable`]); tags are never answered by
//! peers, each node resolves them itself.

pub mod certs;
mod members;
pub mod relay;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use parking_lot::Mutex;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

pub use members::Members;

use crate::config::cluster::ClusterSettings;
use crate::config::hosts::{Capabilities, ClientIdentity, HostSettings};
use crate::config::UpstreamSettings;
use crate::reference::{Digest, Namespace};
use crate::upstream::client::{ClientPool, HttpClient};
use crate::upstream::{Config, Endpoint, PeerPlan, Upstream};

/// The header that tells a peer what it is asked as.
pub const PEER_HEADER: &str = "x-nodemirror-peer";

/// Members asked as owners, in rank order: the owner and the runner-up.
const OWNERS: usize = 2;

/// Candidates after those asked for what they hold, when the owners and
/// the upstreams fail.
const HOLDERS_ASKED: usize = 3;

/// How a request reached this node's peer port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerRole {
    /// As the digest's owner: answer from the cache, a fetch under way,
    /// or fetch it from the upstreams (never from other peers).
    Owner,
    /// As a possible holder: answer from the cache or a fetch under way
    /// only.
    Holder,
}

impl PeerRole {
    fn header(self) -> &'static str {
        match self {
            PeerRole::Owner => "owner",
            PeerRole::Holder => "holder",
        }
    }

    pub fn from_header(v: Option<&HeaderValue>) -> PeerRole {
        match v.and_then(|v| v.to_str().ok()) {
            Some("owner") => PeerRole::Owner,
            _ => PeerRole::Holder,
        }
    }
}

/// The TLS material of one configuration.
struct Tls {
    server: Arc<ServerConfig>,
    client: HttpClient,
}

/// This node's view of the cluster.
pub struct Cluster {
    pub listen: SocketAddr,
    members: Arc<Members>,
    tls: ArcSwap<Tls>,
    /// Endpoints for peers, by address and role; rebuilt with the TLS.
    endpoints: Mutex<HashMap<(SocketAddr, PeerRole), Arc<Endpoint>>>,
    peer_timeout: Mutex<Duration>,
    /// Members the probe marked failing; it clears its own marks when
    /// they answer again.
    probed_down: Mutex<std::collections::HashSet<SocketAddr>>,
    /// The peers of the plans requests hold (a plan lives as long as the
    /// fetch that uses it): the members this node is using, which the
    /// probe watches.
    in_use: Mutex<Vec<(std::sync::Weak<PeerPlan>, Vec<SocketAddr>)>>,
    /// The task that follows `peers_dns`, and what it follows.
    dns: Mutex<Following>,
    /// The peers receiving each blob from this node ([`relay`]).
    pub relays: Arc<relay::Relays>,
    /// Members this node reads a blob from because a peer sent it on to
    /// them (relays of the tree), counted while it reads: the probe
    /// watches them like the members of its plans.
    relaying: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

/// Counts a member among those this node reads from while alive
/// ([`Cluster::watch`]).
pub struct Watching {
    relaying: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    member: SocketAddr,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut map = self.relaying.lock();
        if let Some(n) = map.get_mut(&self.member) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.member);
            }
        }
    }
}

/// What the DNS follower follows: `peers_dns`, `dns_server`, `refresh`.
type DnsKey = (Option<(String, u16)>, Option<SocketAddr>, Duration);

struct Following {
    key: DnsKey,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Following {
    /// Starts following `s.peers_dns` (when set) into `members`.
    fn start(members: &Arc<Members>, s: &ClusterSettings) -> Result<Following, String> {
        Ok(Following::spawn(members, s, Following::resolver(s)?))
    }

    /// The resolver `s` asks for, checked before anything is replaced.
    fn resolver(s: &ClusterSettings) -> Result<Option<hickory_resolver::TokioResolver>, String> {
        s.peers_dns
            .as_ref()
            .map(|_| members::resolver(s.dns_server))
            .transpose()
    }

    fn spawn(
        members: &Arc<Members>,
        s: &ClusterSettings,
        resolver: Option<hickory_resolver::TokioResolver>,
    ) -> Following {
        let task = match (&s.peers_dns, resolver) {
            (Some((name, port)), Some(resolver)) => Some(tokio::spawn(members::follow_dns(
                members.clone(),
                resolver,
                name.clone(),
                *port,
                s.refresh,
            ))),
            _ => None,
        };
        Following {
            key: (s.peers_dns.clone(), s.dns_server, s.refresh),
            task,
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl Cluster {
    /// Reads the certificates, starts following `peers_dns` and probing
    /// the members (see [`probe`]).
    pub fn start(
        s: &ClusterSettings,
        upstream: Arc<Upstream>,
        settings: UpstreamSettings,
    ) -> Result<Arc<Cluster>, String> {
        let tls = load_tls(s)?;
        let members = Arc::new(Members::new(s.advertise, s.peers.clone()));
        let dns = Following::start(&members, s)?;
        let cluster = Arc::new(Cluster {
            listen: s.listen,
            members,
            tls: ArcSwap::from_pointee(tls),
            endpoints: Mutex::default(),
            peer_timeout: Mutex::new(s.peer_timeout),
            probed_down: Mutex::default(),
            in_use: Mutex::default(),
            dns: Mutex::new(dns),
            relays: Arc::default(),
            relaying: Arc::default(),
        });
        tokio::spawn(probe(Arc::downgrade(&cluster), upstream, settings));
        Ok(cluster)
    }

    /// A reload: the static members, `peers_dns` (with its server and
    /// refresh), the certificates and the timeout take effect; `listen` and
    /// `advertise` need a restart.
    pub fn reload(&self, s: &ClusterSettings) -> Result<(), String> {
        let tls = load_tls(s)?;
        let key: DnsKey = (s.peers_dns.clone(), s.dns_server, s.refresh);
        if self.dns.lock().key != key {
            let resolver = Following::resolver(s)?;
            // The old follower stops, its answer goes, then the new one
            // publishes its own.
            let mut dns = self.dns.lock();
            if let Some(t) = dns.task.take() {
                t.abort();
            }
            self.members.set_resolved(Vec::new());
            *dns = Following::spawn(&self.members, s, resolver);
        }
        self.tls.store(Arc::new(tls));
        self.endpoints.lock().clear();
        *self.peer_timeout.lock() = s.peer_timeout;
        self.members.set_listed(s.peers.clone());
        if s.listen != self.listen || s.advertise != self.members.me() {
            tracing::warn!("cluster listen and advertise changes take effect after a restart");
        }
        Ok(())
    }

    pub fn members(&self) -> Arc<Vec<SocketAddr>> {
        self.members.current()
    }

    pub fn me(&self) -> SocketAddr {
        self.members.me()
    }

    /// Whether `ip` belongs to a current member (checked against the
    /// certificate of every peer connection).
    pub fn is_member_ip(&self, ip: IpAddr) -> bool {
        self.members.has_ip(ip)
    }

    /// Whether a client certificate names the address of a current
    /// member (checked on every request of a peer connection).
    pub fn names_member(&self, cert: &CertificateDer<'_>) -> bool {
        self.members().iter().any(|m| cert_names_ip(cert, m.ip()))
    }

    /// Has the probe watch `member` while the guard lives: this node reads
    /// a blob from it (a relay a peer sent it on to).
    pub fn watch(&self, member: SocketAddr) -> Watching {
        *self.relaying.lock().entry(member).or_insert(0) += 1;
        Watching {
            relaying: self.relaying.clone(),
            member,
        }
    }

    /// The current member whose address a client certificate names.
    pub fn member_named(&self, cert: &CertificateDer<'_>) -> Option<SocketAddr> {
        self.members()
            .iter()
            .find(|m| cert_names_ip(cert, m.ip()))
            .copied()
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.tls.load().server.clone()
    }

    /// The peers for a request of `digest` in `ns`: before the namespace's
    /// chain, the owner and the runner-up (asked as owners: either fetches
    /// once for the cluster; the runner-up takes over when the owner is
    /// down, stalls or lies, so the other nodes still fetch once between
    /// them), never this node itself; after the chain, the next candidates,
    /// asked only for what they hold. `None` when the namespace is not
    /// shared.
    pub fn plan(&self, cfg: &Config, ns: &Namespace, digest: &Digest) -> Option<Arc<PeerPlan>> {
        if !cfg.shareable(ns) {
            return None;
        }
        let me = self.me();
        let ranked = rank(&self.members(), digest);
        let owners = ranked.len().min(OWNERS);
        let (first, rest) = ranked.split_at(owners);
        // Up to this node: the ones ranked above it own the digest before it.
        let first: Vec<SocketAddr> = first.iter().take_while(|m| **m != me).copied().collect();
        let last: Vec<SocketAddr> = rest
            .iter()
            .filter(|m| **m != me)
            .take(HOLDERS_ASKED)
            .copied()
            .collect();
        let plan = Arc::new(PeerPlan {
            first: first
                .iter()
                .map(|m| self.endpoint(*m, PeerRole::Owner))
                .collect(),
            last: last
                .iter()
                .map(|m| self.endpoint(*m, PeerRole::Holder))
                .collect(),
        });
        let asked: Vec<SocketAddr> = first.into_iter().chain(last).collect();
        if !asked.is_empty() {
            let mut in_use = self.in_use.lock();
            // Plans dropped since the last probe go here too, so the list
            // stays near the number of fetches under way however many
            // requests come between two probes.
            if in_use.len() >= IN_USE_PRUNE && in_use.len().is_power_of_two() {
                in_use.retain(|(plan, _)| plan.strong_count() > 0);
            }
            in_use.push((Arc::downgrade(&plan), asked));
        }
        Some(plan)
    }

    /// The members the probe watches: those of the plans still held by
    /// requests, and those marked failing (by the probe, or by a request
    /// while in back-off), until they answer. Plans no request holds any
    /// more are forgotten here.
    fn to_probe(&self, upstream: &Upstream) -> Vec<SocketAddr> {
        let members = self.members();
        let mut watched: std::collections::HashSet<SocketAddr> = std::collections::HashSet::new();
        self.in_use.lock().retain(|(plan, asked)| {
            let live = plan.strong_count() > 0;
            if live {
                watched.extend(asked.iter().copied());
            }
            live
        });
        watched.extend(self.probed_down.lock().iter().copied());
        watched.extend(self.relaying.lock().keys().copied());
        let me = self.me();
        members
            .iter()
            .filter(|m| **m != me)
            .filter(|m| watched.contains(m) || upstream.health.backing_off(&peer_base(**m)))
            .copied()
            .collect()
    }

    /// This node's share of the digest space: the fraction of a fixed
    /// sample of digests it owns.
    pub fn ownership_share(&self) -> f64 {
        const SAMPLE: u32 = 4096;
        let members = self.members();
        let me = self.me();
        let owned = (0..SAMPLE)
            .filter(|i| {
                let d = Digest::of(&i.to_be_bytes());
                rank(&members, &d).first() == Some(&me)
            })
            .count();
        owned as f64 / SAMPLE as f64
    }

    fn endpoint(&self, addr: SocketAddr, role: PeerRole) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock();
        if let Some(ep) = map.get(&(addr, role)) {
            return ep.clone();
        }
        let client = self.tls.load().client.clone();
        // Both parse: a socket address and a fixed header.
        let base = peer_base(addr)
            .parse()
            .expect("a peer URL from a socket address");
        let ep = Arc::new(Endpoint {
            base,
            mirror: true,
            capabilities: Capabilities {
                pull: true,
                resolve: false,
            },
            headers: vec![(
                HeaderName::from_static(PEER_HEADER),
                HeaderValue::from_static(role.header()),
            )],
            public_client: client.clone(),
            client,
            implicit: false,
            public_only: false,
            origin: format!("cluster peer ({})", role.header()),
            parallel_fetches: Some(1),
            parallel_threshold: None,
        });
        map.insert((addr, role), ep.clone());
        ep
    }
}

/// How long a preheat waits for the next bytes of a blob from its owner.
const PREHEAT_IDLE: Duration = Duration::from_secs(60);

impl Cluster {
    /// Makes the owner of `digest` have it: asks it on its peer port as
    /// the owner (this node's own peer port when it owns the digest), so
    /// it answers from its cache or fetches the blob from its upstream
    /// once for the cluster, and reads the answer through, checking the
    /// digest; this node stores nothing. The owner and the blob's size.
    pub async fn preheat(
        &self,
        ns: &Namespace,
        repository: &crate::reference::Repository,
        digest: &Digest,
    ) -> Result<(SocketAddr, u64), String> {
        use http_body_util::BodyExt;
        let owner = *rank(&self.members(), digest)
            .first()
            .ok_or("the cluster has no members")?;
        let url = format!("{}/{repository}/blobs/{digest}?ns={ns}", peer_base(owner));
        let req = http::Request::get(&url)
            .header(PEER_HEADER, PeerRole::Owner.header())
            .header(relay::NO_RELAY_HEADER, "1")
            .body(http_body_util::Empty::new())
            .map_err(|e| e.to_string())?;
        let client = self.tls.load().client.clone();
        let resp = tokio::time::timeout(PREHEAT_IDLE, client.request(req))
            .await
            .map_err(|_| format!("{owner}: no answer within {PREHEAT_IDLE:?}"))?
            .map_err(|e| format!("{owner}: {}", crate::upstream::error_chain(&e)))?;
        if resp.status() != http::StatusCode::OK {
            return Err(format!("{owner} answered {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        loop {
            let frame = tokio::time::timeout(PREHEAT_IDLE, body.frame())
                .await
                .map_err(|_| format!("{owner}: nothing sent for {PREHEAT_IDLE:?}"))?;
            let Some(frame) = frame else { break };
            let frame = frame.map_err(|e| format!("{owner}: {e}"))?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
                len += data.len() as u64;
            }
        }
        if Digest::from_hasher(hasher) != *digest {
            return Err(format!("{owner} sent bytes that do not match {digest}"));
        }
        Ok((owner, len))
    }
}

/// A peer's API base, `https://ADDR/v2`: its endpoints' base, and so the
/// key of its health state.
pub fn peer_base(addr: SocketAddr) -> String {
    format!("https://{addr}/v2")
}

/// Entries of `Cluster::in_use` from which a new plan first drops those
/// no request holds (then again at each doubling).
const IN_USE_PRUNE: usize = 256;

/// How often the members in use are probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Asks the members this node is using ([`Cluster::to_probe`]: the peers
/// of fetches under way, and those marked failing until they answer) for
/// `/v2/` every [`PROBE_EVERY`], with a short timeout (three
/// `peer_timeout`s, at least a second). An idle node probes nobody, and a
/// busy one only the owners of what it fetches, so the cost per node does
/// not grow with the cluster. One that does not answer (dead, or a stopped
/// process whose kernel still accepts connections but never completes a
/// handshake) is marked failing, so requests skip it and a stream from it
/// that went silent is cut at once (`mirror::flight::Pace`) instead of
/// after `idle_timeout`. When it answers again, the probe clears its own
/// mark (not one a failed request made: a peer that sent wrong bytes sits
/// out its back-off).
async fn probe(
    cluster: std::sync::Weak<Cluster>,
    upstream: Arc<Upstream>,
    settings: UpstreamSettings,
) {
    // The first round after one period: nodes started together get that
    // long to come up.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROBE_EVERY, PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(c) = cluster.upgrade() else { return };
        let timeout = (*c.peer_timeout.lock() * 3).max(Duration::from_secs(1));
        let watched = c.to_probe(&upstream);
        let asks = watched.into_iter().map(|m| {
            let ep = c.endpoint(m, PeerRole::Holder);
            let client = ep.client.clone();
            let (upstream, settings, c) = (upstream.clone(), settings.clone(), c.clone());
            async move {
                let Ok(req) = http::Request::get(format!("{}/", peer_base(m)))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                else {
                    return;
                };
                let alive = matches!(
                    tokio::time::timeout(timeout, client.request(req)).await,
                    Ok(Ok(_))
                );
                if alive {
                    if c.probed_down.lock().remove(&m) {
                        upstream.health.success(ep.key());
                        tracing::info!(peer = %m, "cluster peer answers again");
                    }
                } else if c.probed_down.lock().insert(m) || !upstream.health.backing_off(ep.key()) {
                    let wait = upstream.health.failure(ep.key(), &settings);
                    tracing::warn!(peer = %m, backoff = ?wait, "cluster peer does not answer its probe");
                }
            }
        });
        let asks: Vec<_> = asks.collect();
        futures_util::future::join_all(asks).await;
    }
}

/// The members ranked for `digest`, highest random weight first: each
/// member's weight is a hash of its address and the digest, so every node
/// that sees the same members picks the same owner, and a member joining
/// or leaving moves only the digests it wins or held.
pub fn rank(members: &[SocketAddr], digest: &Digest) -> Vec<SocketAddr> {
    let mut scored: Vec<(u64, SocketAddr)> = members
        .iter()
        .map(|m| {
            let mut h = Sha256::new();
            h.update(m.to_string().as_bytes());
            h.update(b"\n");
            h.update(digest.to_string().as_bytes());
            let out = h.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&out[..8]);
            (u64::from_be_bytes(first), *m)
        })
        .collect();
    scored.sort_by(|a, b| b.cmp(a));
    scored.into_iter().map(|(_, m)| m).collect()
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    crate::config::hosts::pem_certs(path).map_err(|why| format!("{}: {why}", path.display()))
}

/// The peer listener's mutual-TLS configuration and the peer client.
fn load_tls(s: &ClusterSettings) -> Result<Tls, String> {
    let ca = read_pem_certs(&s.ca)?;
    for c in &ca {
        let (_, cert) = x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("{}: {e}", s.ca.display()))?;
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(b)) if b.value.ca);
        if !is_ca {
            return Err(format!(
                "{}: not a CA certificate (a node's certificate?): `ca` is the cluster CA's ca.pem",
                s.ca.display()
            ));
        }
    }
    let chain = read_pem_certs(&s.cert)?;
    let key =
        PrivateKeyDer::from_pem_file(&s.key).map_err(|e| format!("{}: {e}", s.key.display()))?;
    let mut roots = RootCertStore::empty();
    for c in &ca {
        roots
            .add(c.clone())
            .map_err(|e| format!("{}: {e}", s.ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("cluster CA: {e}"))?;
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| format!("{}: {e}", s.cert.display()))?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let host = HostSettings {
        ca,
        client: Some(ClientIdentity { chain, key }),
        dial_timeout: Some(s.peer_timeout),
        ..HostSettings::default()
    };
    let client = ClientPool::load()
        .client_only_roots(&host, s.peer_timeout)
        .map_err(|e| format!("cluster client: {e}"))?;
    Ok(Tls {
        server: Arc::new(server),
        client,
    })
}

/// GETs `url` (the daemon's `/cluster/status`): its status and body.
pub async fn fetch_status(url: &str) -> Result<(u16, String), String> {
    let (status, body) =
        crate::admin::call(http::Method::GET, url, Duration::from_secs(10)).await?;
    Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
}

/// `/cluster/status` as a table for people.
pub fn render_status(json: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return json.to_string();
    };
    let mut out = format!(
        "self {}  (peer port {}), owns {:.1}% of digests\n",
        v["self"].as_str().unwrap_or("?"),
        v["listen"].as_str().unwrap_or("?"),
        v["ownership_share"].as_f64().unwrap_or(0.0) * 100.0
    );
    out.push_str(&format!("{:<28} {}\n", "MEMBER", "HEALTH"));
    for m in v["members"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<28} {}\n",
            m["address"].as_str().unwrap_or("?"),
            m["health"].as_str().unwrap_or("?")
        ));
    }
    out
}

/// Whether the end-entity certificate `der` names `ip` (a subject
/// alternative name), as a member's certificate must.
pub fn cert_names_ip(der: &CertificateDer<'_>, ip: IpAddr) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(der) else {
        return false;
    };
    let name = rustls_pki_types::ServerName::IpAddress(ip.into());
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 5781))
    }

    #[test]
    fn owners_are_spread_and_move_little_when_a_member_joins() {
        let eight: Vec<_> = (2..10).map(addr).collect();
        let nine: Vec<_> = (2..11).map(addr).collect();
        let mut owned = HashMap::new();
        let mut moved = 0;
        for i in 0..4000u32 {
            let d = Digest::of(&i.to_be_bytes());
            let before = rank(&eight, &d)[0];
            *owned.entry(before).or_insert(0) += 1;
            let after = rank(&nine, &d)[0];
            if after != before {
                // Only to the newcomer.
                assert_eq!(after, addr(10));
                moved += 1;
            }
            // The same ranking whatever the order of the list.
            let mut reversed = eight.clone();
            reversed.reverse();
            assert_eq!(rank(&reversed, &d), rank(&eight, &d));
        }
        for (m, n) in &owned {
            assert!((350..650).contains(n), "{m} owns {n} of 4000");
        }
        // A ninth of the digests move, to the new member only.
        assert!((300..600).contains(&moved), "{moved}");
    }
}
