//! Parallel ranged fetch: a big blob from an endpoint that honours `Range`
//! comes over several connections at once, each bringing pieces of it,
//! written at their offsets ([`crate::cache::ingest::Parts`]). Registries
//! behind CDNs and object storage limit what one TCP stream carries; this
//! is what makes a far registry fast.
//!
//! The first connection's answer (a whole-blob 200) decides: it must say
//! `Accept-Ranges: bytes` and be at least the threshold long. That
//! connection keeps streaming the first piece, and goes on into the next
//! piece while nobody else took it; the other connections ask for one
//! piece at a time (`Range: bytes=A-B`, answered by a 206 whose
//! `Content-Range` starts at A). Pieces are handed out lowest first, so
//! the readable start of the blob grows steadily and clients stream it
//! in order; the hash follows that start in order. Memory stays bounded:
//! each connection holds at most two write batches.
//!
//! A piece whose connection breaks is continued from where it broke, on
//! the same or the next endpoint; finished pieces are never fetched again.
//! If the endpoints send the whole blob instead of a range, the first
//! connection simply carries on through every piece (one stream).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::flight::{resumed_metric, Ctx, Cut, Pace, Unranged, MAX_RESUMES};
use crate::cache::ingest::{Ingest, IngestError, Parts};
use crate::config::UpstreamSettings;
use crate::upstream::{ByteRange, Endpoint};

/// How a blob is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub total: u64,
    /// Bytes asked for per request (the last piece may be shorter).
    pub piece: u64,
    pub connections: usize,
}

/// Pieces are at most this big, so that a slow connection holds up little.
const MAX_PIECE: u64 = 64 << 20;

/// Bytes a connection gathers before writing them.
const WRITE_BATCH: usize = 1 << 20;

/// Whether and how to fetch a blob of `total` bytes over several
/// connections, from the endpoint's first answer.
pub fn plan(
    ep: &Endpoint,
    s: &UpstreamSettings,
    headers: &HeaderMap,
    total: Option<u64>,
) -> Option<Plan> {
    let connections = ep.parallel_fetches.unwrap_or(s.parallel_fetches);
    let threshold = ep.parallel_threshold.unwrap_or(s.parallel_threshold);
    split(connections, threshold, headers, total?)
}

/// [`plan`] once the endpoint's settings are known.
fn split(connections: usize, threshold: u64, headers: &HeaderMap, total: u64) -> Option<Plan> {
    let ranges = headers
        .get_all(http::header::ACCEPT_RANGES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|unit| unit.trim().eq_ignore_ascii_case("bytes"));
    if connections < 2 || total < threshold.max(1) || !ranges {
        return None;
    }
    // Two pieces per connection, so a fast connection takes over the rest
    // of a slow one's share; never smaller than a quarter of the threshold
    // (a request per piece), never bigger than MAX_PIECE.
    let piece = total
        .div_ceil(2 * connections as u64)
        .max(threshold / 4)
        .clamp(1, MAX_PIECE);
    Some(Plan {
        total,
        piece,
        connections,
    })
}

/// Whether the endpoints answer ranges, as far as known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ranges {
    Unknown,
    Honoured,
    Ignored,
}

/// The pieces not yet taken, lowest first.
struct Pieces {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    /// start → end of each piece nobody is fetching.
    pending: BTreeMap<u64, u64>,
    ranges: Ranges,
    /// Ranged connections still working.
    workers: usize,
    /// Resumes left for the whole blob.
    resumes: u32,
    /// Why the last connection stopped early.
    last_cut: Option<String>,
    /// Endpoints the bytes came from.
    sources: Vec<Arc<Endpoint>>,
}

impl Pieces {
    fn new(plan: &Plan, workers: usize, first: Arc<Endpoint>) -> Pieces {
        let mut pending = BTreeMap::new();
        let mut start = 0;
        while start < plan.total {
            let end = (start + plan.piece).min(plan.total);
            pending.insert(start, end);
            start = end;
        }
        Pieces {
            state: Mutex::new(State {
                pending,
                ranges: Ranges::Unknown,
                workers,
                resumes: MAX_RESUMES + workers as u32,
                last_cut: None,
                sources: vec![first],
            }),
            changed: Notify::new(),
        }
    }

    fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.state.lock());
        self.changed.notify_waiters();
        out
    }

    /// The lowest piece nobody fetches, for a ranged connection.
    fn claim(&self) -> Option<(u64, u64)> {
        let mut s = self.state.lock();
        if s.ranges == Ranges::Ignored {
            return None;
        }
        s.pending.pop_first()
    }

    /// For the first connection, at `pos` of its whole-blob body: the next
    /// piece it should go on into. That is the piece starting at `pos` if
    /// nobody took it; while it is taken and it is not yet known whether
    /// ranges work, it waits (if they do not, the piece comes back). With
    /// no ranged connection left, it is the lowest piece left after `pos`.
    async fn go_on(&self, pos: u64) -> Option<(u64, u64)> {
        loop {
            let changed = self.changed.notified();
            {
                let mut s = self.state.lock();
                if let Some(end) = s.pending.remove(&pos) {
                    return Some((pos, end));
                }
                if s.workers == 0 {
                    let next = s.pending.range(pos..).next().map(|(&a, &b)| (a, b));
                    if let Some((start, _)) = next {
                        s.pending.remove(&start);
                    }
                    return next;
                }
                if s.ranges == Ranges::Honoured {
                    return None;
                }
            }
            changed.await;
        }
    }

    /// Puts back what is left of a piece.
    fn give_back(&self, start: u64, end: u64) {
        if start < end {
            self.update(|s| s.pending.insert(start, end));
        }
    }

    fn resume_allowed(&self) -> bool {
        let mut s = self.state.lock();
        let ok = s.resumes > 0;
        s.resumes = s.resumes.saturating_sub(1);
        ok
    }
}

/// Fetches the blob over `plan.connections` connections, the first being
/// `body` (the whole blob from `first`). Returns the verification and
/// the endpoints the bytes came from.
pub(super) async fn fetch(
    ctx: &Ctx<'_>,
    ingest: &mut Ingest,
    first: Arc<Endpoint>,
    body: Incoming,
    plan: Plan,
) -> (Result<u64, IngestError>, Vec<Arc<Endpoint>>) {
    let parts = match ingest.parts(plan.total) {
        Ok(p) => p,
        Err(e) => return (Err(write_error(e)), vec![first]),
    };
    tracing::debug!(digest = %ctx.digest, ?plan, "fetching in ranges");
    crate::metrics::METRICS
        .parallel
        .inc(&[("endpoint", first.key())]);
    let workers = plan.connections - 1;
    let pieces = Pieces::new(&plan, workers, first.clone());
    let head = head(ctx, &pieces, &parts, first, body);
    let ranged = (0..workers).map(|_| worker(ctx, &pieces, &parts, plan.total));
    let (head_error, errors) = tokio::join!(head, futures_util::future::join_all(ranged));
    let sources = std::mem::take(&mut pieces.state.lock().sources);
    if let Some(e) = head_error
        .into_iter()
        .chain(errors.into_iter().flatten())
        .next()
    {
        parts.stop();
        return (Err(write_error(e)), sources);
    }
    let missing = {
        let s = pieces.state.lock();
        (!s.pending.is_empty()).then(|| s.last_cut.clone().unwrap_or_default())
    };
    if let Some(why) = missing {
        parts.stop();
        let e = io::Error::other(format!("parts of the blob could not be fetched: {why}"));
        return (Err(write_error(e)), sources);
    }
    (ingest.verify_parts(parts).await, sources)
}

fn write_error(source: io::Error) -> IngestError {
    IngestError::Write {
        path: "(parallel fetch)".into(),
        source,
    }
}

/// The first connection: the whole-blob body, from the first piece on into
/// the following ones while nobody else took them. A write error comes
/// back; a cut connection gives its piece's rest back to the others.
async fn head(
    ctx: &Ctx<'_>,
    pieces: &Pieces,
    parts: &Parts,
    ep: Arc<Endpoint>,
    mut body: Incoming,
) -> Option<io::Error> {
    let mut pace = Pace::new(ctx);
    let mut w = Writer::new(parts, 0);
    let mut extra = None;
    let mut pos = 0;
    while let Some((start, end)) = pieces.go_on(pos).await {
        let skipped = skip(&mut body, &mut pace, extra.take(), start - pos).await;
        let result = match skipped {
            Ok(rest) => {
                w = Writer::new(parts, start);
                stream(&mut body, &mut pace, &mut w, end, rest).await
            }
            Err(cut) => Err(Stop::Cut(cut)),
        };
        match result {
            Ok(beyond) => {
                if let Err(e) = w.drain().await {
                    return Some(e);
                }
                (pos, extra) = (end, beyond);
            }
            Err(Stop::Write(e)) => return Some(e),
            Err(Stop::Cut(cut)) => {
                ctx.report_failure(&ep, cut.why());
                pieces.update(|s| s.last_cut = Some(cut.why().to_string()));
                let drained = w.drain().await;
                pieces.give_back(w.position().max(start), end);
                return drained.err();
            }
        }
    }
    None
}

/// Reads and drops `n` bytes of `body` (starting with `extra`); returns
/// what came beyond them.
async fn skip(
    body: &mut Incoming,
    pace: &mut Pace<'_>,
    mut extra: Option<Bytes>,
    mut n: u64,
) -> Result<Option<Bytes>, Cut> {
    while n > 0 {
        let data = match extra.take() {
            Some(d) => d,
            None => pace
                .next(body)
                .await?
                .ok_or_else(|| Cut::Broken("upstream body ended early".into()))?,
        };
        if data.len() as u64 > n {
            return Ok(Some(data.slice(n as usize..)));
        }
        n -= data.len() as u64;
    }
    Ok(extra)
}

/// A ranged connection: takes pieces until none are left, each fetched
/// with `Range` and continued where it broke. A write error comes back.
async fn worker(ctx: &Ctx<'_>, pieces: &Pieces, parts: &Parts, total: u64) -> Option<io::Error> {
    let mut error = None;
    while let Some((start, end)) = pieces.claim() {
        match piece(ctx, pieces, parts, start, end, total).await {
            Ok(()) => {}
            Err(Stop::Write(e)) => {
                error = Some(e);
                break;
            }
            Err(Stop::Cut(_)) => break,
        }
    }
    pieces.update(|s| s.workers -= 1);
    error
}

/// Why a connection stopped.
enum Stop {
    Cut(Cut),
    Write(io::Error),
}

/// Fetches `start..end`, continuing where a connection broke while it
/// brings something new and resumes are left. On giving up, what is left
/// goes back to the pending pieces.
async fn piece(
    ctx: &Ctx<'_>,
    pieces: &Pieces,
    parts: &Parts,
    start: u64,
    end: u64,
    total: u64,
) -> Result<(), Stop> {
    let mut w = Writer::new(parts, start);
    let mut resumed = false;
    loop {
        let range = ByteRange {
            start: w.position(),
            end: Some(end),
        };
        let found = ctx
            .flights
            .ranged(ctx.cfg, ctx.req, range, Some(total), false)
            .await;
        let (ep, mut body) = match found {
            Ok((ep, body, _)) => (ep, body),
            Err(unranged) => {
                let why = match unranged {
                    Unranged::Ignored => {
                        pieces.update(|s| {
                            if s.ranges != Ranges::Honoured {
                                s.ranges = Ranges::Ignored;
                            }
                        });
                        "the endpoints ignore Range".to_string()
                    }
                    Unranged::Failed(why) => why,
                };
                pieces.update(|s| s.last_cut = Some(why.clone()));
                pieces.give_back(w.position(), end);
                return Err(Stop::Cut(Cut::Broken(why)));
            }
        };
        pieces.update(|s| {
            s.ranges = Ranges::Honoured;
            if !s.sources.iter().any(|e| Arc::ptr_eq(e, &ep)) {
                s.sources.push(ep.clone());
            }
        });
        if resumed {
            resumed_metric(&ep);
        }
        let mut pace = Pace::new(ctx);
        let at_cut = w.position();
        match stream(&mut body, &mut pace, &mut w, end, None).await {
            Ok(_) => return w.drain().await.map_err(Stop::Write),
            Err(Stop::Write(e)) => return Err(Stop::Write(e)),
            Err(Stop::Cut(cut)) => {
                ctx.report_failure(&ep, cut.why());
                pieces.update(|s| s.last_cut = Some(cut.why().to_string()));
                w.drain().await.map_err(Stop::Write)?;
                let progressed = w.position() > at_cut;
                if !(cut.resumable() && progressed && pieces.resume_allowed()) {
                    pieces.give_back(w.position(), end);
                    return Err(Stop::Cut(cut));
                }
                tracing::info!(digest = %ctx.digest, from = w.position(), to = end,
                    after = cut.why(), "continuing a piece where its transfer stopped");
                resumed = true;
            }
        }
    }
}

/// Streams `body` into the blob from `w.position()` up to `end`, starting
/// with `extra` (bytes already received). Returns what came beyond `end`.
async fn stream(
    body: &mut Incoming,
    pace: &mut Pace<'_>,
    w: &mut Writer<'_>,
    end: u64,
    mut extra: Option<Bytes>,
) -> Result<Option<Bytes>, Stop> {
    while w.position() < end {
        let data = match extra.take() {
            Some(d) => d,
            None => match pace.next(body).await.map_err(Stop::Cut)? {
                Some(d) => d,
                None => {
                    return Err(Stop::Cut(Cut::Broken(format!(
                        "upstream body ended at byte {} of a part ending at {end}",
                        w.position()
                    ))))
                }
            },
        };
        let room = end - w.position();
        if data.len() as u64 > room {
            let beyond = data.slice(room as usize..);
            w.push(data.slice(..room as usize)).await?;
            return Ok(Some(beyond));
        }
        w.push(data).await?;
    }
    Ok(None)
}

type Write<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

/// One connection's bytes into the blob at their offsets: batches of up to
/// [`WRITE_BATCH`], one write under way while the next batch arrives.
struct Writer<'a> {
    parts: &'a Parts,
    /// Where the next batch goes.
    at: u64,
    batch: Vec<Bytes>,
    batched: usize,
    writing: Option<Write<'a>>,
}

impl<'a> Writer<'a> {
    fn new(parts: &'a Parts, at: u64) -> Writer<'a> {
        Writer {
            parts,
            at,
            batch: Vec::new(),
            batched: 0,
            writing: None,
        }
    }

    /// Where the next byte received goes.
    fn position(&self) -> u64 {
        self.at + self.batched as u64
    }

    async fn push(&mut self, data: Bytes) -> Result<(), Stop> {
        self.batched += data.len();
        self.batch.push(data);
        if self.batched >= WRITE_BATCH {
            self.flush().await.map_err(Stop::Write)?;
        }
        Ok(())
    }

    /// Waits for the write under way, then starts the batch's.
    async fn flush(&mut self) -> io::Result<()> {
        if let Some(w) = self.writing.take() {
            w.await?;
        }
        if self.batched > 0 {
            let chunks = std::mem::take(&mut self.batch);
            let at = self.at;
            self.at += self.batched as u64;
            self.batched = 0;
            self.writing = Some(Box::pin(self.parts.write_at(at, chunks)));
        }
        Ok(())
    }

    /// Writes everything received and waits for it.
    async fn drain(&mut self) -> io::Result<()> {
        self.flush().await?;
        match self.writing.take() {
            Some(w) => w.await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(accept_ranges: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = accept_ranges {
            h.insert(http::header::ACCEPT_RANGES, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn plans() {
        let d = UpstreamSettings::default();
        let plan = |h: &HeaderMap, total| split(d.parallel_fetches, d.parallel_threshold, h, total);
        let bytes = headers(Some("bytes"));
        assert_eq!(plan(&bytes, 31 << 20), None, "under the threshold");
        assert_eq!(plan(&headers(None), 1 << 30), None);
        assert_eq!(plan(&headers(Some("none")), 1 << 30), None);
        assert!(plan(&headers(Some("none, Bytes")), 1 << 30).is_some());
        let p = plan(&bytes, 256 << 20).unwrap();
        assert_eq!(p.connections, 6);
        assert_eq!(p.piece, (256u64 << 20).div_ceil(12));
        let p = plan(&bytes, 32 << 20).unwrap();
        assert_eq!(p.piece, 8 << 20, "a quarter of the threshold at least");
        let p = plan(&bytes, 8 << 30).unwrap();
        assert_eq!(p.piece, MAX_PIECE);
        assert_eq!(split(1, 1, &bytes, 1 << 30), None, "one connection");
    }
}
