//! Moving a blob from its upstream into the ingest.
//!
//! One connection first: the whole-blob answer the endpoint gave, streamed
//! into the file from the start and, while the client that started the
//! fetch keeps up, to that client straight from memory. A connection that
//! breaks or crawls is resumed with `Range` from where it stopped, on the
//! same endpoint or the next; the clients see one uninterrupted body.
//!
//! Registries behind CDNs and object storage limit what one TCP stream
//! carries. A blob of at least `parallel_threshold` bytes from an endpoint
//! that said `Accept-Ranges: bytes` is watched for [`PROBE`]: if its one
//! stream would still need more than [`WORTH_SPLITTING`], the rest is cut
//! into pieces that `parallel_fetches - 1` more connections ask for with
//! `Range: bytes=A-B` (a 206 whose `Content-Range` starts at A), written at
//! their offsets. Pieces are handed out lowest first, so the readable start
//! of the blob grows steadily and the hash follows it in order; the first
//! connection goes on into the next piece while nobody took it. A piece
//! whose connection breaks is continued where it broke; finished pieces are
//! never fetched again. If the endpoints answer ranges with the whole blob,
//! the first connection carries on alone. Memory stays bounded: each
//! connection holds at most two write batches.
//!
//! Where the time goes was measured (`perf`, docs/benchmarks.md): on a
//! fast loopback upstream SHA-256 itself (about 1.3 GB/s with SHA-NI) is
//! the step that cannot overlap with itself, and several connections only
//! add work there. That is why a fast single stream is left alone.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

use super::pace::{resumed_metric, Ctx, Cut, Pace, Unranged, MAX_RESUMES};
use crate::cache::ingest::Parts;
use crate::config::UpstreamSettings;
use crate::upstream::{ByteRange, Endpoint};

/// How a blob may be split, if its one stream is slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub total: u64,
    pub connections: usize,
    /// The smallest piece asked for (a request per piece).
    pub min_piece: u64,
}

/// Pieces are at most this big, so that a slow connection holds up little.
const MAX_PIECE: u64 = 64 << 20;

/// A piece is halved for an idle connection while at least twice this
/// much of it is left.
const MIN_STEAL: u64 = 1 << 20;

/// Bytes a connection gathers before writing them.
const WRITE_BATCH: usize = 1 << 20;

/// The longest received bytes wait in a batch when nothing more arrives:
/// then they are written (and readers following the fetch get them), so
/// a slow upstream's bytes reach clients at its pace, not per megabyte.
const BATCH_WAIT: Duration = Duration::from_millis(50);

/// How long the first stream runs before its pace is judged.
pub const PROBE: Duration = Duration::from_millis(250);

/// The rest of a blob is split when its one stream would need longer.
pub const WORTH_SPLITTING: Duration = Duration::from_millis(500);

/// Whether a blob of `total` bytes may be fetched over several
/// connections, from the endpoint's first answer.
pub fn plan(
    ep: &Endpoint,
    s: &UpstreamSettings,
    headers: &HeaderMap,
    total: Option<u64>,
) -> Option<Plan> {
    let connections = ep.parallel_fetches.unwrap_or(s.parallel_fetches);
    let threshold = ep.parallel_threshold.unwrap_or(s.parallel_threshold);
    split_plan(connections, threshold, headers, total?)
}

/// [`plan`] once the endpoint's settings are known.
fn split_plan(connections: usize, threshold: u64, headers: &HeaderMap, total: u64) -> Option<Plan> {
    let ranges = headers
        .get_all(http::header::ACCEPT_RANGES)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|unit| unit.trim().eq_ignore_ascii_case("bytes"));
    if connections < 2 || total < threshold.max(1) || !ranges {
        return None;
    }
    Some(Plan {
        total,
        connections,
        min_piece: (threshold / 32).max(1),
    })
}

impl Plan {
    /// Pieces for the `rest` bytes left: one per connection (a connection
    /// that runs out of work takes half of the biggest piece left).
    fn piece(&self, rest: u64) -> u64 {
        rest.div_ceil(self.connections as u64)
            .max(self.min_piece)
            .clamp(1, MAX_PIECE)
    }
}

/// Whether the endpoints answer ranges, as far as known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ranges {
    Unknown,
    Honoured,
    Ignored,
}

/// The pieces nobody fetches yet, lowest first.
struct Pieces {
    state: Mutex<State>,
    changed: Notify,
}

/// Where a piece's connection is, and where it must stop.
#[derive(Debug, Clone, Copy)]
struct Span {
    pos: u64,
    end: u64,
}

/// A piece handed to a connection.
#[derive(Debug, PartialEq, Eq)]
struct Claimed {
    id: u64,
    start: u64,
    end: u64,
}

impl State {
    fn activate(&mut self, start: u64, end: u64) -> Claimed {
        let id = self.next_id;
        self.next_id += 1;
        self.active.insert(id, Span { pos: start, end });
        Claimed { id, start, end }
    }

    /// The second half of the piece with the most left, if that is at
    /// least twice [`MIN_STEAL`].
    fn steal(&mut self) -> Option<Claimed> {
        let (&id, span) = self
            .active
            .iter()
            .max_by_key(|(_, span)| span.end.saturating_sub(span.pos))?;
        let left = span.end.saturating_sub(span.pos);
        if left < 2 * MIN_STEAL {
            return None;
        }
        let (mid, end) = (span.pos + left / 2, span.end);
        self.active.get_mut(&id)?.end = mid;
        Some(self.activate(mid, end))
    }
}

struct State {
    /// start → end of each piece nobody is fetching.
    pending: BTreeMap<u64, u64>,
    /// Pieces being fetched, by id: where their connection is and where
    /// it must stop (moved up when an idle connection takes the rest).
    active: HashMap<u64, Span>,
    next_id: u64,
    ranges: Ranges,
    /// Whether the rest of the blob was cut into pieces.
    split: bool,
    /// The first connection has stopped.
    head_done: bool,
    /// Ranged connections still working or waiting for a split.
    workers: usize,
    /// Resumes of pieces left for the whole blob.
    resumes: u32,
    /// Why the last connection stopped early.
    last_cut: Option<String>,
    /// Endpoints the bytes came from.
    sources: Vec<Arc<Endpoint>>,
}

impl Pieces {
    fn new(workers: usize, first: Arc<Endpoint>) -> Pieces {
        Pieces {
            state: Mutex::new(State {
                pending: BTreeMap::new(),
                active: HashMap::new(),
                next_id: 0,
                ranges: Ranges::Unknown,
                split: false,
                head_done: false,
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

    /// Cuts `start..total` into pieces for the ranged connections.
    fn split(&self, plan: &Plan, start: u64) {
        let piece = plan.piece(plan.total - start);
        self.update(|s| {
            let mut at = start;
            while at < plan.total {
                let end = (at + piece).min(plan.total);
                s.pending.insert(at, end);
                at = end;
            }
            s.split = true;
        });
    }

    /// The lowest piece nobody fetches, for a ranged connection, or the
    /// second half of the piece with the most left; waits while the blob
    /// is not split. `None`: nothing (more) to do.
    async fn claim(&self) -> Option<Claimed> {
        loop {
            let changed = self.changed.notified();
            {
                let mut s = self.state.lock();
                if s.ranges == Ranges::Ignored {
                    return None;
                }
                if let Some((start, end)) = s.pending.pop_first() {
                    return Some(s.activate(start, end));
                }
                if s.split {
                    return s.steal();
                }
                if s.head_done {
                    return None;
                }
            }
            changed.await;
        }
    }

    /// A piece's connection reached `pos`: where it must stop now.
    fn advance(&self, id: u64, pos: u64) -> u64 {
        let mut s = self.state.lock();
        match s.active.get_mut(&id) {
            Some(span) => {
                span.pos = pos;
                span.end
            }
            None => pos,
        }
    }

    /// A piece is done, or given up (its rest goes back, with why).
    fn finish(&self, id: u64, gave_up: Option<&str>) {
        self.update(|s| {
            if let Some(span) = s.active.remove(&id) {
                if let Some(why) = gave_up {
                    if span.pos < span.end {
                        s.pending.insert(span.pos, span.end);
                    }
                    s.last_cut = Some(why.to_string());
                }
            }
        });
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
    fn give_back(&self, start: u64, end: u64, why: &str) {
        self.update(|s| {
            if start < end {
                s.pending.insert(start, end);
            }
            s.last_cut = Some(why.to_string());
        });
    }

    fn resume_allowed(&self) -> bool {
        let mut s = self.state.lock();
        let ok = s.resumes > 0;
        s.resumes = s.resumes.saturating_sub(1);
        ok
    }

    fn source(&self, ep: &Arc<Endpoint>) {
        let mut s = self.state.lock();
        if !s.sources.iter().any(|e| Arc::ptr_eq(e, ep)) {
            s.sources.push(ep.clone());
        }
    }
}

/// Moves the blob into `parts`: `body` is the whole-blob answer of
/// `first`, `total` its announced size. Returns the blob's length once
/// every byte is written, or why not; and the endpoints the bytes came
/// from.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    ctx: &Ctx<'_>,
    parts: &Parts,
    (first, relay): (Arc<Endpoint>, Option<crate::upstream::Relayed>),
    body: Incoming,
    total: Option<u64>,
    plan: Option<Plan>,
    leader: mpsc::Sender<Bytes>,
) -> (Result<u64, String>, Vec<Arc<Endpoint>>) {
    let workers = plan.map_or(0, |p| p.connections - 1);
    let pieces = Pieces::new(workers, first.clone());
    let head = async {
        let out = head(
            ctx,
            &pieces,
            parts,
            (first, relay),
            body,
            total,
            plan,
            leader,
        )
        .await;
        pieces.update(|s| s.head_done = true);
        out
    };
    let ranged = (0..workers).map(|_| worker(ctx, &pieces, parts));
    let (head, errors) = tokio::join!(head, futures_util::future::join_all(ranged));
    let mut s = pieces.state.lock();
    let sources = std::mem::take(&mut s.sources);
    if let Some(e) = errors.into_iter().flatten().next() {
        return (Err(format!("writing the cache: {e}")), sources);
    }
    let outcome = match head {
        Err(Stop::Write(e)) => Err(format!("writing the cache: {e}")),
        _ if !s.pending.is_empty() => Err(s.last_cut.clone().unwrap_or_default()),
        Err(Stop::Cut(cut)) if total.is_none() => Err(cut.why().to_string()),
        Ok(len) => Ok(total.unwrap_or(len)),
        Err(Stop::Cut(_)) => Ok(total.unwrap_or_default()),
    };
    if s.split && s.ranges == Ranges::Honoured {
        crate::metrics::METRICS
            .parallel
            .inc(&[("endpoint", sources[0].label())]);
    }
    (outcome, sources)
}

/// Why a connection stopped.
enum Stop {
    Cut(Cut),
    Write(io::Error),
}

/// The first connection: the whole-blob body from the start, teed to the
/// leader while it keeps up and the bytes are contiguous; resumed where it
/// broke; once the rest is split, on into the next piece while nobody took
/// it. Returns where it ended (the length, for a blob of unknown size).
#[allow(clippy::too_many_arguments)]
async fn head(
    ctx: &Ctx<'_>,
    pieces: &Pieces,
    parts: &Parts,
    (mut ep, relay): (Arc<Endpoint>, Option<crate::upstream::Relayed>),
    mut body: Incoming,
    total: Option<u64>,
    plan: Option<Plan>,
    leader: mpsc::Sender<Bytes>,
) -> Result<u64, Stop> {
    let mut leader = Some(leader);
    let mut w = Writer::new(parts, 0);
    let mut end = total.unwrap_or(u64::MAX);
    let mut pace = Pace::new(ctx, &ep, relay);
    let begun = ctx.started;
    let mut probe = plan.map(|p| (p, begun + PROBE));
    // Bytes received beyond the current piece, and bytes still to drop
    // (an endpoint that resent the start, a piece somebody else took).
    let mut extra: Option<Bytes> = None;
    let mut skip = 0u64;
    let mut resumes = 0;
    let mut at_cut = None;
    loop {
        let next = match extra.take() {
            Some(d) => Ok(Some(d)),
            None => match receive(&mut pace, &mut body, &mut w).await {
                Err(Stop::Write(e)) => return Err(Stop::Write(e)),
                Err(Stop::Cut(cut)) => Err(cut),
                Ok(data) => Ok(data),
            },
        };
        let cut = match next {
            Ok(Some(mut data)) => {
                if skip > 0 {
                    let n = skip.min(data.len() as u64);
                    skip -= n;
                    data = data.slice(n as usize..);
                    if data.is_empty() {
                        continue;
                    }
                }
                if let Some((plan, at)) = probe {
                    if Instant::now() >= at {
                        probe = None;
                        if let Some(start) = worth_splitting(&plan, w.position(), begun) {
                            tracing::info!(digest = %ctx.digest, from = start,
                                connections = plan.connections, "one stream is slow: fetching the rest in ranges");
                            pieces.split(&plan, start);
                            end = start;
                        }
                    }
                }
                let room = end - w.position();
                if data.len() as u64 > room {
                    extra = Some(data.slice(room as usize..));
                    data = data.slice(..room as usize);
                }
                // Never wait for the leader: when it lags or has gone, it
                // continues from the file.
                if leader
                    .as_ref()
                    .is_some_and(|l| l.try_send(data.clone()).is_err())
                {
                    leader = None;
                }
                w.push(data).await?;
                if w.position() < end {
                    continue;
                }
                w.drain().await.map_err(Stop::Write)?;
                if Some(end) == total {
                    return Ok(end);
                }
                match pieces.go_on(end).await {
                    Some((start, next_end)) => {
                        if start != end {
                            leader = None;
                            skip = start - end;
                            w = Writer::new(parts, start);
                        }
                        end = next_end;
                        continue;
                    }
                    None => {
                        // Pieces are answered: this connection's whole-blob
                        // body is done with; it takes pieces like the others.
                        drop((body, leader));
                        if pieces.state.lock().ranges == Ranges::Honoured {
                            if let Some(e) = ranged_pieces(ctx, pieces, parts).await {
                                return Err(Stop::Write(e));
                            }
                        }
                        return Ok(end);
                    }
                }
            }
            Ok(None) if total.is_none() => {
                w.drain().await.map_err(Stop::Write)?;
                return Ok(w.position());
            }
            Ok(None) => Cut::Broken(format!(
                "upstream body ended at byte {} of {end}",
                w.position()
            )),
            Err(cut) => cut,
        };
        ctx.report_failure(&ep, cut.why());
        w.drain().await.map_err(Stop::Write)?;
        let pos = w.position();
        // A broken or crawling connection of a blob someone reads is
        // resumed from where it stopped, on the endpoints in plan order
        // (healthy ones first: the next endpoint, or this one as a last
        // resort). A resumed connection that brought nothing new ends it.
        let progressed = at_cut != Some(pos);
        at_cut = Some(pos);
        let split = pieces.state.lock().split;
        let resumable = cut.resumable() && progressed && resumes < MAX_RESUMES && total.is_some();
        let range = ByteRange {
            start: pos,
            end: split.then_some(end),
        };
        let resumed = match resumable {
            true => ctx
                .flights
                .ranged(ctx.cfg, ctx.req, range, total, true)
                .await
                .ok(),
            false => None,
        };
        let Some(next) = resumed else {
            pieces.give_back(pos, end, cut.why());
            return Err(Stop::Cut(cut));
        };
        resumes += 1;
        resumed_metric(&next.ep);
        pieces.source(&next.ep);
        tracing::info!(digest = %ctx.digest, from = pos, endpoint = next.ep.key(),
            after = cut.why(), "resuming the blob where the transfer stopped");
        (ep, body, skip, extra) = (next.ep, next.body, next.skip, None);
        pace = Pace::new(ctx, &ep, next.relay);
    }
}

/// Where to split the rest of the blob, if the first stream (at `pos`
/// after running since `begun`) would still need longer than
/// [`WORTH_SPLITTING`]: a little past `pos`, which it reaches while the
/// other connections start.
fn worth_splitting(plan: &Plan, pos: u64, begun: Instant) -> Option<u64> {
    let rate = pos as f64 / begun.elapsed().as_secs_f64().max(1e-3);
    let rest = plan.total.saturating_sub(pos) as f64;
    if rest < rate * WORTH_SPLITTING.as_secs_f64() {
        return None;
    }
    let lead = ((rate * 0.1) as u64).max(1 << 20);
    let start = pos.saturating_add(lead);
    (start < plan.total).then_some(start)
}

/// A ranged connection: once the blob is split, takes pieces until none
/// are left, each fetched with `Range` and continued where it broke. A
/// write error comes back.
async fn worker(ctx: &Ctx<'_>, pieces: &Pieces, parts: &Parts) -> Option<io::Error> {
    let error = ranged_pieces(ctx, pieces, parts).await;
    pieces.update(|s| s.workers -= 1);
    error
}

/// Takes pieces until none are left or one could not be fetched.
async fn ranged_pieces(ctx: &Ctx<'_>, pieces: &Pieces, parts: &Parts) -> Option<io::Error> {
    while let Some(claimed) = pieces.claim().await {
        let id = claimed.id;
        match piece(ctx, pieces, parts, claimed).await {
            Ok(()) => pieces.finish(id, None),
            Err(Stop::Write(e)) => {
                pieces.finish(id, Some(&e.to_string()));
                return Some(e);
            }
            Err(Stop::Cut(cut)) => {
                pieces.finish(id, Some(cut.why()));
                return None;
            }
        }
    }
    None
}

/// Fetches a piece, continuing where a connection broke while it brings
/// something new and resumes are left. Its end may move up meanwhile (an
/// idle connection took the rest).
async fn piece(
    ctx: &Ctx<'_>,
    pieces: &Pieces,
    parts: &Parts,
    claimed: Claimed,
) -> Result<(), Stop> {
    let total = parts.total();
    let mut w = Writer::new(parts, claimed.start);
    let mut resumed = false;
    loop {
        let end = pieces.advance(claimed.id, w.position());
        if w.position() >= end {
            return w.drain().await.map_err(Stop::Write);
        }
        let range = ByteRange {
            start: w.position(),
            end: Some(end),
        };
        let found = ctx
            .flights
            .ranged(ctx.cfg, ctx.req, range, total, false)
            .await;
        let (ep, mut body, relay) = match found {
            Ok(r) => (r.ep, r.body, r.relay),
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
                return Err(Stop::Cut(Cut::Broken(why)));
            }
        };
        pieces.update(|s| s.ranges = Ranges::Honoured);
        pieces.source(&ep);
        if resumed {
            resumed_metric(&ep);
        }
        let mut pace = Pace::new(ctx, &ep, relay);
        let at_cut = w.position();
        let cut = match stream(&mut body, &mut pace, &mut w, pieces, claimed.id).await {
            Ok(()) => return w.drain().await.map_err(Stop::Write),
            Err(Stop::Write(e)) => return Err(Stop::Write(e)),
            Err(Stop::Cut(cut)) => cut,
        };
        ctx.report_failure(&ep, cut.why());
        w.drain().await.map_err(Stop::Write)?;
        pieces.advance(claimed.id, w.position());
        let progressed = w.position() > at_cut;
        if !(cut.resumable() && progressed && pieces.resume_allowed()) {
            return Err(Stop::Cut(cut));
        }
        tracing::info!(digest = %ctx.digest, from = w.position(),
            after = cut.why(), "continuing a piece where its transfer stopped");
        resumed = true;
    }
}

/// Streams `body` into the blob from `w.position()` up to the piece's end
/// (which may move up while it streams); bytes beyond are dropped.
async fn stream(
    body: &mut Incoming,
    pace: &mut Pace<'_>,
    w: &mut Writer<'_>,
    pieces: &Pieces,
    id: u64,
) -> Result<(), Stop> {
    let mut end = pieces.advance(id, w.position());
    while w.position() < end {
        let Some(mut data) = receive(pace, body, w).await? else {
            return Err(Stop::Cut(Cut::Broken(format!(
                "upstream body ended at byte {} of a piece ending at {end}",
                w.position()
            ))));
        };
        let room = end - w.position();
        if data.len() as u64 > room {
            data = data.slice(..room as usize);
        }
        w.push(data).await?;
        end = pieces.advance(id, w.position());
    }
    Ok(())
}

/// The body's next bytes; when they are slow to come, what the writer
/// has batched is written meanwhile (after [`BATCH_WAIT`]). Cancelling
/// the wait loses nothing: a body's next frame and the pace's tick are
/// both safe to drop.
async fn receive(
    pace: &mut Pace<'_>,
    body: &mut Incoming,
    w: &mut Writer<'_>,
) -> Result<Option<Bytes>, Stop> {
    if w.batched > 0 {
        if let Ok(next) = tokio::time::timeout(BATCH_WAIT, pace.next(body)).await {
            return next.map_err(Stop::Cut);
        }
        w.flush().await.map_err(Stop::Write)?;
    }
    pace.next(body).await.map_err(Stop::Cut)
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
            self.parts.hash_room(self.at).await;
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
        let plan =
            |h: &HeaderMap, total| split_plan(d.parallel_fetches, d.parallel_threshold, h, total);
        let bytes = headers(Some("bytes"));
        assert_eq!(plan(&bytes, 31 << 20), None, "under the threshold");
        assert_eq!(plan(&headers(None), 1 << 30), None);
        assert_eq!(plan(&headers(Some("none")), 1 << 30), None);
        assert!(plan(&headers(Some("none, Bytes")), 1 << 30).is_some());
        let p = plan(&bytes, 256 << 20).unwrap();
        assert_eq!(p.connections, 6);
        assert_eq!(p.piece(240 << 20), 40 << 20, "one piece per connection");
        assert_eq!(
            p.piece(3 << 20),
            1 << 20,
            "a 32nd of the threshold at least"
        );
        assert_eq!(p.piece(8 << 30), MAX_PIECE);
        assert_eq!(split_plan(1, 1, &bytes, 1 << 30), None, "one connection");
    }

    #[test]
    fn a_slow_stream_is_split_a_little_ahead_of_itself() {
        let p = Plan {
            total: 1 << 30,
            connections: 4,
            min_piece: 1,
        };
        let begun = Instant::now() - Duration::from_secs(1);
        // 1 MB/s: the rest would take minutes.
        let at = worth_splitting(&p, 1_000_000, begun).unwrap();
        assert!(
            (1_000_000 + (1 << 20)..1_000_000 + (1 << 20) + 1000).contains(&at),
            "{at}"
        );
        // 900 MiB in a second: the last 124 MiB take well under 0.5 s.
        assert_eq!(worth_splitting(&p, 900 << 20, begun), None);
    }

    #[tokio::test]
    async fn idle_connections_take_half_of_the_biggest_piece_left() {
        let ep = crate::upstream::Endpoint::for_tests("http://127.0.0.1:9/v2");
        let pieces = Pieces::new(2, ep);
        let plan = Plan {
            total: 20 << 20,
            connections: 2,
            min_piece: 1,
        };
        pieces.split(&plan, 4 << 20);
        let a = pieces.claim().await.unwrap();
        let b = pieces.claim().await.unwrap();
        assert_eq!(
            (a.start, a.end, b.start, b.end),
            (4 << 20, 12 << 20, 12 << 20, 20 << 20)
        );
        // `a` is 2 MiB in, `b` 7 MiB: `a` has the most left.
        pieces.advance(a.id, 6 << 20);
        pieces.advance(b.id, 19 << 20);
        let c = pieces.claim().await.unwrap();
        assert_eq!((c.start, c.end), (9 << 20, 12 << 20));
        assert_eq!(
            pieces.advance(a.id, 7 << 20),
            9 << 20,
            "a stops where c starts"
        );
        // Nothing is left worth halving.
        pieces.advance(c.id, 11 << 20);
        pieces.advance(a.id, (9 << 20) - 1);
        assert_eq!(pieces.claim().await, None);
        // A piece given up goes back from where it stopped.
        pieces.finish(c.id, Some("broke"));
        let d = pieces.claim().await.unwrap();
        assert_eq!((d.start, d.end), (11 << 20, 12 << 20));
    }
}
