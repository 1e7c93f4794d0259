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
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

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
            range_from: None,
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
        let started = Instant::now();
        let mut leader = Some(leader);
        let mut t = Transfer::default();
        let (mut ep, mut body) = (ep, resp.into_body());
        let mut resumes = 0;
        let mut progress_at_cut = None;
        loop {
            let cut = match pump_body(
                body,
                &pump,
                &mut leader,
                &cfg.settings,
                &readers,
                started,
                &mut t,
            )
            .await
            {
                Ok(()) => break,
                Err(cut) => cut,
            };
            self.upstream.report_failure(cfg, &ep, cut.why());
            // A broken or crawling connection of a blob someone reads is
            // resumed from where it stopped, on the endpoints in plan
            // order (healthy ones first: the next endpoint, or this one
            // as a last resort); the clients see one uninterrupted body.
            // A resumed connection that brought nothing new ends it.
            let progressed = progress_at_cut != Some(t.received);
            progress_at_cut = Some(t.received);
            let resumable =
                cut.resumable() && progressed && resumes < MAX_RESUMES && total.is_some();
            let resumed = match resumable {
                true => self.resume(cfg, req, t.received, total).await,
                false => None,
            };
            let Some((next, next_body, skip)) = resumed else {
                pump.stop().await;
                return Phase::Failed(cut.why().into());
            };
            resumes += 1;
            crate::metrics::METRICS
                .resumes
                .inc(&[("endpoint", next.key())]);
            tracing::info!(%digest, from = t.received, endpoint = next.key(), after = cut.why(),
                "resuming the blob where the transfer stopped");
            (ep, body, t.skip) = (next, next_body, skip);
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

    /// The blob from byte `from` on: a 206 whose `Content-Range` starts
    /// there (and agrees on the size), or a 200 whose first `from` bytes
    /// are then skipped (an endpoint that ignores `Range`).
    async fn resume(
        &self,
        cfg: &upstream::Config,
        req: &UpstreamRequest,
        from: u64,
        total: Option<u64>,
    ) -> Option<(Arc<Endpoint>, Incoming, u64)> {
        let ranged = UpstreamRequest {
            range_from: Some(from),
            ..req.clone()
        };
        let found = self
            .upstream
            .first_success(cfg, &ranged, |ep, resp| async move {
                let skip = match resp.status() {
                    StatusCode::PARTIAL_CONTENT => {
                        let range = resp
                            .headers()
                            .get(http::header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(content_range);
                        match range {
                            Some((start, size))
                                if start == from && (size.is_none() || size == total) =>
                            {
                                0
                            }
                            _ => {
                                return Err(AttemptError::Invalid(
                                    "resumed at the wrong place".into(),
                                ))
                            }
                        }
                    }
                    StatusCode::OK if content_length(resp.headers()) == total => from,
                    s => return Err(AttemptError::Status(s)),
                };
                Ok((ep, resp.into_body(), skip))
            })
            .await;
        match found {
            Ok((found, _)) => Some(found),
            Err(e) => {
                tracing::warn!(error = %e, "cannot resume the blob on any endpoint");
                None
            }
        }
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

/// Resumes of one blob before giving up.
const MAX_RESUMES: u32 = 5;

/// Where a blob transfer stands across connections.
#[derive(Default)]
struct Transfer {
    /// Bytes of the blob pushed into the ingest.
    received: u64,
    /// Bytes still to drop from the current body (an endpoint that ignored
    /// `Range` resends the start).
    skip: u64,
}

/// Why a transfer stopped before its end.
enum Cut {
    /// The connection broke or went silent.
    Broken(String),
    /// Under `min_rate` while someone reads it.
    Slow(String),
    /// Under `min_rate` and nobody reads it any more: stop.
    Abandoned(String),
    /// Past `fetch_deadline`.
    Deadline(String),
}

impl Cut {
    fn why(&self) -> &str {
        match self {
            Cut::Broken(w) | Cut::Slow(w) | Cut::Abandoned(w) | Cut::Deadline(w) => w,
        }
    }

    fn resumable(&self) -> bool {
        matches!(self, Cut::Broken(_) | Cut::Slow(_))
    }
}

/// Moves the upstream body into the ingest, and to the leader while it
/// keeps up. Ends at the body's end, or with why the transfer was cut:
/// silence longer than `idle_timeout`, longer than `fetch_deadline` since
/// `started`, or slower than `min_rate` over `idle_timeout` (over a few
/// seconds once `readers` says nobody reads it any more).
async fn pump_body(
    mut body: Incoming,
    pump: &Pump,
    leader: &mut Option<mpsc::Sender<Bytes>>,
    s: &UpstreamSettings,
    readers: &impl Fn() -> usize,
    started: Instant,
    t: &mut Transfer,
) -> Result<(), Cut> {
    let begun = Instant::now();
    let mut last_data = begun;
    let (mut window_start, mut window_bytes) = (begun, 0u64);
    let mut tick = tokio::time::interval(PACE_TICK);
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = tick.tick() => {
                let now = Instant::now();
                if now - last_data > s.idle_timeout {
                    return Err(Cut::Broken(format!("upstream sent nothing for {:?}", s.idle_timeout)));
                }
                if now - started > s.fetch_deadline {
                    return Err(Cut::Deadline(format!("fetch took longer than {:?}", s.fetch_deadline)));
                }
                let reading = readers();
                let window = if reading == 0 {
                    ABANDONED_WINDOW.min(s.idle_timeout)
                } else {
                    s.idle_timeout
                };
                let elapsed = now - window_start;
                if elapsed >= window {
                    let rate = window_bytes as f64 / elapsed.as_secs_f64();
                    if rate < s.min_rate as f64 {
                        let why = format!("upstream sent {rate:.0} bytes/s, under min_rate {}", s.min_rate);
                        return Err(if reading == 0 { Cut::Abandoned(why) } else { Cut::Slow(why) });
                    }
                    (window_start, window_bytes) = (now, 0);
                }
                continue;
            }
        };
        match frame {
            None => return Ok(()),
            Some(Err(e)) => return Err(Cut::Broken(format!("upstream body: {e}"))),
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                last_data = Instant::now();
                window_bytes += data.len() as u64;
                if t.skip > 0 {
                    let drop = t.skip.min(data.len() as u64);
                    t.skip -= drop;
                    data = data.slice(drop as usize..);
                    if data.is_empty() {
                        continue;
                    }
                }
                t.received += data.len() as u64;
                // Never wait for the leader: when it lags or has gone, it
                // continues from the file.
                if leader
                    .as_ref()
                    .is_some_and(|l| l.try_send(data.clone()).is_err())
                {
                    *leader = None;
                }
                if !pump.push(data).await {
                    return Ok(()); // the writer failed; verify says why
                }
            }
        }
    }
}

/// `Content-Range: bytes START-END/SIZE`: the start and the size (`*`: unknown).
fn content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (range, size) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    let size = match size.trim() {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    Some((start, size))
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_ranges() {
        use super::content_range;
        assert_eq!(content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(content_range("bytes */200"), None);
        assert_eq!(content_range("items 1-2/3"), None);
    }
}
