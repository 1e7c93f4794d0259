//! Moving a blob from its endpoints into the ingest, range by range as
//! the piece table ([`super::pieces`]) hands them out.
//!
//! The first request asks for the range the starting reader wants (a
//! range read) or for the blob's first [`FIRST_RUN`] bytes (at most), on the
//! endpoints in plan order; its `206` gives the size. An endpoint that
//! answers with the whole blob instead (`200`) is one stream to the end.
//! In cluster mode a whole read asks its peers for the whole blob (the
//! relay tree counts whole copies); a range read asks them, like any
//! endpoint, for its range and then ranges.
//!
//! After that, connections take ranges from the table: a reader's range
//! nobody fetches gets a connection at once (up to the endpoint's
//! `parallel_fetches`, at least two), the rest of the blob one stream of
//! bounded runs, or, when that stream would still need more than
//! [`WORTH_SPLITTING`] after [`PROBE`] (registries behind CDNs and object
//! storage limit what one TCP stream carries; a blob of at least
//! `parallel_threshold` bytes), `parallel_fetches` of them. Each range is
//! asked for with `Range: bytes=A-B` and read to its end; one whose
//! connection breaks or crawls is continued where it stopped, on the same
//! endpoint or the next. Memory stays bounded: each connection holds at
//! most two write batches.
//!
//! Where the time goes was measured (`perf`, docs/benchmarks.md): on a
//! fast loopback upstream SHA-256 itself is the step that cannot overlap
//! with itself, and several connections only add work there. That is why
//! a fast single stream is left alone.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::StatusCode;
use tokio::sync::mpsc;

use super::conn::{answered_range, worker, Conn, Sources};
use super::pace::{Ctx, ABANDONED_WINDOW};
use super::pieces::{Pieces, Runs, FIRST_RUN, MIN_RUN};
use crate::cache::ingest::{Ingest, IngestError, Parts, Phase, ReserveError};
use crate::cluster::Cluster;
use crate::config::UpstreamSettings;
use crate::oci::{content_length, Content, ServeError};
use crate::reference::Digest;
use crate::snapshot::Snapshot;
use crate::upstream::{
    self, AttemptError, ByteRange, Endpoint, Relayed, Upstream, UpstreamRequest,
};

/// How long the first stream runs before its pace is judged.
pub const PROBE: Duration = Duration::from_millis(250);

/// The rest of a blob is split when its one stream would need longer.
pub const WORTH_SPLITTING: Duration = Duration::from_millis(500);

/// How often the fetch looks at its pace and its readers.
const TICK: Duration = Duration::from_millis(250);

/// Connections for the rest of a blob, if its one stream is slow.
pub fn split_connections(ep: &Endpoint, s: &UpstreamSettings, total: Option<u64>) -> usize {
    let connections = ep.parallel_fetches.unwrap_or(s.parallel_fetches);
    let threshold = ep.parallel_threshold.unwrap_or(s.parallel_threshold);
    match total {
        Some(t) if connections >= 2 && t >= threshold.max(1) => connections,
        _ => 1,
    }
}

/// Find an endpoint (asking for the range `range`, or the blob's
/// start), reserve the space, move the blob in (range by
/// range as the flight's piece table says), verify, record the route
/// as an origin, commit.
pub(super) async fn blob(
    (owned, cluster): (&Arc<Upstream>, Option<&Arc<Cluster>>),
    snap: &Arc<Snapshot>,
    req: &UpstreamRequest,
    (digest, range): (&Digest, Option<(u64, Option<u64>)>),
    (pieces, readers): (&Pieces, &(dyn Fn() -> usize + Sync)),
    ingest: &mut Ingest,
    leader: mpsc::Sender<Bytes>,
) -> Phase {
    let cfg = &snap.upstream;
    let upstream: &Upstream = owned;
    // A whole read of a blob the cluster's peers may have asks for it
    // whole (the relay tree counts whole copies); a range read asks its
    // range of them too, and the rest in ranges.
    let whole = req.peers.is_some() && range.is_none();
    let first = match first(upstream, cfg, req, range, whole).await {
        Ok(first) => first,
        Err(e) => return Phase::Unavailable(e),
    };
    let answered = Instant::now();
    let total = first.total;
    match ingest.reserve(total).await {
        Ok(()) => {}
        // No room without evicting: a quick 503 (the client goes to
        // the registry itself); the collector makes room for the next.
        Err(ReserveError::NoRoom(e)) => {
            tracing::warn!(%digest, namespace = %req.namespace, error = %e, "blob not fetched");
            return Phase::Unavailable(ServeError::Unavailable(format!("blob not cached: {e}")));
        }
        Err(e) => return Phase::Failed(e.to_string().into()),
    }
    // A range read whose rest is fetched in the background counts as a
    // reader until the blob is in.
    let readers = || readers() + usize::from(pieces.kept());
    let progress = ingest.subscribe();
    let ctx = Ctx {
        upstream: owned.clone(),
        snap: snap.clone(),
        cluster,
        req,
        digest,
        readers: &readers,
        progress: &progress,
        started: answered,
    };
    let parts = match ingest.parts(total) {
        Ok(p) => p,
        Err(e) => return Phase::Failed(e.to_string().into()),
    };
    let split = match first.runs {
        Runs::Bounded => split_connections(&first.conn.ep, &cfg.settings, total),
        Runs::Whole => 1,
    };
    let sources = Sources::default();
    let moved = run(
        &ctx,
        &parts,
        pieces,
        &sources,
        first,
        (split.max(2), split),
        leader,
    )
    .await;
    let sources = sources.take();
    let verified = match moved {
        Ok(len) => ingest.verify(parts, len).await,
        Err(why) => {
            parts.stop();
            return Phase::Failed(why.into());
        }
    };
    let len = match verified {
        Ok(len) => len,
        Err(e @ IngestError::Write { .. }) => return Phase::Failed(e.to_string().into()),
        Err(e @ IngestError::Mismatch { .. }) => {
            let why = e.to_string();
            for ep in &sources {
                upstream.report_failure(cfg, ep, &why);
            }
            return Phase::Failed(why.into());
        }
    };
    if let Err(e) = ingest.commit(&req.namespace).await {
        tracing::warn!(%digest, error = %e, "verified blob could not be stored");
        return Phase::Verified;
    }
    let from_peer = sources.first().is_some_and(|ep| ep.is_peer());
    let source = if from_peer { "peer" } else { "upstream" };
    let m = &crate::metrics::METRICS;
    m.blob_fetches.inc(&[("source", source)]);
    if from_peer {
        m.peer_bytes.add(&[("direction", "received")], len);
    } else {
        m.upstream_bytes.add(&[], len);
    }
    m.blob_committed(len);
    let endpoints: Vec<&str> = sources.iter().map(|ep| ep.key()).collect();
    tracing::info!(%digest, bytes = len, namespace = %req.namespace,
        endpoint = endpoints.join(" "), "blob cached");
    Phase::Done
}

/// The first answer, and what it says of the blob.
pub(super) struct First {
    pub conn: Conn,
    pub total: Option<u64>,
    pub runs: Runs,
    /// The range it carries (`end`: `u64::MAX` for a body of unknown size).
    pub start: u64,
    pub end: u64,
}

/// The first request: `want` is the starting reader's range (first byte,
/// last byte if bounded); `whole`: ask for the whole blob.
pub(super) async fn first(
    upstream: &upstream::Upstream,
    cfg: &upstream::Config,
    req: &UpstreamRequest,
    want: Option<(u64, Option<u64>)>,
    whole: bool,
) -> Result<First, ServeError> {
    // At most an eighth of the smallest blob the endpoints may split, so
    // that a blob worth splitting is split early (4 MiB by default).
    let first_run = upstream
        .plan(cfg, req)
        .iter()
        .filter(|ep| !ep.is_peer())
        .map(|ep| {
            ep.parallel_threshold
                .unwrap_or(cfg.settings.parallel_threshold)
        })
        .min()
        .map_or(FIRST_RUN, |t| (t / 8).clamp(MIN_RUN, FIRST_RUN));
    let range = (!whole).then(|| match want {
        Some((a, last)) => ByteRange {
            start: a,
            end: Some(last.map_or(a + first_run, |l| (l + 1).max(a + MIN_RUN))),
        },
        None => ByteRange {
            start: 0,
            end: Some(first_run),
        },
    });
    let asked = UpstreamRequest {
        range,
        ..req.clone()
    };
    let mut unsatisfiable = false;
    let asked_at = Instant::now();
    let found = upstream
        .first_success(cfg, &asked, |ep, resp| {
            let status = resp.status();
            unsatisfiable |= status == StatusCode::RANGE_NOT_SATISFIABLE;
            async move {
                let headers = resp.headers();
                let (total, runs, start, end) = match (status, range) {
                    (StatusCode::PARTIAL_CONTENT, Some(r)) => match answered_range(headers) {
                        Some((a, z, Some(t))) if a == r.start && z < t => {
                            (Some(t), Runs::Bounded, a, z + 1)
                        }
                        _ => {
                            return Err(AttemptError::Invalid(
                                "answered another range than asked".into(),
                            ))
                        }
                    },
                    (StatusCode::OK, _) => {
                        let t = content_length(headers);
                        (t, Runs::Whole, 0, t.unwrap_or(u64::MAX))
                    }
                    (s, _) => return Err(AttemptError::Status(s)),
                };
                let relay = resp.extensions().get::<Relayed>().cloned();
                Ok(First {
                    conn: Conn {
                        ep,
                        body: resp.into_body(),
                        skip: 0,
                        relay,
                        took: asked_at.elapsed(),
                    },
                    total,
                    runs,
                    start,
                    end,
                })
            }
        })
        .await;
    match found {
        Ok((first, _)) => Ok(first),
        // A range past the end (or an empty blob): the whole blob.
        Err(_) if unsatisfiable && !whole => Box::pin(first(upstream, cfg, req, None, true)).await,
        Err(exhausted) => Err(exhausted.into_error(Content::Blob)),
    }
}

type Worker<'a> = Pin<Box<dyn Future<Output = Result<Option<u64>, io::Error>> + Send + 'a>>;

/// Moves the blob into `parts`, starting with `first`'s answer; at most
/// `max` connections at once, `split` of them for the rest once its one
/// stream is slow. Returns the blob's length once every byte is written,
/// or why not.
pub(super) async fn run(
    ctx: &Ctx<'_>,
    parts: &Parts,
    pieces: &Pieces,
    sources: &Sources,
    first: First,
    (max, split): (usize, usize),
    leader: mpsc::Sender<Bytes>,
) -> Result<u64, String> {
    let claimed = pieces.answered(first.total, first.runs, first.start, first.end);
    sources.add(&first.conn.ep);
    let first_ep = first.conn.ep.clone();
    let leader = (first.start == 0).then_some((leader, 0));
    let mut workers: FuturesUnordered<Worker<'_>> = FuturesUnordered::new();
    workers.push(Box::pin(worker(
        ctx,
        pieces,
        parts,
        sources,
        Some((claimed, Some(first.conn))),
        leader,
    )));
    let mut probe = (split > 1 && first.runs == Runs::Bounded).then(|| Instant::now() + PROBE);
    let mut unread: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    loop {
        let changed = pieces.changed();
        while pieces.needs_connection(workers.len(), max) {
            workers.push(Box::pin(worker(ctx, pieces, parts, sources, None, None)));
        }
        if workers.is_empty() {
            if let Some(why) = pieces.failed() {
                return Err(why);
            }
            if pieces.complete() {
                return Ok(pieces.total().unwrap_or_default());
            }
            // Nothing to fetch now (only what readers ask for): the fetch
            // ends once nobody has read it for a while.
            let now = Instant::now();
            if (ctx.readers)() > 0 {
                unread = None;
            } else if now - *unread.get_or_insert(now) >= ABANDONED_WINDOW {
                return Err(format!(
                    "nobody has read it for {ABANDONED_WINDOW:?}; the ranges asked for are in"
                ));
            }
        }
        tokio::select! {
            done = workers.next(), if !workers.is_empty() => match done {
                Some(Err(e)) => return Err(format!("writing the cache: {e}")),
                // A body of unknown size ended: that is its length.
                Some(Ok(Some(len))) => return Ok(len),
                _ => {}
            },
            _ = changed => {}
            _ = tick.tick() => {}
        }
        if probe.is_some_and(|at| Instant::now() >= at) {
            probe = None;
            if pieces
                .time_left_on_one()
                .is_some_and(|t| t > WORTH_SPLITTING)
            {
                tracing::info!(digest = %ctx.digest, connections = split,
                    "one stream is slow: fetching the rest in ranges");
                pieces.split(split);
                crate::metrics::METRICS
                    .parallel
                    .inc(&[("endpoint", first_ep.label())]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_need_two_connections_and_a_big_blob() {
        let d = UpstreamSettings::default();
        let ep = Endpoint::for_tests("http://127.0.0.1:9/v2");
        assert_eq!(split_connections(&ep, &d, Some(31 << 20)), 1);
        assert_eq!(split_connections(&ep, &d, None), 1);
        assert_eq!(split_connections(&ep, &d, Some(1 << 30)), 6);
    }
}
