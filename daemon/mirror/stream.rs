//! Streaming an upstream body to a client with bounded memory: frames are
//! passed on as they arrive (hyper applies backpressure), a silent upstream
//! is cut after the idle timeout, and a full blob is hashed on the way so
//! that wrong bytes never reach the client as a complete transfer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use sha2::{Digest as _, Sha256};
use tokio::time::{Instant, Sleep};

use crate::reference::Digest;
use crate::upstream::{Endpoint, Upstream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a full-blob transfer must hash to, and whom to blame if not.
pub struct Verify {
    pub want: Digest,
    pub upstream: Arc<Upstream>,
    pub endpoint: Arc<Endpoint>,
}

struct Running {
    verify: Verify,
    hasher: Sha256,
    /// The newest frame, held back until the next one arrives or the
    /// digest is confirmed at the end.
    held: Option<Bytes>,
}

pub struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
    verify: Option<Running>,
    done: bool,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, idle: Duration, verify: Option<Verify>) -> Self {
        UpstreamBody {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            verify: verify.map(|verify| Running {
                verify,
                hasher: Sha256::new(),
                held: None,
            }),
            done: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let deadline = Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                    let Some(run) = this.verify.as_mut() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let Ok(data) = frame.into_data() else {
                        continue; // trailers carry nothing a blob needs
                    };
                    run.hasher.update(&data);
                    if let Some(prev) = run.held.replace(data) {
                        return Poll::Ready(Some(Ok(Frame::data(prev))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(format!("upstream body: {e}").into())));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let Some(run) = this.verify.take() else {
                        return Poll::Ready(None);
                    };
                    let got = Digest::from_hasher(run.hasher);
                    if got != run.verify.want {
                        let why = format!(
                            "blob digest mismatch: expected {}, got {got}",
                            run.verify.want
                        );
                        run.verify
                            .upstream
                            .report_failure(&run.verify.endpoint, &why);
                        return Poll::Ready(Some(Err(why.into())));
                    }
                    return Poll::Ready(run.held.map(|b| Ok(Frame::data(b))));
                }
                Poll::Pending => {
                    if this.sleep.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        let why = format!("upstream sent nothing for {:?}", this.idle);
                        return Poll::Ready(Some(Err(why.into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
