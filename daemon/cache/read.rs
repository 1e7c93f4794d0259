//! Reading a blob to a client from its file: a complete cached file, or one
//! still being written by a flight. Reads are short jobs on the disk pool
//! in bounded chunks, a couple at a time ahead of the client, so memory
//! stays small whatever the blob size and however many clients read, and
//! no thread waits on a slow fetch or a slow client.
//!
//! A read of a blob in flight may go as far as the run of written bytes
//! it is in (the blob's start, or a part fetched ahead for a range read
//! there). The last byte of a read of the whole blob is released only
//! after the flight has verified the digest: a client never receives a
//! complete transfer of unverified bytes. If the flight fails, the
//! client's body ends in an error.
//!
//! A reader may follow a fetch that runs for another route ([`Foreign`]):
//! then it sends bytes before the verification only for a read of the
//! whole blob (whose last byte waits for the verification); a range, even
//! one that runs to the end, gets nothing until the blob is verified. When
//! that fetch fails, or falls behind a healthy rate for a while, the
//! reader switches to a source of its own route and goes on from where it
//! was; the bytes it already sent from the other file are compared with
//! its own route's verified copy before the last byte goes out.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, watch};

use super::ingest::{Phase, Progress};
use super::{pool, InUse};
use crate::metrics::METRICS;
use crate::oci::BoxError;

/// Bytes read from disk per step.
const CHUNK: usize = 128 << 10;
/// Steps buffered ahead of the client.
const AHEAD: usize = 2;

/// A body fed by a reader task.
pub struct FileBody {
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
    remaining: Option<u64>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                METRICS.served_from_cache.inc_by(b.len() as u64);
                if let Some(r) = self.remaining.as_mut() {
                    *r = r.saturating_sub(b.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The body of the request that started a fetch: upstream frames straight
/// from memory while it keeps up; when the fetch detaches it (it lagged or
/// the fetch failed), the rest comes from the file. The frame that
/// completes the blob is held until the digest is verified.
pub struct TeeBody {
    state: Tee,
    file: Option<File>,
    progress: watch::Receiver<Progress>,
    held: Option<InUse>,
    total: u64,
    received: u64,
    /// For the rest from the file, once detached.
    zero_copy: Option<Part>,
}

type Verified = Pin<Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send + Sync>>;

enum Tee {
    Memory(mpsc::Receiver<Bytes>),
    /// The last frame, waiting for the verdict on the digest.
    Verifying(Option<Bytes>, Verified),
    File(FileBody),
    Finished,
}

/// `total` is the blob's size from the upstream's headers.
pub fn tee(
    frames: mpsc::Receiver<Bytes>,
    file: File,
    progress: watch::Receiver<Progress>,
    total: u64,
    held: InUse,
    zero_copy: Option<Part>,
) -> TeeBody {
    TeeBody {
        state: Tee::Memory(frames),
        file: Some(file),
        progress,
        held: Some(held),
        total,
        received: 0,
        zero_copy,
    }
}

fn verdict(mut progress: watch::Receiver<Progress>) -> Verified {
    Box::pin(async move {
        let p = progress
            .wait_for(|p| !matches!(p.phase, Phase::Connecting | Phase::Streaming))
            .await
            .map_err(|_| "blob fetch vanished")?
            .clone();
        match p.phase.failure() {
            Some(why) => Err(why.into()),
            None => Ok(()),
        }
    })
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                Tee::Memory(rx) => match rx.poll_recv(cx) {
                    Poll::Ready(Some(b)) => {
                        this.received += b.len() as u64;
                        METRICS.served_from_upstream.inc_by(b.len() as u64);
                        if this.received < this.total {
                            return Poll::Ready(Some(Ok(Frame::data(b))));
                        }
                        this.state = Tee::Verifying(Some(b), verdict(this.progress.clone()));
                    }
                    Poll::Ready(None) => {
                        // Detached: go on from the file where memory ended.
                        let (Some(file), Some(held)) = (this.file.take(), this.held.take()) else {
                            return Poll::Ready(Some(Err(
                                "blob body in an impossible state".into()
                            )));
                        };
                        let rest = stream(
                            file,
                            this.progress.clone(),
                            (this.received, Some(this.total), true),
                            held,
                            this.zero_copy.take(),
                            None,
                        );
                        this.state = Tee::File(rest);
                    }
                    Poll::Pending => return Poll::Pending,
                },
                Tee::Verifying(last, verified) => match verified.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => {
                        let last = last.take();
                        if let Some(b) = &last {
                            METRICS.served_from_upstream.inc_by(b.len() as u64);
                        }
                        this.state = Tee::Finished;
                        this.held = None;
                        return Poll::Ready(last.map(|b| Ok(Frame::data(b))));
                    }
                    Poll::Ready(Err(e)) => {
                        this.state = Tee::Finished;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                Tee::File(body) => return Pin::new(body).poll_frame(cx),
                Tee::Finished => return Poll::Ready(None),
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            Tee::File(b) => b.size_hint(),
            _ => SizeHint::with_exact(self.total.saturating_sub(self.received)),
        }
    }
}

/// Streams bytes `start..end` of `file` (to the end of the blob when `end`
/// is `None`) as `progress` allows; `whole`: the response is the whole
/// blob, whose last byte waits for the verification. `held` keeps the
/// blob from eviction.
///
/// A task per response waits for the file to grow without holding a
/// thread; each read is a short job on the disk pool, a chunk or two
/// ahead of the client.
pub fn stream(
    file: impl Into<Arc<File>>,
    progress: watch::Receiver<Progress>,
    (start, end, whole): (u64, Option<u64>, bool),
    held: InUse,
    zero_copy: Option<Part>,
    foreign: Option<Foreign>,
) -> FileBody {
    let (tx, rx) = mpsc::channel(AHEAD);
    let file: Arc<File> = file.into();
    tokio::spawn(async move {
        let held = Arc::new(held);
        let mut read = Read {
            file,
            held,
            zero_copy,
            foreign,
            whole,
            sent_elsewhere: None,
            _guard: None,
        };
        if let Err(e) = feed(&mut read, progress, start, end, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    FileBody {
        rx,
        remaining: end.map(|e| e.saturating_sub(start)),
    }
}

/// Makes a frame of bytes `start..end` of a file that the connection
/// sends without copying them through the daemon (sendfile), when it can;
/// the blob stays held while the frame lives.
pub type Part =
    Box<dyn Fn(&Arc<File>, u64, u64, &Arc<InUse>) -> std::io::Result<Bytes> + Send + Sync>;

/// Another route's fetch of the blob, followed by a reader of another
/// namespace (see the module's documentation).
pub struct Foreign {
    /// A source of the blob on the reader's own route (its own fetch,
    /// started if need be, or the stored blob), when the followed fetch
    /// fails or falls behind; with a guard kept while reading it.
    pub takeover:
        Box<dyn FnMut() -> futures_util::future::BoxFuture<'static, Option<Takeover>> + Send>,
    /// Bytes per second the followed fetch must keep up over `window`.
    pub healthy_rate: u64,
    pub window: Duration,
    /// The response is the whole blob (no `Range`): only then are the
    /// other route's bytes sent before the verification (its last byte
    /// waits for it). A range, even one to the end, may be all a client
    /// reads: it waits for the verification.
    pub whole: bool,
}

/// The file and progress of a reader's own route, and a guard to keep.
pub type Takeover = (
    File,
    watch::Receiver<Progress>,
    Option<Box<dyn Send + Sync>>,
);

/// What one response reads from.
struct Read {
    file: Arc<File>,
    held: Arc<InUse>,
    zero_copy: Option<Part>,
    /// While the bytes come from another route's fetch.
    foreign: Option<Foreign>,
    /// The response is the whole blob.
    whole: bool,
    /// Bytes `.1..` `.2` of the blob that were sent from another route's
    /// file (`.0`), to compare with this route's own before the end.
    sent_elsewhere: Option<(Arc<File>, u64, u64)>,
    /// Kept while reading the source taken over.
    _guard: Option<Box<dyn Send + Sync>>,
}

/// Whether a followed fetch fell behind: over the last window it brought
/// less than the healthy rate, and it is not about to finish.
struct Lag {
    samples: VecDeque<(Instant, u64)>,
}

impl Lag {
    fn new() -> Lag {
        Lag {
            samples: VecDeque::new(),
        }
    }

    fn behind(&mut self, p: &Progress, f: &Foreign) -> bool {
        let now = Instant::now();
        self.samples.push_back((now, p.written));
        while self.samples.len() > 1 && now - self.samples[1].0 >= f.window {
            self.samples.pop_front();
        }
        let Some(&(since, then)) = self.samples.front() else {
            return false;
        };
        let elapsed = now - since;
        if elapsed < f.window || matches!(p.phase, Phase::Verified | Phase::Done) {
            return false;
        }
        let rate = p.written.saturating_sub(then) as f64 / elapsed.as_secs_f64();
        if rate >= f.healthy_rate as f64 {
            return false;
        }
        let finishing = p
            .total
            .is_some_and(|t| t.saturating_sub(p.written) as f64 <= rate * f.window.as_secs_f64());
        !finishing
    }
}

/// How often a followed fetch of another route is looked at.
const LAG_TICK: Duration = Duration::from_millis(500);

/// Bytes compared per pool job.
const COMPARE_STEP: u64 = 8 << 20;

/// Whether bytes `start..end` of two files are the same.
async fn same_bytes(a: Arc<File>, b: Arc<File>, start: u64, end: u64) -> Result<bool, BoxError> {
    let mut at = start;
    while at < end {
        let len = (end - at).min(COMPARE_STEP) as usize;
        let (a, b) = (a.clone(), b.clone());
        let same = pool::run(move || -> std::io::Result<bool> {
            let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
            a.read_exact_at(&mut x, at)?;
            b.read_exact_at(&mut y, at)?;
            Ok(x == y)
        })
        .await
        .and_then(|r| r)
        .map_err(|e| format!("comparing the blob's copies: {e}"))?;
        if !same {
            return Ok(false);
        }
        at += len as u64;
    }
    Ok(true)
}

impl Read {
    /// Switches to a source on the reader's own route: the bytes sent so
    /// far (`start..pos`) came from the other route's file.
    async fn take_over(
        &mut self,
        start: u64,
        pos: u64,
        why: &str,
    ) -> Result<watch::Receiver<Progress>, BoxError> {
        let Some(mut foreign) = self.foreign.take() else {
            return Err(why.to_string().into());
        };
        let Some((file, progress, guard)) = (foreign.takeover)().await else {
            return Err(format!("{why}; no fetch of the request's own route").into());
        };
        self._guard = guard;
        tracing::info!(
            at = pos,
            "another namespace's fetch of this blob {why}: reading this namespace's own"
        );
        if pos > start {
            self.sent_elsewhere = Some((self.file.clone(), start, pos));
        }
        self.file = Arc::new(file);
        Ok(progress)
    }
}

/// Bytes the zero-copy path hands out per frame.
const PART_CHUNK: u64 = 8 << 20;

/// Sends the readable bytes as they become readable; returns when done,
/// when the client is gone (`Ok`), or with the error to pass on.
async fn feed(
    read: &mut Read,
    mut progress: watch::Receiver<Progress>,
    mut pos: u64,
    end: Option<u64>,
    tx: &mpsc::Sender<Result<Bytes, BoxError>>,
) -> Result<(), BoxError> {
    let start = pos;
    let mut sized: Option<Option<u64>> = None;
    let mut closed = false;
    let mut lag = Lag::new();
    let mut tick = tokio::time::interval(LAG_TICK);
    loop {
        let p = progress.borrow_and_update().clone();
        if let Some(why) = p.phase.failure() {
            if read.foreign.is_some() {
                progress = read.take_over(start, pos, "failed").await?;
                (lag, closed) = (Lag::new(), false);
                continue;
            }
            return Err(why.into());
        }
        let verified = matches!(p.phase, Phase::Verified | Phase::Done);
        // The response was sized by its first source; another that says
        // otherwise cannot finish it.
        match (sized, p.total) {
            (None, t) => sized = Some(t),
            (Some(Some(was)), Some(now)) if was != now => {
                return Err("the blob's size differs between its sources".into())
            }
            _ => {}
        }
        // What was sent from another route's file must be this route's
        // verified bytes too, before the response may complete.
        let compare = if verified {
            read.sent_elsewhere.take()
        } else {
            None
        };
        if let Some((other, a, b)) = compare {
            if !same_bytes(other, read.file.clone(), a, b).await? {
                return Err(
                    "bytes sent earlier from another source differ from the verified blob".into(),
                );
            }
        }
        // What is in the file from `pos` on: the written start of the
        // blob, or a part fetched ahead for a range read there.
        let run = p.readable_from(pos);
        let readable = match (&p.phase, p.total) {
            (Phase::Verified | Phase::Done, _) => p.written,
            // A read of the whole blob gets its final byte only once the
            // digest is confirmed: nobody gets a complete transfer of
            // unverified bytes. A part further on is a range as the
            // upstream would answer it (the route's own fetch only; see
            // `foreign` below).
            (_, Some(t)) if read.whole => run.min(t.saturating_sub(1)),
            _ => run,
        };
        let stop = end.or(p.total);
        let mut upto = stop.map_or(readable, |s| s.min(readable));
        // Another route's unverified bytes only for a read of the whole
        // blob (its last byte waits for the verification).
        if read.foreign.as_ref().is_some_and(|f| !f.whole) && !verified {
            upto = pos;
        }
        while pos < upto {
            if let Some(part) = &read.zero_copy {
                let to = upto.min(pos + PART_CHUNK);
                if let Ok(frame) = part(&read.file, pos, to, &read.held) {
                    pos = to;
                    if tx.send(Ok(frame)).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
            }
            let len = (upto - pos).min(CHUNK as u64) as usize;
            let (f, at) = (read.file.clone(), pos);
            let buf = pool::run(move || {
                let mut buf = BytesMut::zeroed(len);
                f.read_exact_at(&mut buf, at).map(|_| buf.freeze())
            })
            .await
            .and_then(|r| r)
            .map_err(|e| format!("reading cached blob: {e}"))?;
            pos += len as u64;
            if tx.send(Ok(buf)).await.is_err() {
                return Ok(()); // the client went away
            }
        }
        // Reaching the blob's last byte implies it was verified: that byte
        // is held back before.
        let finished = match stop {
            Some(s) => pos >= s,
            None => matches!(p.phase, Phase::Verified | Phase::Done),
        };
        if finished {
            return Ok(());
        }
        if closed {
            if read.foreign.is_some() {
                progress = read.take_over(start, pos, "ended early").await?;
                (lag, closed) = (Lag::new(), false);
                continue;
            }
            return Err("blob transfer ended early".into());
        }
        if read.foreign.is_none() {
            if progress.changed().await.is_err() {
                // The flight is over; look at its final state once more.
                closed = true;
            }
            continue;
        }
        tokio::select! {
            changed = progress.changed() => closed = changed.is_err(),
            _ = tick.tick() => {}
        }
        let behind = match &read.foreign {
            Some(f) => lag.behind(&progress.borrow(), f),
            None => false,
        };
        if behind {
            progress = read.take_over(start, pos, "fell behind").await?;
            (lag, closed) = (Lag::new(), false);
        }
    }
}
