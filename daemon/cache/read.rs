//! Reading a blob to a client from its file: a complete cached file, or one
//! still being written by a flight. Reads run on the blocking pool in
//! bounded chunks, a couple at a time ahead of the client, so memory stays
//! small whatever the blob size and however many clients read.
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

use super::flight::{Phase, Progress};
use super::InUse;
use crate::server::BoxError;

/// Bytes read from disk per step.
const CHUNK: usize = 256 << 10;
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

/// Streams bytes `start..end` of `file` (to the end of the blob when `end`
/// is `None`) as `progress` allows. `held` keeps the blob from eviction.
pub fn stream(
    file: File,
    progress: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
    held: InUse,
) -> FileBody {
    let (tx, rx) = mpsc::channel(AHEAD);
    tokio::spawn(pump(Arc::new(file), progress, start, end, tx, held));
    FileBody {
        rx,
        remaining: end.map(|e| e.saturating_sub(start)),
    }
}

async fn pump(
    file: Arc<File>,
    mut progress: watch::Receiver<Progress>,
    mut pos: u64,
    end: Option<u64>,
    tx: mpsc::Sender<Result<Bytes, BoxError>>,
    _held: InUse,
) {
    let mut closed = false;
    loop {
        let p = progress.borrow_and_update().clone();
        let readable = match &p.phase {
            Phase::Done => p.written,
            Phase::Failed(why) => {
                let _ = tx
                    .send(Err(format!("blob transfer failed: {why}").into()))
                    .await;
                return;
            }
            Phase::Unavailable(ex) => {
                let _ = tx.send(Err(format!("blob unavailable: {ex}").into())).await;
                return;
            }
            // Hold back the final byte until the digest is confirmed.
            Phase::Connecting | Phase::Streaming => match p.total {
                Some(t) => p.written.min(t.saturating_sub(1)),
                None => p.written,
            },
        };
        let stop = end.or(p.total);
        let upto = stop.map_or(readable, |s| s.min(readable));
        if pos < upto {
            let len = (upto - pos).min(CHUNK as u64) as usize;
            let f = file.clone();
            let at = pos;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(len);
                f.read_exact_at(&mut buf, at).map(|_| buf.freeze())
            })
            .await;
            let chunk = match read {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    let _ = tx
                        .send(Err(format!("reading cached blob: {e}").into()))
                        .await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("reader task: {e}").into())).await;
                    return;
                }
            };
            pos += chunk.len() as u64;
            if tx.send(Ok(chunk)).await.is_err() {
                return; // the client went away
            }
            continue;
        }
        // Reaching the blob's last byte implies Done: it is held back before.
        let finished = match stop {
            Some(s) => pos >= s,
            None => matches!(p.phase, Phase::Done),
        };
        if finished {
            return;
        }
        if closed {
            let _ = tx.send(Err("blob transfer ended early".into())).await;
            return;
        }
        if progress.changed().await.is_err() {
            // The flight is over; look at its final state once more.
            closed = true;
        }
    }
}
