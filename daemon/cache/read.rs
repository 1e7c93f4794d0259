//! Reading a blob to a client from its file: a complete cached file, or one
//! still being written by a flight. Reads are short jobs on the disk pool
//! in bounded chunks, a couple at a time ahead of the client, so memory
//! stays small whatever the blob size and however many clients read, and
//! no thread waits on a slow fetch or a slow client.
//!
//! The last byte of a blob in flight is released only after the flight has
//! verified the digest: a client never receives a complete transfer of
//! unverified bytes. If the flight fails, the client's body ends in an error.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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
                METRICS
                    .served_from_cache
                    .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
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
                        METRICS
                            .served_from_upstream
                            .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
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
                            this.received,
                            Some(this.total),
                            held,
                            this.zero_copy.take(),
                        );
                        this.state = Tee::File(rest);
                    }
                    Poll::Pending => return Poll::Pending,
                },
                Tee::Verifying(last, verified) => match verified.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => {
                        let last = last.take();
                        if let Some(b) = &last {
                            METRICS
                                .served_from_upstream
                                .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
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
/// is `None`) as `progress` allows. `held` keeps the blob from eviction.
///
/// A task per response waits for the file to grow without holding a
/// thread; each read is a short job on the disk pool, a chunk or two
/// ahead of the client.
pub fn stream(
    file: File,
    progress: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
    held: InUse,
    zero_copy: Option<Part>,
) -> FileBody {
    let (tx, rx) = mpsc::channel(AHEAD);
    tokio::spawn(async move {
        let held = Arc::new(held);
        let read = Read {
            file: Arc::new(file),
            held,
            zero_copy,
        };
        if let Err(e) = feed(&read, progress, start, end, &tx).await {
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

/// What one response reads from.
struct Read {
    file: Arc<File>,
    held: Arc<InUse>,
    zero_copy: Option<Part>,
}

/// Bytes the zero-copy path hands out per frame.
const PART_CHUNK: u64 = 8 << 20;

/// Sends the readable bytes as they become readable; returns when done,
/// when the client is gone (`Ok`), or with the error to pass on.
async fn feed(
    read: &Read,
    mut progress: watch::Receiver<Progress>,
    mut pos: u64,
    end: Option<u64>,
    tx: &mpsc::Sender<Result<Bytes, BoxError>>,
) -> Result<(), BoxError> {
    let mut closed = false;
    loop {
        let p = progress.borrow_and_update().clone();
        if let Some(why) = p.phase.failure() {
            return Err(why.into());
        }
        let readable = match &p.phase {
            Phase::Verified | Phase::Done => p.written,
            // Hold back the final byte until the digest is confirmed.
            _ => match p.total {
                Some(t) => p.written.min(t.saturating_sub(1)),
                None => p.written,
            },
        };
        let stop = end.or(p.total);
        let upto = stop.map_or(readable, |s| s.min(readable));
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
            return Err("blob transfer ended early".into());
        }
        if progress.changed().await.is_err() {
            // The flight is over; look at its final state once more.
            closed = true;
        }
    }
}
