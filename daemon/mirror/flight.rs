//! Single-flight blob fetches: however many clients ask for an uncached
//! blob at once, one task fetches it. The task belongs to no client, so a
//! client hanging up never cancels it. It finds an endpoint, pumps the
//! body into a [`cache::ingest::Ingest`](crate::cache::ingest::Ingest),
//! and reports an endpoint that broke or lied. Followers read the growing
//! file ([`crate::cache::read`]).
//!
//! A fetch belongs to the route that started it: the namespace whose
//! endpoint chain it asks. Its bytes are unverified until the digest
//! matched, so they stay on that route: clients of the same namespace
//! follow it freely (ranges included), clients of another namespace
//! follow it only when its route is public, and then as reads whose last
//! byte waits for the verification (see `mirror::blob`); a fetch of a
//! private route is followed by nobody else. Each route has its own fetch
//! of a digest when it needs one; the first verified copy goes into the
//! store, and every verified copy records its namespace as an origin.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, Notify};

use super::access;
use super::fetch;
use super::limit::Limits;
use super::pieces::Pieces;
use crate::cache::ingest::{Ingest, Phase, Progress};
use crate::cache::{pool, Store};
use crate::cluster::{Cluster, PeerRole};
use crate::reference::{Digest, Namespace, Repository};
use crate::snapshot::Snapshot;
use crate::upstream::{Upstream, UpstreamRequest};

/// One blob being fetched through one route.
pub struct Flight {
    pub progress: watch::Receiver<Progress>,
    /// The file being written, for readers (`pread` ignores its offset).
    pub file: File,
    /// The namespace whose endpoints it asks.
    pub route: Namespace,
    /// Whether that namespace was public when the fetch began: only then
    /// may clients of other namespaces follow it.
    pub public: bool,
    /// Who fetches which bytes, and what readers wait for.
    pub pieces: Arc<Pieces>,
    /// Clients reading it now.
    readers: AtomicUsize,
}

impl Flight {
    /// A reader waits for bytes `start..end`: they are fetched at once if
    /// nobody fetches them yet. Until the guard drops.
    pub fn want(&self, start: u64, end: u64) -> Wanting {
        Wanting(self.pieces.clone(), self.pieces.want(start, end))
    }

    /// Counts a client reading this fetch until the guard drops.
    pub fn reading(self: &Arc<Self>) -> Reading {
        self.readers.fetch_add(1, Ordering::Relaxed);
        Reading(self.clone())
    }

    pub fn readers(&self) -> usize {
        self.readers.load(Ordering::Relaxed)
    }
}

/// A client reading a fetch (see [`Flight::reading`]).
pub struct Reading(Arc<Flight>);

impl Reading {
    pub fn flight(&self) -> &Arc<Flight> {
        &self.0
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A reader's range in a flight's table (see [`Flight::want`]).
pub struct Wanting(Arc<Pieces>, u64);

impl Drop for Wanting {
    fn drop(&mut self) {
        self.0.unwant(self.1);
    }
}

/// What a blob request reads from.
pub enum Source {
    /// In the store and visible to the request's namespace.
    Cached(File, u64),
    /// In the store, but brought in only by namespaces this request may
    /// not see it under: its namespace's upstream may confirm that it
    /// serves the digest (a HEAD), since the operator vouches for it.
    Unconfirmed(File, u64),
    /// A fetch under way; `own` when it runs on the request's own route.
    /// The request that started it also gets the upstream's frames
    /// straight from memory (see [`crate::cache::read::tee`]).
    Flight {
        flight: Arc<Flight>,
        leader: Option<mpsc::Receiver<Bytes>>,
        own: bool,
    },
    /// A peer asked as a holder, or for content not shared with peers:
    /// this node has nothing for it.
    NotHeld,
}

/// What a blob request is, for [`Flights::get_or_start`].
pub struct Want<'a> {
    pub snap: &'a Arc<Snapshot>,
    pub ns: &'a Namespace,
    pub repository: &'a Repository,
    pub digest: &'a Digest,
    /// Cluster mode: asked by a peer, as this.
    pub peer: Option<PeerRole>,
    /// Whether another route's public fetch may be followed.
    pub follow_others: bool,
    /// A range read: its first range (first byte, last byte if bounded),
    /// which a new fetch asks for first. `None`: a read of the whole blob.
    pub range: Option<(u64, Option<u64>)>,
}

/// Frames the starting request may lag behind before it is switched to
/// reading the file, so a slow or stuck client never slows the fetch.
const LEADER_FRAMES: usize = 16;

/// The blobs being fetched now, by digest: one fetch per route.
pub struct Flights {
    store: Arc<Store>,
    pub(super) upstream: Arc<Upstream>,
    limits: Arc<Limits>,
    cluster: Option<Arc<Cluster>>,
    map: Mutex<HashMap<Digest, Vec<Arc<Flight>>>>,
    /// Flights that have left the map, counted ([`Flights::get_or_start`]).
    landed: AtomicU64,
    /// Told each time the last fetch under way ends.
    idle: Notify,
}

impl Flights {
    pub fn new(
        store: Arc<Store>,
        upstream: Arc<Upstream>,
        limits: Arc<Limits>,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Flights> {
        Arc::new(Flights {
            store,
            upstream,
            limits,
            cluster,
            map: Mutex::default(),
            landed: AtomicU64::new(0),
            idle: Notify::new(),
        })
    }

    /// How many fetches are under way.
    pub fn len(&self) -> usize {
        self.map.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }

    /// Resolves when the last fetch under way ends. One such end that came
    /// while nobody was waiting is remembered, so none is missed.
    pub async fn idle(&self) {
        self.idle.notified().await
    }

    /// The fetch of `digest` through `ns`, if one is under way.
    pub fn own(&self, digest: &Digest, ns: &Namespace) -> Option<Arc<Flight>> {
        let map = self.map.lock();
        map.get(digest)?.iter().find(|f| f.route == *ns).cloned()
    }

    /// Removes `flight` from the map (not a newer fetch of the digest).
    fn land(&self, digest: &Digest, flight: &Arc<Flight>) {
        let mut map = self.map.lock();
        if let Some(list) = map.get_mut(digest) {
            list.retain(|f| !Arc::ptr_eq(f, flight));
            if list.is_empty() {
                map.remove(digest);
            }
        }
        self.landed.fetch_add(1, Ordering::Release);
        if map.is_empty() {
            self.idle.notify_one();
        }
    }

    /// The cached blob if the request may see it, the fetch under way that
    /// it may follow, or a new fetch through its namespace. A new fetch
    /// for a local client asks the cluster's peers (when configured); one
    /// for a peer asking as the owner goes to the upstreams only; a peer
    /// asking as a holder gets what is here or nothing. Peers never get
    /// content not shared with them, and never make a namespace an origin.
    ///
    /// The store is looked at on the disk pool, outside the lock (opening
    /// the file, reading its origins, refreshing its time); a new fetch's
    /// temp file is made there too. Under the lock only the map is read
    /// and changed, so a slow disk holds no other request.
    pub async fn get_or_start(self: &Arc<Self>, want: Want<'_>) -> io::Result<Source> {
        let Want {
            snap,
            ns,
            repository,
            digest,
            peer,
            follow_others,
            range,
        } = want;
        let cfg = &snap.upstream;
        /// What the map says, decided under its lock.
        enum Step {
            Answer(Source),
            LookAgain,
            Prepare,
            Started(Arc<Flight>, Ingest, Option<Arc<crate::upstream::PeerPlan>>),
        }
        let mut prepared: Option<(Ingest, File)> = None;
        // Looks again after a landing, a few times at most (then, at
        // worst, a blob is fetched twice, which is still right).
        let mut relooks = 0;
        'look: loop {
            // A flight that lands between this look and the lock below
            // bumps `landed`: its blob may be in the store now, so look
            // again rather than fetch it twice.
            let seen = self.landed.load(Ordering::Acquire);
            let cached = {
                let (store, d) = (self.store.clone(), digest.clone());
                pool::run(move || store.cached_blob(&d)).await??
            };
            loop {
                let step = {
                    let mut map = self.map.lock();
                    let under_way = map.get(digest).map(Vec::as_slice).unwrap_or_default();
                    let own = under_way.iter().find(|f| f.route == *ns).cloned();
                    let other = under_way
                        .iter()
                        .find(|f| f.public && follow_others)
                        .cloned();
                    let visible = cached
                        .as_ref()
                        .map(|b| access::visible(cfg, &b.origins, ns, peer.is_some()));
                    match (&cached, visible) {
                        (None, _)
                            if under_way.is_empty()
                                && relooks < 3
                                && self.landed.load(Ordering::Acquire) != seen =>
                        {
                            Step::LookAgain
                        }
                        (Some(b), Some(true)) => {
                            Step::Answer(Source::Cached(b.file.try_clone()?, b.len))
                        }
                        (Some(_), _) if peer.is_some() => Step::Answer(Source::NotHeld),
                        (Some(b), _) if cfg.vouches_for(ns) => {
                            Step::Answer(Source::Unconfirmed(b.file.try_clone()?, b.len))
                        }
                        // Not cached, or cached under origins this namespace
                        // may not see and it is one anyone may name: it
                        // proves it serves the digest only by serving it, a
                        // fetch of its own, verified.
                        _ => match (own, other) {
                            (Some(flight), _) => Step::Answer(Source::Flight {
                                flight,
                                leader: None,
                                own: true,
                            }),
                            (None, Some(flight)) => Step::Answer(Source::Flight {
                                flight,
                                leader: None,
                                own: false,
                            }),
                            _ if peer == Some(PeerRole::Holder) => Step::Answer(Source::NotHeld),
                            _ => match prepared.take() {
                                None => Step::Prepare,
                                Some((ingest, file)) => {
                                    let peers = match (peer, &self.cluster) {
                                        (None, Some(c)) => c.plan(cfg, ns, digest),
                                        _ => None,
                                    };
                                    // A whole read fetches the whole blob;
                                    // a range read its range, and the rest
                                    // as the settings say.
                                    let background = cfg.settings.range_rest_background;
                                    let pieces = Pieces::new(
                                        range.is_none() || background,
                                        range.is_some() && background,
                                    );
                                    let flight = Arc::new(Flight {
                                        progress: ingest.subscribe(),
                                        file,
                                        route: ns.clone(),
                                        public: !cfg.is_private(ns),
                                        pieces: Arc::new(pieces),
                                        readers: AtomicUsize::new(0),
                                    });
                                    map.entry(digest.clone()).or_default().push(flight.clone());
                                    Step::Started(flight, ingest, peers)
                                }
                            },
                        },
                    }
                };
                match step {
                    Step::Answer(source) => {
                        if let Some(unused) = prepared.take() {
                            // Another request started the fetch meanwhile.
                            let _ = pool::run(move || drop(unused)).await;
                        }
                        return Ok(source);
                    }
                    Step::LookAgain => {
                        relooks += 1;
                        continue 'look;
                    }
                    Step::Prepare => {
                        // The temp file, off the lock; then the map again
                        // (another request may have started meanwhile).
                        let (store, d) = (self.store.clone(), digest.clone());
                        prepared = Some(
                            pool::run(move || -> io::Result<(Ingest, File)> {
                                let ingest = Ingest::start(&store, &d)?;
                                let file = ingest.reader()?;
                                Ok((ingest, file))
                            })
                            .await??,
                        );
                    }
                    Step::Started(flight, ingest, peers) => {
                        let (leader, leader_rx) = mpsc::channel(LEADER_FRAMES);
                        let req = UpstreamRequest {
                            method: Method::GET,
                            namespace: ns.clone(),
                            repository: Some(repository.clone()),
                            query: Vec::new(),
                            tail: format!("blobs/{digest}"),
                            needs_resolve: false,
                            accept: None,
                            range: None,
                            peers,
                        };
                        let landing = Landing {
                            flights: self.clone(),
                            digest: digest.clone(),
                            flight: flight.clone(),
                            ingest: Some(ingest),
                        };
                        tokio::spawn(landing.fly(snap.clone(), req, range, leader));
                        return Ok(Source::Flight {
                            flight,
                            leader: Some(leader_rx),
                            own: true,
                        });
                    }
                }
            }
        }
    }
}

/// A fetch task's hold on its flight. Whatever ends the task, a panic
/// included, dropping it ends the ingest (as failed, unless it ended
/// already: every reader gets an error, and the temporary file goes) and
/// takes the flight out of the map, so no digest is ever wedged.
struct Landing {
    flights: Arc<Flights>,
    digest: Digest,
    flight: Arc<Flight>,
    ingest: Option<Ingest>,
}

impl Landing {
    /// The fetch task: a slot, then the fetch, then the end.
    async fn fly(
        mut self,
        snap: Arc<Snapshot>,
        req: UpstreamRequest,
        range: Option<(u64, Option<u64>)>,
        leader: mpsc::Sender<Bytes>,
    ) {
        let this = self.flights.clone();
        let _held = this.store.hold(&self.digest);
        let (digest, flight) = (self.digest.clone(), self.flight.clone());
        let Some(ingest) = self.ingest.as_mut() else {
            return;
        };
        let outcome = match this.limits.acquire(&snap.upstream, &req.namespace).await {
            Ok(_slot) => {
                let started = Instant::now();
                let outcome = fetch::blob(
                    (&this.upstream, this.cluster.as_ref()),
                    &snap,
                    &req,
                    (&digest, range),
                    (&flight.pieces, &|| flight.readers()),
                    ingest,
                    leader,
                )
                .await;
                let result = match outcome {
                    Phase::Done | Phase::Verified => "ok",
                    Phase::Unavailable(_) => "unavailable",
                    _ => "error",
                };
                crate::metrics::METRICS.upstream_duration.observe_since(
                    &[
                        (
                            "ns",
                            crate::metrics::ns_label(&snap, req.namespace.as_str()),
                        ),
                        ("kind", "blob"),
                        ("result", result),
                    ],
                    started,
                );
                outcome
            }
            Err(busy) => Phase::Unavailable(busy),
        };
        if let Phase::Failed(why) = &outcome {
            tracing::warn!(%digest, namespace = %req.namespace, error = %why, "blob fetch failed");
        }
        if let Some(ingest) = self.ingest.take() {
            ingest.end(outcome);
        }
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        if let Some(ingest) = self.ingest.take() {
            tracing::error!(digest = %self.digest, "blob fetch task ended without an outcome");
            ingest.end(Phase::Failed("the fetch ended unexpectedly".into()));
        }
        self.flights.land(&self.digest, &self.flight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetch task that panics still releases its flight: readers get
    /// an error, the temporary file goes, the digest can be fetched again.
    #[tokio::test]
    async fn a_panicking_fetch_task_releases_its_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let flights = Flights::new(
            store.clone(),
            Arc::new(Upstream::new()),
            Arc::new(Limits::default()),
            None,
        );
        let digest = Digest::of(b"never fetched");
        let ingest = Ingest::start(&store, &digest).unwrap();
        let flight = Arc::new(Flight {
            progress: ingest.subscribe(),
            file: ingest.reader().unwrap(),
            route: "reg.test".parse().unwrap(),
            public: true,
            pieces: Arc::new(Pieces::new(true, false)),
            readers: AtomicUsize::new(0),
        });
        flights
            .map
            .lock()
            .insert(digest.clone(), vec![flight.clone()]);
        let landing = Landing {
            flights: flights.clone(),
            digest: digest.clone(),
            flight: flight.clone(),
            ingest: Some(ingest),
        };
        assert_eq!(crate::cache::read_dir_len(&dir.path().join("tmp")), 1);
        let task = tokio::spawn(async move {
            let _landing = landing;
            panic!("a bug in the fetch");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(flights.is_empty(), "the flight left the map");
        let mut progress = flight.progress.clone();
        let phase = progress
            .wait_for(|p| !matches!(p.phase, Phase::Connecting))
            .await
            .map(|p| p.phase.clone())
            .unwrap();
        assert!(phase.failure().is_some(), "{phase:?}");
        assert_eq!(crate::cache::read_dir_len(&dir.path().join("tmp")), 0);
    }
}
