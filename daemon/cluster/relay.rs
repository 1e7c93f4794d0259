//! No hot owner: a blob spreads through the cluster as a tree.
//!
//! A node sends a blob to at most [`FANOUT`] peers (those receiving it
//! now, and those that received it within [`RECENT`]). A peer that asks
//! for it beyond that is sent on (`307`, `Location` on another member's
//! peer port) to one of those, which serves it from its own fetch as the
//! bytes arrive (or from its cache), and sends further askers on to its
//! own receivers in turn. A rollout to N nodes
//! becomes a tree of degree 4 and depth log4(N) hanging from the owner,
//! which still makes the one upstream fetch; no node sends more than 4
//! copies at once, whatever N.
//!
//! Why a tree from the requests themselves rather than a piece swarm
//! (Kraken) or a scheduler (Dragonfly): the nodes of a rollout are already
//! fetching the blob from the owner, each through its own single-flight
//! that verifies every byte and serves followers from the growing file.
//! Sending an asker to a node that is itself receiving reuses exactly
//! that: no piece map, no tracker, no scheduler to run or to fail, and the
//! relay's bytes carry the same rule as any peer's (its last byte only
//! after it verified the digest; the asker verifies again). A relay that
//! fails is a failed endpoint: the asker goes on with its plan (the
//! runner-up, the upstream), as for a failed owner.
//!
//! Redirects stay within the cluster: the `Location` names a current
//! member's peer port, which the asker reaches with its cluster client
//! (mutual TLS), asked as a holder (it serves what it has, never fetches).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::reference::Digest;

/// Copies of a blob a node sends to peers at once.
pub const FANOUT: usize = 4;

/// A request that must be answered here, never sent on (a preheat reads
/// the owner's answer through).
pub const NO_RELAY_HEADER: &str = "x-nodemirror-no-relay";

/// The peers receiving each blob from this node now, or that received
/// it within [`RECENT`]: they have it, in flight or cached.
#[derive(Default)]
pub struct Relays {
    sending: Mutex<HashMap<Digest, Vec<Receiver>>>,
    /// Turns, so askers are spread over the receivers.
    turn: std::sync::atomic::AtomicUsize,
}

struct Receiver {
    member: SocketAddr,
    /// Responses under way to it.
    active: usize,
    /// When the last one ended.
    last: Instant,
}

/// How long a peer that received a blob counts among its copies (and is
/// where others are sent): a rollout's askers come within seconds.
pub const RECENT: Duration = Duration::from_secs(60);

/// Blobs remembered before the expired ones are dropped from the map.
const PRUNE_AT: usize = 4096;

/// What to do with a peer's request for a blob.
pub enum Relay {
    /// Serve it, counting the asker among the receivers until the guard
    /// drops (with the response body).
    Serve(Sending),
    /// Send the asker on to this member.
    SendOn(SocketAddr),
}

/// Counts a peer among a blob's receivers while alive.
pub struct Sending {
    relays: Arc<Relays>,
    digest: Digest,
    to: SocketAddr,
}

impl Drop for Sending {
    fn drop(&mut self) {
        let mut map = self.relays.sending.lock();
        if let Some(r) = map
            .get_mut(&self.digest)
            .and_then(|list| list.iter_mut().find(|r| r.member == self.to))
        {
            r.active = r.active.saturating_sub(1);
            r.last = Instant::now();
        }
    }
}

fn expired(r: &Receiver, now: Instant) -> bool {
    r.active == 0 && now.duration_since(r.last) > RECENT
}

impl Relays {
    /// Whether `from` gets `digest` from this node or is sent on: on when
    /// [`FANOUT`] other peers have it from here (receiving now, or within
    /// [`RECENT`]); a peer asking again (a resume) is served.
    pub fn decide(self: &Arc<Self>, digest: &Digest, from: SocketAddr) -> Relay {
        let now = Instant::now();
        let mut map = self.sending.lock();
        if map.len() >= PRUNE_AT {
            map.retain(|_, list| !list.iter().all(|r| expired(r, now)));
        }
        let list = map.entry(digest.clone()).or_default();
        list.retain(|r| !expired(r, now));
        if let Some(r) = list.iter_mut().find(|r| r.member == from) {
            r.active += 1;
        } else if list.len() >= FANOUT {
            let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Relay::SendOn(list[turn % list.len()].member);
        } else {
            list.push(Receiver {
                member: from,
                active: 1,
                last: now,
            });
        }
        Relay::Serve(Sending {
            relays: self.clone(),
            digest: digest.clone(),
            to: from,
        })
    }

    /// Peers that have `digest` from here (receiving it, or recently).
    #[cfg(test)]
    fn receivers(&self, digest: &Digest) -> usize {
        let now = Instant::now();
        self.sending
            .lock()
            .get(digest)
            .map_or(0, |list| list.iter().filter(|r| !expired(r, now)).count())
    }
}

/// A response body that keeps a guard (a [`Sending`]) until it ends.
pub struct Guarded<B, G> {
    pub body: B,
    pub guard: G,
}

impl<B: http_body::Body + Unpin, G: Unpin> http_body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 5781))
    }

    #[test]
    fn four_receivers_at_a_time_the_rest_sent_on_to_them() {
        let relays = Arc::new(Relays::default());
        let d = Digest::of(b"blob");
        let mut held = Vec::new();
        for i in 1..=FANOUT as u8 {
            match relays.decide(&d, at(i)) {
                Relay::Serve(s) => held.push(s),
                Relay::SendOn(_) => panic!("the first four are served"),
            }
        }
        let mut sent_to = std::collections::HashSet::new();
        for i in 10..18 {
            match relays.decide(&d, at(i)) {
                Relay::SendOn(m) => {
                    assert!((1..=FANOUT as u8).map(at).any(|r| r == m));
                    sent_to.insert(m);
                }
                Relay::Serve(_) => panic!("a fifth is sent on"),
            }
        }
        assert_eq!(sent_to.len(), FANOUT, "spread over every receiver");
        // A receiver asking again (a resume) is served.
        assert!(matches!(relays.decide(&d, at(1)), Relay::Serve(_)));
        // Another blob has its own receivers.
        assert!(matches!(
            relays.decide(&Digest::of(b"other"), at(9)),
            Relay::Serve(_)
        ));
        // One done: it still has the blob, and still counts as a copy.
        held.pop();
        assert_eq!(relays.receivers(&d), FANOUT);
        assert!(matches!(relays.decide(&d, at(30)), Relay::SendOn(_)));
        held.clear();
    }
}
