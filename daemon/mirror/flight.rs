//! Single-flight blob fetches: however many clients ask for an uncached
//! blob at once, one task fetches it. The task belongs to no client, so a
//! client hanging up never cancels it. It finds an endpoint, pumps the
//! body into a [`cache::ingest::Ingest`](crate::cache::ingest::Ingest),
//! and reports an endpoint that broke or lied. Followers read the growing
//! file ([`crate::cache::read`]).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use std::time::{Duration, Instant};

use super::limit::Limits;
use crate::cache::ingest::{Ingest, IngestError, Phase, Progress, Pump};
use crate::cache::Store;
use crate::config::UpstreamSettings;
use crate::oci::{content_length, Content};
use crate::reference::{Digest, Namespace, Repository};
use crate::snapshot::Snapshot;
use crate::upstream::{self, AttemptError, Endpoint, Upstream, UpstreamRequest};

/// One blob being fetched.
pub struct Flight {
    pub progress: watch::Receiver<Progress>,
    /// The file being written, for readers (`pread` ignores its offset).
    pub file: File,
}

/// What a blob request reads from.
pub enum Source {
    Cached(File, u64),
    /// A fetch under way. The request that started it also gets the
    /// upstream's frames straight from memory (see [`crate::cache::read::tee`]).
    Flight(Arc<Flight>, Option<mpsc::Receiver<Bytes>>),
}

/// Frames the starting request may lag behind before it is switched to
/// reading the file, so a slow or stuck client never slows the fetch.
const LEADER_FRAMES: usize = 16;

/// The blobs being fetched now, by digest.
pub struct Flights {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    limits: Arc<Limits>,
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
}

impl Flights {
    pub fn new(store: Arc<Store>, upstream: Arc<Upstream>, limits: Arc<Limits>) -> Arc<Flights> {
        Arc::new(Flights {
            store,
            upstream,
            limits,
            map: Mutex::default(),
        })
    }

    /// How many fetches are under way.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flight for `digest` if one is under way.
    pub fn current(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.map.lock().get(digest).cloned()
    }

    /// The cached blob, the fetch under way, or a new fetch.
    pub fn get_or_start(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        ns: &Namespace,
        repository: &Repository,
        digest: &Digest,
    ) -> io::Result<Source> {
        let mut map = self.map.lock();
        if let Some(f) = map.get(digest) {
            return Ok(Source::Flight(f.clone(), None));
        }
        // Checked under the lock: a flight commits before it leaves the map,
        // so a blob is either in the map or in the store, never neither
        // while it is being fetched.
        if let Some((file, len)) = self.store.open_blob(digest)? {
            return Ok(Source::Cached(file, len));
        }
        let ingest = Ingest::start(&self.store, digest)?;
        let flight = Arc::new(Flight {
            progress: ingest.subscribe(),
            file: ingest.reader()?,
        });
        map.insert(digest.clone(), flight.clone());
        let (leader, leader_rx) = mpsc::channel(LEADER_FRAMES);
        let req = UpstreamRequest {
            method: Method::GET,
            namespace: ns.clone(),
            repository: Some(repository.clone()),
            query: Vec::new(),
            tail: format!("blobs/{digest}"),
            needs_resolve: false,
            accept: None,
        };
        let this = self.clone();
        let digest = digest.clone();
        let snap = snap.clone();
        tokio::spawn(async move {
            let _held = this.store.hold(&digest);
            let mut ingest = ingest;
            let settings = &snap.upstream.settings;
            let outcome = match this.limits.acquire(settings, &req.namespace).await {
                Ok(_slot) => this.fetch(&snap, &req, &digest, &mut ingest, leader).await,
                Err(busy) => Phase::Unavailable(busy),
            };
            if let Phase::Failed(why) = &outcome {
                tracing::warn!(%digest, error = %why, "blob fetch failed");
            }
            ingest.end(outcome);
            this.map.lock().remove(&digest);
        });
        Ok(Source::Flight(flight, Some(leader_rx)))
    }

    /// Find an endpoint, reserve the space, pump the body, verify, commit.
    async fn fetch(
        &self,
        snap: &Snapshot,
        req: &UpstreamRequest,
        digest: &Digest,
        ingest: &mut Ingest,
        leader: mpsc::Sender<Bytes>,
    ) -> Phase {
        let cfg = &snap.upstream;
        let (ep, resp) = match self.find(cfg, req).await {
            Ok(found) => found,
            Err(unavailable) => return unavailable,
        };
        let total = content_length(resp.headers());
        if let Err(why) = ingest.reserve(total) {
            return Phase::Failed(why.into());
        }
        let pump = match ingest.pump() {
            Ok(p) => p,
            Err(e) => return Phase::Failed(e.to_string().into()),
        };
        let readers = || self.store.holders(digest).saturating_sub(1);
        if let Err(why) = pump_body(resp.into_body(), &pump, leader, &cfg.settings, readers).await {
            pump.stop().await;
            self.upstream.report_failure(cfg, &ep, &why);
            return Phase::Failed(why.into());
        }
        let len = match ingest.verify(pump, total).await {
            Ok(len) => len,
            Err(e @ IngestError::Write { .. }) => return Phase::Failed(e.to_string().into()),
            Err(e @ IngestError::Mismatch { .. }) => {
                let why = e.to_string();
                self.upstream.report_failure(cfg, &ep, &why);
                return Phase::Failed(why.into());
            }
        };
        if let Err(e) = ingest.commit().await {
            tracing::warn!(%digest, error = %e, "verified blob could not be stored");
            return Phase::Verified;
        }
        crate::metrics::METRICS.upstream_bytes.add(&[], len);
        crate::metrics::METRICS.blob_committed(len);
        tracing::info!(%digest, bytes = len, endpoint = ep.key(), "blob cached");
        Phase::Done
    }

    /// The first endpoint that answers 200 for the blob.
    async fn find(
        &self,
        cfg: &upstream::Config,
        req: &UpstreamRequest,
    ) -> Result<(Arc<Endpoint>, Response<Incoming>), Phase> {
        self.upstream
            .first_success(cfg, req, |ep, resp| async move {
                if resp.status() != StatusCode::OK {
                    return Err(AttemptError::Status(resp.status()));
                }
                Ok((ep, resp))
            })
            .await
            .map(|(found, _)| found)
            .map_err(|exhausted| Phase::Unavailable(exhausted.into_error(Content::Blob)))
    }
}

/// How often a fetch's pace is looked at.
const PACE_TICK: Duration = Duration::from_secs(1);

/// The window over which a fetch nobody reads must keep `min_rate`.
const ABANDONED_WINDOW: Duration = Duration::from_secs(5);

/// Moves the upstream body into the ingest, and to the leader while it
/// keeps up. Ends at the body's end, or with why the transfer was cut:
/// silence longer than `idle_timeout`, longer than `fetch_deadline` in
/// all, or slower than `min_rate` over `idle_timeout` (over a few seconds
/// once `readers` says nobody reads it any more).
async fn pump_body(
    mut body: Incoming,
    pump: &Pump,
    leader: mpsc::Sender<Bytes>,
    s: &UpstreamSettings,
    readers: impl Fn() -> usize,
) -> Result<(), String> {
    let mut leader = Some(leader);
    let started = Instant::now();
    let mut last_data = started;
    let (mut window_start, mut window_bytes) = (started, 0u64);
    let mut tick = tokio::time::interval(PACE_TICK);
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = tick.tick() => {
                let now = Instant::now();
                if now - last_data > s.idle_timeout {
                    return Err(format!("upstream sent nothing for {:?}", s.idle_timeout));
                }
                if now - started > s.fetch_deadline {
                    return Err(format!("fetch took longer than {:?}", s.fetch_deadline));
                }
                let window = if readers() == 0 {
                    ABANDONED_WINDOW.min(s.idle_timeout)
                } else {
                    s.idle_timeout
                };
                let elapsed = now - window_start;
                if elapsed >= window {
                    let rate = window_bytes as f64 / elapsed.as_secs_f64();
                    if rate < s.min_rate as f64 {
                        return Err(format!(
                            "upstream sent {rate:.0} bytes/s, under min_rate {} (readers: {})",
                            s.min_rate,
                            readers()
                        ));
                    }
                    (window_start, window_bytes) = (now, 0);
                }
                continue;
            }
        };
        match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(format!("upstream body: {e}")),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                last_data = Instant::now();
                window_bytes += data.len() as u64;
                // Never wait for the leader: when it lags or has gone, it
                // continues from the file.
                if leader
                    .as_ref()
                    .is_some_and(|l| l.try_send(data.clone()).is_err())
                {
                    leader = None;
                }
                if !pump.push(data).await {
                    return Ok(()); // the writer failed; verify says why
                }
            }
        }
    }
}
