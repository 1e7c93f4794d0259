//! Who is in the cluster: the static `peers` list and the A/AAAA records
//! of `peers_dns`, re-resolved every `refresh`, and always this node. No
//! leader, no coordination: each node ranks digests over the members it
//! sees; a short disagreement while membership changes only sends a few
//! requests to a node that is not (or no longer) the owner, which still
//! answers them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use parking_lot::Mutex;

/// The members as this node sees them.
pub struct Members {
    me: SocketAddr,
    current: ArcSwap<Vec<SocketAddr>>,
    sources: Mutex<Sources>,
}

#[derive(Default)]
struct Sources {
    listed: Vec<SocketAddr>,
    resolved: Vec<SocketAddr>,
}

impl Members {
    pub fn new(me: SocketAddr, listed: Vec<SocketAddr>) -> Members {
        let m = Members {
            me,
            current: ArcSwap::from_pointee(Vec::new()),
            sources: Mutex::new(Sources::default()),
        };
        m.set_listed(listed);
        m
    }

    /// This node's own address (`advertise`).
    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// Every member, this node included, sorted.
    pub fn current(&self) -> Arc<Vec<SocketAddr>> {
        self.current.load_full()
    }

    /// The static list changed (a reload).
    pub fn set_listed(&self, listed: Vec<SocketAddr>) {
        let mut s = self.sources.lock();
        s.listed = listed;
        self.publish(&s);
    }

    /// `peers_dns` answered with these.
    pub fn set_resolved(&self, resolved: Vec<SocketAddr>) {
        let mut s = self.sources.lock();
        s.resolved = resolved;
        self.publish(&s);
    }

    fn publish(&self, s: &Sources) {
        let mut all: Vec<SocketAddr> = s
            .listed
            .iter()
            .chain(&s.resolved)
            .copied()
            .chain([self.me])
            .collect();
        all.sort();
        all.dedup();
        if *self.current.load_full() != all {
            tracing::info!(members = ?all, "cluster members");
            self.current.store(Arc::new(all));
        }
    }

    /// Whether `ip` is a member's address.
    pub fn has_ip(&self, ip: std::net::IpAddr) -> bool {
        self.current().iter().any(|m| m.ip() == ip)
    }
}

/// A resolver that asks `server`, or the system's resolver. Answers are
/// kept at most a second, so each refresh sees changes.
pub fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(s) => TokioResolver::builder_with_config(
            ResolverConfig::from_parts(
                None,
                Vec::new(),
                NameServerConfigGroup::from_ips_clear(&[s.ip()], s.port(), true),
            ),
            TokioConnectionProvider::default(),
        ),
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system's resolver configuration: {e}"))?,
    };
    let opts = builder.options_mut();
    opts.positive_max_ttl = Some(Duration::from_secs(1));
    opts.negative_max_ttl = Some(Duration::from_secs(1));
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    Ok(builder.build())
}

/// Resolves `name` every `every` and publishes its addresses at `port`.
/// A failed lookup keeps the last answer (a DNS hiccup does not empty the
/// cluster); an empty answer empties it.
pub async fn follow_dns(
    members: Arc<Members>,
    resolver: TokioResolver,
    name: String,
    port: u16,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match resolver.lookup_ip(name.as_str()).await {
            Ok(found) => {
                let addrs = found.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                members.set_resolved(addrs);
            }
            Err(e) if e.is_no_records_found() => members.set_resolved(Vec::new()),
            Err(e) => {
                tracing::warn!(%name, error = %e, "cannot resolve the cluster's peers; keeping the last answer");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 5781))
    }

    #[test]
    fn members_are_the_list_the_records_and_this_node() {
        let m = Members::new(a(1), vec![a(2), a(3)]);
        assert_eq!(*m.current(), [a(1), a(2), a(3)]);
        // A reload drops one and adds one; DNS adds two, one of them listed.
        m.set_listed(vec![a(3), a(4)]);
        m.set_resolved(vec![a(4), a(5)]);
        assert_eq!(*m.current(), [a(1), a(3), a(4), a(5)]);
        // The records go; this node stays, whatever the sources say.
        m.set_resolved(Vec::new());
        m.set_listed(Vec::new());
        assert_eq!(*m.current(), [a(1)]);
        assert!(m.has_ip(a(1).ip()) && !m.has_ip(a(5).ip()));
    }
}
