//! Bounds on client connections: how many are open at once, and how long
//! a client that does not read may hold one.
//!
//! Past `max_connections` a connection is still accepted (never an
//! accept loop that fails for want of file descriptors), then answered
//! quickly on its own: `/healthz` and `/readyz` as usual, anything else
//! `503` with `Retry-After`, and closed. Those answers are few at a time
//! too ([`OVERFLOW`]); while they are all under way, accepting waits a
//! moment for one ([`OVERFLOW_WAIT`]: the next connections wait in the
//! kernel's queue, in order) and closes the connection after that.
//!
//! A write that makes no progress for `send_timeout` fails the
//! connection ([`SendTimeout`]): hyper closes it, and what its responses
//! held (a blob kept from eviction, a reader of a fetch) goes with it.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Connections past the cap answered at once (health, or 503).
pub const OVERFLOW: usize = 64;

/// How long accepting waits for a quick answer's turn.
pub const OVERFLOW_WAIT: Duration = Duration::from_millis(500);

/// Open files a served connection may take: its socket, and a cached
/// blob's file while a response sends it (and one spare).
const FILES_PER_CONNECTION: usize = 4;

/// The open connections of one listener.
pub struct Connections {
    /// The cap in force and its slots (replaced when a reload changes it).
    slots: Mutex<(usize, Arc<Semaphore>)>,
    overflow: Arc<Semaphore>,
    /// The most connections the open files limit leaves room for.
    files_allow: usize,
}

/// The process's open files limit (soft), if known.
fn open_files_limit() -> Option<usize> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    usize::try_from(soft).ok()
}

/// What a new connection gets.
pub enum Admit {
    /// Served; the permit is held for as long as the connection is open.
    Serve(OwnedSemaphorePermit),
    /// Past the cap: a quick answer, then closed.
    Overflow(OwnedSemaphorePermit),
    /// Past the quick answers too: wait for one ([`Connections::overflow`]).
    Wait,
}

impl Connections {
    /// Connections of one listener, at most `max`; fewer when the open
    /// files limit would run out first (a quarter of it, and its
    /// sixteenth for the quick answers), so accepting never fails for
    /// want of file descriptors.
    pub fn new(max: usize) -> Connections {
        Connections::within(max, open_files_limit().unwrap_or(usize::MAX))
    }

    fn within(max: usize, files: usize) -> Connections {
        let files_allow = (files / FILES_PER_CONNECTION).max(1);
        let max = max.min(files_allow);
        Connections {
            slots: Mutex::new((max, Arc::new(Semaphore::new(max)))),
            overflow: Arc::new(Semaphore::new(OVERFLOW.min((files / 16).max(1)))),
            files_allow,
        }
    }

    /// Admits a connection under the cap `max` (the configuration in
    /// force, lowered to what the open files limit allows).
    pub fn admit(&self, max: usize) -> Admit {
        let max = max.min(self.files_allow);
        let slots = {
            let mut s = self.slots.lock();
            if s.0 != max {
                // Connections open keep their permits of the old cap.
                *s = (max, Arc::new(Semaphore::new(max)));
            }
            s.1.clone()
        };
        if let Ok(p) = slots.try_acquire_owned() {
            return Admit::Serve(p);
        }
        match self.overflow.clone().try_acquire_owned() {
            Ok(p) => Admit::Overflow(p),
            Err(_) => Admit::Wait,
        }
    }

    /// A quick answer's turn, within [`OVERFLOW_WAIT`].
    pub async fn overflow(&self) -> Option<OwnedSemaphorePermit> {
        let wait = self.overflow.clone().acquire_owned();
        tokio::time::timeout(OVERFLOW_WAIT, wait).await.ok()?.ok()
    }

    /// The cap the open files limit sets, when it is lower than `max`.
    pub fn lowered_to(&self, max: usize) -> Option<usize> {
        (self.files_allow < max).then_some(self.files_allow)
    }

    /// Why no more connections are served, if none are.
    pub fn saturated(&self) -> Option<String> {
        let s = self.slots.lock();
        (s.1.available_permits() == 0).then(|| format!("all {} connections in use", s.0))
    }
}

/// A stream whose writes fail once they have made no progress for `limit`.
pub struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    /// Armed when a write could not proceed; cleared by progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> SendTimeout<S> {
    pub fn new(inner: S, limit: Duration) -> SendTimeout<S> {
        SendTimeout {
            inner,
            limit,
            stalled: None,
        }
    }

    /// What a write's poll came to: progress clears the timer, waiting
    /// arms it, and a wait past the limit is an error.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                let limit = self.limit;
                let timer = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read nothing for {limit:?}"),
                    )));
                }
                Poll::Pending
            }
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_open_files_limit_lowers_the_cap() {
        let c = Connections::within(1024, 256);
        assert_eq!(c.slots.lock().0, 64);
        assert_eq!(c.overflow.available_permits(), 16);
        let c = Connections::within(1024, 65536);
        assert_eq!(c.slots.lock().0, 1024);
        assert_eq!(c.overflow.available_permits(), OVERFLOW);
    }

    #[test]
    fn connections_past_the_cap_get_a_quick_answer_then_nothing() {
        let c = Connections::within(2, 65536);
        let a = c.admit(2);
        let _b = c.admit(2);
        assert!(matches!(a, Admit::Serve(_)));
        assert!(c.saturated().is_some());
        let quick: Vec<Admit> = (0..OVERFLOW).map(|_| c.admit(2)).collect();
        assert!(quick.iter().all(|a| matches!(a, Admit::Overflow(_))));
        assert!(matches!(c.admit(2), Admit::Wait));
        drop(a);
        assert!(matches!(c.admit(2), Admit::Serve(_)));
        // A new cap takes effect for new connections.
        assert!(matches!(c.admit(3), Admit::Serve(_)));
    }

    #[tokio::test]
    async fn a_write_the_client_never_reads_fails_after_the_limit() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut s = SendTimeout::new(server, Duration::from_millis(300));
        let chunk = vec![0u8; 1 << 20];
        let began = std::time::Instant::now();
        let e = loop {
            if let Err(e) = s.write_all(&chunk).await {
                break e;
            }
            assert!(began.elapsed() < Duration::from_secs(30), "never timed out");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
