//! Which addresses the daemon may contact on its own initiative, so that
//! whoever can reach 127.0.0.1 cannot use it as an open proxy into the
//! node's network (loopback services, cloud metadata, the cluster's
//! private ranges).
//!
//! Endpoints configured in hosts.d are trusted as written. Hosts that are
//! named only by a request (a namespace without a hosts.d folder, reached
//! at `https://<namespace>`) and redirect targets of a public endpoint are
//! contacted only at public addresses. The check is made on the addresses
//! actually connected to: IP literals (in any notation: the URL parser
//! reads `127.1`, `2130706433` and `0x7f.1` as 127.0.0.1) before
//! connecting, names in the resolver that hands the connector its
//! addresses, so DNS rebinding cannot get around it.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
use url::{Host, Url};

/// Whether `ip` is a public unicast address: not loopback, private,
/// link-local (cloud metadata lives there), CGNAT, unique-local,
/// multicast, documentation, benchmarking or otherwise reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(a: Ipv4Addr) -> bool {
    let [o0, o1, o2, _] = a.octets();
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_documentation()
        || o0 == 0                                  // "this network"
        || (o0 == 100 && (64..128).contains(&o1))   // CGNAT 100.64/10
        || (o0 == 192 && o1 == 0 && o2 == 0)        // IETF protocol assignments
        || (o0 == 198 && (18..20).contains(&o1))    // benchmarking 198.18/15
        || o0 >= 240) // reserved
}

fn is_public_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = a.segments();
    // NAT64 (64:ff9b::/96) and IPv4-compatible (::/96) embed an IPv4 address.
    if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) || s[..6] == [0; 6] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return !a.is_unspecified() && !a.is_loopback() && is_public_v4(v4);
    }
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00   // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80   // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0   // site-local (deprecated) fec0::/10
        || (s[0] == 0x2001 && s[1] == 0x0db8)) // documentation
}

/// Why a host may not be contacted.
#[derive(Debug, thiserror::Error)]
#[error("{host} is at {addr}, not a public address")]
pub struct NotPublic {
    pub host: String,
    pub addr: IpAddr,
}

/// The refusal for a URL whose host is a non-public IP literal.
pub fn literal_refusal(url: &Url) -> Option<NotPublic> {
    let addr = match url.host()? {
        Host::Ipv4(a) => IpAddr::V4(a),
        Host::Ipv6(a) => IpAddr::V6(a),
        Host::Domain(_) => return None,
    };
    (!is_public(addr)).then(|| NotPublic {
        host: url.host_str().unwrap_or_default().to_string(),
        addr,
    })
}

/// Whether an error (from connecting) is a refusal of a non-public address.
pub fn refused(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(n) = err.downcast_ref::<NotPublic>() {
            return Some(n.to_string());
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(n) = io.get_ref().and_then(|i| i.downcast_ref::<NotPublic>()) {
                return Some(n.to_string());
            }
        }
        cur = err.source();
    }
    None
}

/// The connector's resolver: the system's, refusing names that resolve to
/// any non-public address when `public_only`.
#[derive(Clone, Debug)]
pub struct Resolver {
    pub public_only: bool,
}

type Resolving = Pin<Box<dyn Future<Output = io::Result<std::vec::IntoIter<SocketAddr>>> + Send>>;

impl tower_service::Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let public_only = self.public_only;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if public_only {
                if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        NotPublic {
                            host,
                            addr: bad.ip(),
                        },
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_not_public() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
            "::127.0.0.1",
        ] {
            assert!(!is_public(bad.parse().unwrap()), "{bad}");
        }
        for good in [
            "1.1.1.1",
            "52.1.2.3",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(is_public(good.parse().unwrap()), "{good}");
        }
    }

    #[test]
    fn ip_literals_in_any_notation_are_refused_without_resolving() {
        for host in [
            "127.1",
            "2130706433",
            "0x7f.1",
            "0177.0.0.1",
            "[::ffff:127.0.0.1]",
            "[::1]",
            "169.254.169.254",
        ] {
            let url = Url::parse(&format!("https://{host}:5000/v2/")).unwrap();
            assert!(
                literal_refusal(&url).is_some(),
                "{host} -> {:?}",
                url.host()
            );
        }
        let url = Url::parse("https://registry.example/v2/").unwrap();
        assert!(literal_refusal(&url).is_none(), "names go to the resolver");
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_of_non_public_addresses() {
        use tower_service::Service;
        let name: Name = "localhost".parse().unwrap();
        let mut strict = Resolver { public_only: true };
        let e = strict.call(name.clone()).await.unwrap_err();
        assert!(refused(&e).is_some(), "{e}");
        let mut open = Resolver { public_only: false };
        assert!(open.call(name).await.unwrap().any(|a| a.ip().is_loopback()));
    }
}
