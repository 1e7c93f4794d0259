//! `[cluster]`: the nodes that share their caches.
//!
//! ```toml
//! [cluster]
//! listen = "10.0.0.5:5781"        # peer listener, mutual TLS only
//! advertise = "10.0.0.5:5781"     # how peers reach this node (default: listen)
//! peers = ["10.0.0.5:5781", "10.0.0.6:5781"]
//! peers_dns = "nodemirror-peers.kube-system.svc.cluster.local:5781"
//! dns_server = "10.96.0.10:53"    # default: the system's resolver
//! refresh = "5s"                  # how often peers_dns is resolved again
//! peer_timeout = "300ms"          # connecting to a peer
//! ca = "/etc/nodemirror/cluster/ca.pem"
//! cert = "/etc/nodemirror/cluster/node.pem"
//! key = "/etc/nodemirror/cluster/node-key.pem"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::source::{ConfigErrors, Field};

/// Cluster mode, when `[cluster]` is present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    /// Static members (this node may be among them).
    pub peers: Vec<SocketAddr>,
    /// Members from the A/AAAA records of a name, at a port.
    pub peers_dns: Option<(String, u16)>,
    /// The DNS server to ask; the system's resolver when unset.
    pub dns_server: Option<SocketAddr>,
    pub refresh: Duration,
    pub peer_timeout: Duration,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Reads the `[cluster]` table; paths are relative to the config file's
/// folder.
pub fn parse(f: &Field<'_>, base: &Path) -> Result<ClusterSettings, ConfigErrors> {
    let mut listen = None;
    let mut advertise = None;
    let mut peers = Vec::new();
    let mut peers_dns = None;
    let mut dns_server = None;
    let mut refresh = Duration::from_secs(5);
    let mut peer_timeout = Duration::from_millis(300);
    let (mut ca, mut cert, mut key) = (None, None, None);
    let addr = |f: &Field<'_>, s: &str| -> Result<SocketAddr, ConfigErrors> {
        s.parse().map_err(|e| {
            f.src
                .error(
                    f.span.clone(),
                    format!("`{}`: {s:?} is not IP:PORT: {e}", f.key),
                )
                .into()
        })
    };
    f.section(|f| {
        match f.key {
            "listen" => listen = Some(addr(&f, f.str()?)?),
            "advertise" => advertise = Some(addr(&f, f.str()?)?),
            "peers" => {
                for p in f.strings()? {
                    peers.push(addr(&f, p)?);
                }
            }
            "peers_dns" => {
                let v = f.str()?;
                let parsed = v
                    .rsplit_once(':')
                    .and_then(|(name, port)| Some((name.to_string(), port.parse::<u16>().ok()?)))
                    .filter(|(name, _)| !name.is_empty());
                peers_dns = Some(parsed.ok_or_else(|| {
                    ConfigErrors::from(f.src.error(
                        f.span.clone(),
                        format!("`peers_dns`: {v:?} is not NAME:PORT"),
                    ))
                })?);
            }
            "dns_server" => dns_server = Some(addr(&f, f.str()?)?),
            "refresh" => refresh = f.duration_from(Duration::from_secs(1))?,
            "peer_timeout" => peer_timeout = f.duration_from(super::MIN_TIMEOUT)?,
            "ca" => ca = Some(base.join(f.str()?)),
            "cert" => cert = Some(base.join(f.str()?)),
            "key" => key = Some(base.join(f.str()?)),
            _ => return Err(f.unknown()),
        }
        Ok(())
    })?;
    let missing = |what: &str| -> ConfigErrors {
        f.src
            .error(f.span.clone(), format!("`[cluster]` needs `{what}`"))
            .into()
    };
    let listen = listen.ok_or_else(|| missing("listen"))?;
    if peers.is_empty() && peers_dns.is_none() {
        return Err(missing("peers or peers_dns"));
    }
    Ok(ClusterSettings {
        listen,
        advertise: advertise.unwrap_or(listen),
        peers,
        peers_dns,
        dns_server,
        refresh,
        peer_timeout,
        ca: ca.ok_or_else(|| missing("ca"))?,
        cert: cert.ok_or_else(|| missing("cert"))?,
        key: key.ok_or_else(|| missing("key"))?,
    })
}
