//! Answering blob requests: from the store with sendfile, from a fetch
//! under way (the growing file, or memory for the request that started
//! it), with `Range` either way; HEAD without fetching the content.
//!
//! What a request may read follows the route rules (`mirror::access`,
//! `mirror::flight`): cached content only when its origins let the
//! request's namespace see it (or that namespace's upstream confirms the
//! digest), a fetch of another namespace only when that one is public, as
//! a read whose bytes wait for the verification unless the response ends
//! with the blob, and that switches to its own namespace's fetch when the
//! other falls behind.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use http::{Response, StatusCode};
use tokio::sync::{mpsc, watch};

use super::access;
use super::flight::{Flight, Reading, Source, Want, Wanting};
use super::multipart;
use super::range::{self, RangeSpec};
use super::{internal, Mirror, Pull};
use crate::cache::ingest::{Phase, Progress};
use crate::cache::{read, InUse};
use crate::cluster::PeerRole;
use crate::config::TAKEOVER_WINDOW;
use crate::metrics::METRICS;
use crate::oci::{
    boxed, full, Content, ResponseBody, ServeError, API_VERSION, DOCKER_CONTENT_DIGEST,
};
use crate::reference::{Digest, Repository};
use crate::sendfile::{self, Mappings};

/// Where a blob's bytes come from, once a source has answered.
struct Opened {
    file: File,
    progress: watch::Receiver<Progress>,
    /// The upstream's frames, for the request that started the fetch.
    leader: Option<mpsc::Receiver<Bytes>>,
    /// Complete in the store (so sendfile may serve it).
    cached: bool,
    /// Following another route's fetch.
    foreign: Option<read::Foreign>,
    /// Counts this request among the readers of the fetch it follows.
    reading: Option<Reading>,
}

impl Opened {
    fn cached(file: File, len: u64) -> Opened {
        METRICS.cache.inc(&[("kind", "blob"), ("result", "hit")]);
        let (_, progress) = watch::channel(Progress::complete(len));
        Opened {
            file,
            progress,
            leader: None,
            cached: true,
            foreign: None,
            reading: None,
        }
    }
}

/// The part of the blob a request gets.
struct Window {
    spec: RangeSpec,
    start: u64,
    /// Exclusive; `None` while the size is unknown.
    end: Option<u64>,
}

impl Mirror {
    pub async fn blob(
        &self,
        pull: &Pull<'_>,
        repository: Repository,
        digest: Digest,
    ) -> Result<Response<ResponseBody>, ServeError> {
        if pull.head {
            return self.blob_head(pull, repository, digest).await;
        }
        let held = self.store.hold(&digest);
        let header = pull.headers.get(RANGE).and_then(|v| v.to_str().ok());
        // Several ranges are read from this route's own copy only (so no
        // part waits on another route's verification or takeover).
        let several = header.is_some_and(|h| h.contains(','));
        let first = header.and_then(range::first);
        let mut opened = self
            .open_source(pull, &repository, &digest, (!several, first))
            .await?;
        let reading = opened.reading.take();
        let mut total = opened.progress.borrow().total;
        if header.is_some() && total.is_none() {
            // A body of unknown size: a range is answered once the size is
            // known (at the latest when the blob is complete), never with
            // the whole blob instead.
            total = known_size(&mut opened.progress).await?;
        }
        let (builder, window) = window(&digest, header, total);
        if window.spec == RangeSpec::Unsatisfiable {
            return builder.body(full(Bytes::new())).map_err(internal);
        }
        // A blob in flight fetches what this read asks for.
        let held = match reading {
            Some(reading) => {
                let wants = wants(reading.flight(), &window.spec, &pull.snap);
                held.keeping((reading, wants))
            }
            None => held,
        };
        if let RangeSpec::Multi(ranges) = &window.spec {
            let t = total.unwrap_or_default();
            let parts = multipart::Parts::new(ranges, t, &digest);
            let builder = blob_headers(&digest, &parts.content_type())
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_LENGTH, parts.len());
            let body = parts.body(
                Arc::new(opened.file),
                opened.progress,
                self.store.clone(),
                held,
            );
            return builder.body(body).map_err(internal);
        }
        let body = body(opened, &window, total, held, pull.zero_copy);
        builder.body(body).map_err(internal)
    }

    /// The store, a fetch under way, or a new fetch; waits until a fetch
    /// has found a source, so a failure is still a quick error status.
    /// Another route's fetch is followed only once it has started within
    /// [`TAKEOVER_WINDOW`] (else, or when it fails, this route's own).
    async fn open_source(
        &self,
        pull: &Pull<'_>,
        repository: &Repository,
        digest: &Digest,
        (mut follow_others, range): (bool, Option<(u64, Option<u64>)>),
    ) -> Result<Opened, ServeError> {
        loop {
            let source = self
                .flights
                .get_or_start(Want {
                    snap: &pull.snap,
                    ns: &pull.ns,
                    repository,
                    digest,
                    peer: pull.peer,
                    follow_others,
                    range,
                })
                .await
                .map_err(internal)?;
            let (flight, leader, own) = match source {
                Source::Cached(file, len) => return Ok(Opened::cached(file, len)),
                Source::Unconfirmed(file, len) => {
                    let tail = format!("blobs/{digest}");
                    self.confirm(pull, repository, &tail, digest, None).await?;
                    return Ok(Opened::cached(file, len));
                }
                Source::Flight {
                    flight,
                    leader,
                    own,
                } => (flight, leader, own),
                Source::NotHeld => return Err(ServeError::NotHeld(Content::Blob)),
            };
            let result = if leader.is_some() {
                "miss"
            } else {
                "coalesced"
            };
            METRICS.cache.inc(&[("kind", "blob"), ("result", result)]);
            let reading = flight.reading();
            let mut progress = flight.progress.clone();
            let started = async {
                progress
                    .wait_for(|p| !matches!(p.phase, Phase::Connecting))
                    .await
                    .map(|p| p.phase.clone())
            };
            let phase = if own {
                started.await.map_err(|_| internal("blob fetch vanished"))?
            } else {
                match tokio::time::timeout(TAKEOVER_WINDOW, started).await {
                    Ok(Ok(phase)) if phase.failure().is_none() => phase,
                    // Another route's fetch that does not start, or
                    // failed: this route's own.
                    _ => {
                        follow_others = false;
                        continue;
                    }
                }
            };
            match phase {
                Phase::Unavailable(e) => return Err(e),
                // Nothing sent yet: a quick error lets the client move on.
                // Why is in the log (the fetch logged it), not for the client.
                Phase::Failed(_) => {
                    return Err(ServeError::Unavailable(
                        "blob transfer from the upstream registry failed".into(),
                    ))
                }
                _ => {}
            }
            return Ok(Opened {
                file: flight.file.try_clone().map_err(internal)?,
                progress,
                leader,
                cached: false,
                foreign: (!own).then(|| self.takeover(pull, repository, digest)),
                reading: Some(reading),
            });
        }
    }

    /// How a reader following another route's fetch gets to its own
    /// route's copy: its own fetch (joined or started), or the blob once
    /// stored and visible to it.
    fn takeover(&self, pull: &Pull<'_>, repository: &Repository, digest: &Digest) -> read::Foreign {
        let flights = self.flights.clone();
        let (snap, ns, repository, digest, peer) = (
            pull.snap.clone(),
            pull.ns.clone(),
            repository.clone(),
            digest.clone(),
            pull.peer,
        );
        let healthy_rate = snap.upstream.settings.takeover_rate;
        read::Foreign {
            takeover: Box::new(move || {
                let (flights, snap, ns, repository, digest) = (
                    flights.clone(),
                    snap.clone(),
                    ns.clone(),
                    repository.clone(),
                    digest.clone(),
                );
                Box::pin(async move {
                    let want = Want {
                        snap: &snap,
                        ns: &ns,
                        repository: &repository,
                        digest: &digest,
                        peer,
                        follow_others: false,
                        range: None,
                    };
                    match flights.get_or_start(want).await {
                        Ok(Source::Cached(file, len)) => {
                            let (_, progress) = watch::channel(Progress::complete(len));
                            Some((file, progress, None))
                        }
                        Ok(Source::Flight { flight, .. }) => {
                            let file = flight.file.try_clone().ok()?;
                            let guard: Box<dyn Send + Sync> = Box::new(flight.reading());
                            Some((file, flight.progress.clone(), Some(guard)))
                        }
                        _ => None,
                    }
                })
            }),
            healthy_rate,
            window: TAKEOVER_WINDOW,
            whole: true,
        }
    }

    /// HEAD of a blob: from the cache (when visible to the request's
    /// namespace) or a fetch of its own route, else the upstream's own
    /// answer, so the cache tells nobody what it holds.
    async fn blob_head(
        &self,
        pull: &Pull<'_>,
        repository: Repository,
        digest: Digest,
    ) -> Result<Response<ResponseBody>, ServeError> {
        let (snap, ns) = (&pull.snap, &pull.ns);
        let cached = {
            let (store, d) = (self.store.clone(), digest.clone());
            crate::cache::pool::run(move || store.cached_blob(&d))
                .await
                .and_then(|r| r)
                .map_err(internal)?
        };
        let visible = cached
            .as_ref()
            .is_some_and(|b| access::visible(&snap.upstream, &b.origins, ns, pull.peer.is_some()));
        let fetching = || {
            self.flights
                .own(&digest, ns)
                .and_then(|f| f.progress.borrow().total)
        };
        let len = match (&cached, visible) {
            (Some(b), true) => b.len,
            _ => match fetching() {
                Some(len) => len,
                None if pull.peer.is_some()
                    && (cached.is_some() || pull.peer == Some(PeerRole::Holder)) =>
                {
                    return Err(ServeError::NotHeld(Content::Blob))
                }
                None => {
                    let tail = format!("blobs/{digest}");
                    let len = self.upstream_head(pull, &repository, &tail, None).await?;
                    if cached.is_some() && snap.upstream.vouches_for(ns) {
                        self.record_origin(&digest, ns).await;
                    }
                    len
                }
            },
        };
        blob_headers(&digest, "application/octet-stream")
            .status(StatusCode::OK)
            .header(CONTENT_LENGTH, len)
            .body(full(Bytes::new()))
            .map_err(internal)
    }
}

/// Registers what a read of `spec` waits for in the flight's table: a
/// whole read wants the whole blob; a range read its ranges (and the rest
/// of the blob, fetched after them, when `range_rest = "background"`).
fn wants(flight: &Arc<Flight>, spec: &RangeSpec, snap: &crate::snapshot::Snapshot) -> Vec<Wanting> {
    let ranges: &[(u64, u64)] = match spec {
        RangeSpec::Part(a, b) => &[(*a, *b)],
        RangeSpec::Multi(ranges) => ranges,
        RangeSpec::Full | RangeSpec::Unsatisfiable => {
            flight.pieces.fetch_rest(false);
            return Vec::new();
        }
    };
    if snap.upstream.settings.range_rest_background {
        flight.pieces.fetch_rest(true);
    }
    ranges.iter().map(|&(a, b)| flight.want(a, b + 1)).collect()
}

/// The blob's size once its fetch knows it: from the upstream's headers,
/// or, for a body of unknown length, when every byte is in and verified.
async fn known_size(progress: &mut watch::Receiver<Progress>) -> Result<Option<u64>, ServeError> {
    let p = progress
        .wait_for(|p| {
            p.total.is_some()
                || p.phase.failure().is_some()
                || matches!(p.phase, Phase::Verified | Phase::Done)
        })
        .await
        .map_err(|_| internal("blob fetch vanished"))?
        .clone();
    if p.phase.failure().is_some() {
        return Err(ServeError::Unavailable(
            "blob transfer from the upstream registry failed".into(),
        ));
    }
    Ok(p.total.or(Some(p.written)))
}

/// The status and headers for `Range` (when the size is known), and the
/// bytes to send (none for an unsatisfiable range).
fn window(
    digest: &Digest,
    header: Option<&str>,
    total: Option<u64>,
) -> (http::response::Builder, Window) {
    let spec = match (header, total) {
        (Some(r), Some(t)) => range::parse(r, t),
        _ => RangeSpec::Full,
    };
    let t = total.unwrap_or_default();
    let octets = "application/octet-stream";
    let (builder, start, end) = match spec {
        RangeSpec::Full => (
            blob_headers(digest, octets).status(StatusCode::OK),
            0,
            total,
        ),
        // Sized and sent by `multipart`.
        RangeSpec::Multi(_) => (blob_headers(digest, octets), 0, None),
        RangeSpec::Part(a, b) => {
            let builder = blob_headers(digest, octets)
                .status(StatusCode::PARTIAL_CONTENT)
                .header(CONTENT_RANGE, format!("bytes {a}-{b}/{t}"));
            (builder, a, Some(b + 1))
        }
        RangeSpec::Unsatisfiable => {
            let builder = blob_headers(digest, octets)
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(CONTENT_RANGE, format!("bytes */{t}"));
            (builder, 0, Some(0))
        }
    };
    let builder = match end {
        Some(e) => builder.header(CONTENT_LENGTH, e - start),
        None => builder,
    };
    (builder, Window { spec, start, end })
}

/// The body: the upstream's frames for the request that started the fetch
/// (whole blob only), one sendfile frame for a complete cached blob, else
/// chunks read from the file as it grows.
fn body(
    opened: Opened,
    w: &Window,
    total: Option<u64>,
    held: InUse,
    zero_copy: Option<&Arc<Mappings>>,
) -> ResponseBody {
    let Opened {
        file,
        progress,
        leader,
        cached,
        foreign,
        reading: _,
    } = opened;
    // A blob still being fetched: its written start goes out with sendfile
    // too, in parts, on connections that can.
    let part = zero_copy.cloned().map(|mappings| -> read::Part {
        Box::new(move |file, start, end, held| {
            let frame = mappings.part(file, start, end, held)?;
            METRICS.sent_in_flight.inc_by(end - start);
            Ok(frame)
        })
    });
    if let (Some(frames), RangeSpec::Full, Some(t)) = (leader, &w.spec, total) {
        return boxed(read::tee(frames, file, progress, t, held, part));
    }
    let whole = zero_copy.filter(|_| cached);
    match sendfile_frame(whole, &file, total, w.start, w.end, held) {
        Ok(frame) => full(frame),
        Err(held) => {
            // A range of another route's fetch waits for its verification.
            let foreign = foreign.map(|f| read::Foreign {
                whole: w.spec == RangeSpec::Full,
                ..f
            });
            let whole = w.spec == RangeSpec::Full || w.start == 0;
            boxed(read::stream(
                file,
                progress,
                (w.start, w.end, whole),
                held,
                part,
                foreign,
            ))
        }
    }
}

/// Bytes `start..end` of a complete cached blob as one frame that the
/// connection's writer sends with sendfile, when the connection can and the
/// range is worth it; otherwise `held` comes back for the ordinary read path.
fn sendfile_frame(
    zero_copy: Option<&Arc<Mappings>>,
    file: &std::fs::File,
    total: Option<u64>,
    start: u64,
    end: Option<u64>,
    held: InUse,
) -> Result<Bytes, InUse> {
    let (Some(mappings), Some(total), Some(end)) = (zero_copy, total, end) else {
        return Err(held);
    };
    if end - start < sendfile::MIN_LEN {
        return Err(held);
    }
    match mappings.blob(file, total, start, end, held) {
        Ok(frame) => {
            METRICS.served_from_cache.inc_by(end - start);
            Ok(frame)
        }
        Err((e, held)) => {
            tracing::warn!(error = %e, "cannot map a cached blob; reading it instead");
            Err(held)
        }
    }
}

fn blob_headers(digest: &Digest, content_type: &str) -> http::response::Builder {
    Response::builder()
        .header(API_VERSION.0, API_VERSION.1)
        .header(CONTENT_TYPE, content_type)
        .header(ACCEPT_RANGES, "bytes")
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
}
