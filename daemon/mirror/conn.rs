//! One connection of a blob fetch: it takes ranges from the flight's
//! piece table ([`super::pieces`]) until none is left for it, asks the
//! endpoints for each (`Range: bytes=A-B`, in plan order), writes the
//! bytes at their offsets, and continues a range where its connection
//! broke or crawled, on the same endpoint or the next. Its next range is
//! claimed and asked for (on a task of its own) while the current one
//! comes in, early enough for the answer to be there when it ends (see
//! [`Pieces::ask_early`]), so the stream does not pause between ranges.
//! Memory stays bounded: each connection holds at most two write batches
//! (and the answer to its next request, which the kernel buffers).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::pace::{resumed_metric, Ctx, Cut, Pace, MAX_RESUMES};
use super::pieces::{Claimed, Pieces, Runs};
use crate::cache::ingest::Parts;
use crate::oci::content_length;
use crate::upstream::{AttemptError, ByteRange, Endpoint, Relayed, UpstreamRequest};

/// Bytes a connection gathers before writing them.
const WRITE_BATCH: usize = 1 << 20;

/// The longest received bytes wait in a batch when nothing more arrives:
/// then they are written (and readers following the fetch get them), so
/// a slow upstream's bytes reach clients at its pace, not per megabyte.
const BATCH_WAIT: Duration = Duration::from_millis(50);

/// An answer being read: its endpoint, body, the bytes to skip at its
/// start (a whole-blob answer to a resume), and the member that serves
/// it when a peer sent this node on.
pub(super) struct Conn {
    pub ep: Arc<Endpoint>,
    pub body: Incoming,
    pub skip: u64,
    pub relay: Option<Relayed>,
    /// How long the answer took to come.
    pub took: Duration,
}

/// A range of the blob (`start..end`, or to its end), on the endpoints in
/// plan order: a `206` that starts there, or with `whole_ok` a `200` of the
/// whole blob (whose first bytes are skipped).
async fn ask(ctx: &Ctx<'_>, range: ByteRange, whole_ok: bool) -> Result<Conn, String> {
    ask_owned(asking(ctx, range), whole_ok).await
}

/// What a request for a range needs, owned (it may run on a task of its
/// own): the upstream, the configuration, the request, the blob's size.
type Asking = (
    Arc<crate::upstream::Upstream>,
    Arc<crate::snapshot::Snapshot>,
    UpstreamRequest,
    Option<u64>,
    crate::reference::Digest,
);

fn asking(ctx: &Ctx<'_>, range: ByteRange) -> Asking {
    let asked = UpstreamRequest {
        range: Some(range),
        ..ctx.req.clone()
    };
    let total = ctx.progress.borrow().total;
    let (upstream, snap) = (ctx.upstream.clone(), ctx.snap.clone());
    (upstream, snap, asked, total, ctx.digest.clone())
}

/// Claims the next range of the connection holding `id` and asks for it
/// ahead.
fn ask_next(ctx: &Ctx<'_>, pieces: &Pieces, id: u64) -> Ahead {
    pieces.claim_next(id).map(|n| {
        let range = ByteRange {
            start: n.start,
            end: Some(n.end),
        };
        (n, ask_ahead(ctx, range))
    })
}

/// Sends the request for a connection's next range now, on a task of its
/// own, while the connection reads the end of its current one: the
/// answer is there when it gets to it (no pause between ranges).
/// The task is aborted if the connection is dropped before it takes the
/// answer (the fetch ended), so no request outlives its fetch.
fn ask_ahead(ctx: &Ctx<'_>, range: ByteRange) -> AbortOnDropHandle<Result<Conn, String>> {
    AbortOnDropHandle::new(tokio::spawn(ask_owned(asking(ctx, range), false)))
}

async fn ask_owned(
    (upstream, snap, asked, total, digest): Asking,
    whole_ok: bool,
) -> Result<Conn, String> {
    let range = asked.range.unwrap_or(ByteRange {
        start: 0,
        end: None,
    });
    let asked_at = Instant::now();
    let found = upstream
        .first_success(&snap.upstream, &asked, |ep, resp| {
            let status = resp.status();
            let whole = status == StatusCode::OK && content_length(resp.headers()) == total;
            async move {
                let skip = match status {
                    StatusCode::PARTIAL_CONTENT => match answered_range(resp.headers()) {
                        Some((a, _, size))
                            if a == range.start && (size.is_none() || size == total) =>
                        {
                            0
                        }
                        _ => {
                            return Err(AttemptError::Invalid(
                                "answered another range than asked".into(),
                            ))
                        }
                    },
                    StatusCode::OK if whole && whole_ok => range.start,
                    StatusCode::OK if whole => return Err(AttemptError::Unranged),
                    s => return Err(AttemptError::Status(s)),
                };
                let relay = resp.extensions().get::<Relayed>().cloned();
                Ok(Conn {
                    ep,
                    body: resp.into_body(),
                    skip,
                    relay,
                    took: asked_at.elapsed(),
                })
            }
        })
        .await;
    found.map(|(conn, _)| conn).map_err(|e| {
        tracing::warn!(%digest, error = %e, "cannot fetch the range on any endpoint");
        e.to_string()
    })
}

/// The endpoints the bytes came from, in order.
#[derive(Default)]
pub(super) struct Sources(Mutex<Vec<Arc<Endpoint>>>);

impl Sources {
    pub fn add(&self, ep: &Arc<Endpoint>) {
        let mut s = self.0.lock();
        if !s.iter().any(|e| Arc::ptr_eq(e, ep)) {
            s.push(ep.clone());
        }
    }

    pub fn take(&self) -> Vec<Arc<Endpoint>> {
        std::mem::take(&mut self.0.lock())
    }
}

/// The upstream's frames for the request that started the fetch, while
/// they come in order from the blob's start: the next byte it expects.
type Leader = Option<(mpsc::Sender<Bytes>, u64)>;

/// Why a connection stopped.
enum Stop {
    Cut(Cut),
    Write(io::Error),
}

/// A connection: fetches the ranges the table gives it until none is
/// left. `Some(len)`: a body of unknown size ended at `len`.
pub(super) async fn worker(
    ctx: &Ctx<'_>,
    pieces: &Pieces,
    parts: &Parts,
    sources: &Sources,
    start: Option<(Claimed, Option<Conn>)>,
    mut leader: Leader,
) -> Result<Option<u64>, io::Error> {
    let (mut claimed, mut conn) = match start {
        Some(s) => s,
        None => match pieces.claim() {
            Some(c) => (c, None),
            None => return Ok(None),
        },
    };
    let mut asked_next: Ahead = None;
    loop {
        if leader.as_ref().is_some_and(|(_, at)| *at != claimed.start) {
            leader = None;
        }
        let mut next: Ahead = asked_next.take();
        let done = range(
            ctx,
            pieces,
            (parts, sources),
            (claimed, conn.take()),
            &mut leader,
            &mut next,
        )
        .await;
        let failed = |why: &str| {
            if let Some((n, asked)) = &next {
                asked.abort();
                pieces.fail(n.id, n.start, why);
            }
        };
        match done {
            Ok(end) if pieces.total().is_none() => return Ok(Some(end)),
            Ok(_) => match next.take() {
                // Asked for already: its answer (or, when that failed,
                // asked again by `range`).
                Some((n, asked)) => {
                    pieces.finish(claimed.id);
                    claimed = n;
                    // A range shorter than an answer's wait: the one
                    // after it is asked for before its answer is read.
                    if pieces.ask_early(n.end - n.start) {
                        asked_next = ask_next(ctx, pieces, n.id);
                    }
                    conn = asked.await.ok().and_then(Result::ok);
                }
                None => match pieces.finish_and_claim(claimed.id) {
                    Some(n) => claimed = n,
                    None => return Ok(None),
                },
            },
            Err((Stop::Write(e), pos)) => {
                failed(&e.to_string());
                pieces.fail(claimed.id, pos, &e.to_string());
                return Err(e);
            }
            Err((Stop::Cut(cut), pos)) => {
                failed(cut.why());
                pieces.fail(claimed.id, pos, cut.why());
                return Ok(None);
            }
        }
    }
}

/// A connection's next range, claimed and asked for while it reads the
/// end of its current one.
type Ahead = Option<(Claimed, AbortOnDropHandle<Result<Conn, String>>)>;

/// Fetches one range, continuing where a connection broke while it
/// brings something new and resumes are left. Returns where it ended.
async fn range(
    ctx: &Ctx<'_>,
    pieces: &Pieces,
    (parts, sources): (&Parts, &Sources),
    (c, mut conn): (Claimed, Option<Conn>),
    leader: &mut Leader,
    next: &mut Ahead,
) -> Result<u64, (Stop, u64)> {
    let whole = pieces.runs() == Runs::Whole;
    let sized = pieces.total().is_some();
    let mut w = Writer::new(parts, c.start);
    let mut resumes = 0;
    let mut at_cut = None;
    loop {
        let resumed = conn.is_none() && at_cut.is_some();
        let Conn {
            ep,
            mut body,
            skip,
            relay,
            took,
        } = match conn.take() {
            Some(conn) => conn,
            None => {
                let range = ByteRange {
                    start: w.position(),
                    end: (!whole).then_some(c.end),
                };
                match ask(ctx, range, whole).await {
                    Ok(conn) => conn,
                    Err(why) => return Err((Stop::Cut(Cut::Broken(why)), w.position())),
                }
            }
        };
        pieces.answer_took(took);
        sources.add(&ep);
        if resumed {
            resumed_metric(&ep);
        }
        let mut pace = Pace::new(ctx, &ep, relay);
        let ahead = (!whole).then_some((ctx, &mut *next));
        let cut = match pump(
            &mut body,
            &mut pace,
            &mut w,
            (c, skip),
            pieces,
            leader,
            ahead,
        )
        .await
        {
            Ok(()) => {
                return match w.drain().await {
                    Ok(()) => Ok(w.position()),
                    Err(e) => Err((Stop::Write(e), w.position())),
                }
            }
            Err(Stop::Write(e)) => return Err((Stop::Write(e), w.position())),
            Err(Stop::Cut(cut)) => cut,
        };
        ctx.report_failure(&ep, cut.why());
        if let Err(e) = w.drain().await {
            return Err((Stop::Write(e), w.position()));
        }
        let pos = w.position();
        pieces.advance(c.id, pos);
        // A broken or crawling connection is resumed from where it
        // stopped, on the endpoints in plan order (healthy ones first). A
        // resumed connection that brought nothing new ends it.
        let progressed = at_cut != Some(pos);
        at_cut = Some(pos);
        if !(cut.resumable() && progressed && resumes < MAX_RESUMES && sized) {
            return Err((Stop::Cut(cut), pos));
        }
        resumes += 1;
        tracing::info!(digest = %ctx.digest, from = pos, to = c.end,
            after = cut.why(), "resuming the range where its transfer stopped");
    }
}

/// Streams `body` into the range from `w.position()` to its end; bytes
/// beyond are dropped (a whole-blob answer's first `skip` bytes too).
async fn pump(
    body: &mut Incoming,
    pace: &mut Pace<'_>,
    w: &mut Writer<'_>,
    (c, mut skip): (Claimed, u64),
    pieces: &Pieces,
    leader: &mut Leader,
    mut ahead: Option<(&Ctx<'_>, &mut Ahead)>,
) -> Result<(), Stop> {
    // The next range is asked for once the last quarter of this one is
    // coming in, or earlier when an answer takes longer than that.
    let ask_at = c.end - (c.end - c.start) / 4;
    while w.position() < c.end {
        let Some(mut data) = receive(pace, body, w).await? else {
            if c.end == u64::MAX {
                return Ok(()); // a body of unknown size ends here
            }
            return Err(Stop::Cut(Cut::Broken(format!(
                "upstream body ended at byte {} of a range ending at {}",
                w.position(),
                c.end
            ))));
        };
        if skip > 0 {
            let n = skip.min(data.len() as u64);
            skip -= n;
            data = data.slice(n as usize..);
        }
        let room = c.end - w.position();
        if data.len() as u64 > room {
            data = data.slice(..room as usize);
        }
        if data.is_empty() {
            continue;
        }
        // Never wait for the leader: when it lags or has gone, it
        // continues from the file.
        if let Some((tx, at)) = leader {
            if *at == w.position() && tx.try_send(data.clone()).is_ok() {
                *at += data.len() as u64;
            } else {
                *leader = None;
            }
        }
        // Checked as each frame comes, before it is written: a range may
        // come in a few large frames, its last quarter within one.
        let reached = w.position() + data.len() as u64;
        if let Some((ctx, next)) = ahead
            .as_mut()
            .filter(|_| reached >= ask_at || pieces.ask_early(c.end - reached))
        {
            if next.is_none() {
                **next = ask_next(ctx, pieces, c.id);
            }
            ahead = None;
        }
        w.push(data).await?;
        pieces.advance(c.id, w.position());
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

/// `Content-Range: bytes FIRST-LAST/SIZE`: first, last, size (`*`: unknown).
pub(super) fn answered_range(headers: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    let v = headers.get(http::header::CONTENT_RANGE)?.to_str().ok()?;
    let (range, size) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (a, z) = range.split_once('-')?;
    let (a, z) = (a.trim().parse().ok()?, z.trim().parse().ok()?);
    let size = match size.trim() {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    (a <= z).then_some((a, z, size))
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

    #[test]
    fn content_ranges() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_RANGE, v.parse().unwrap());
            answered_range(&h)
        };
        assert_eq!(h("bytes 100-199/200"), Some((100, 199, Some(200))));
        assert_eq!(h("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(h("bytes */200"), None);
        assert_eq!(h("bytes 9-5/200"), None);
        assert_eq!(h("items 1-2/3"), None);
    }
}
