//! The pace of the connections of one blob fetch, and what they share:
//! a connection is cut when it goes silent, crawls under `min_rate`, runs
//! past `fetch_deadline`, or nobody reads the blob any more (unless it is
//! about to finish); a peer's silent stream is cut at once once the
//! cluster's probe found the peer down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::cache::ingest::Progress;
use crate::cluster::Cluster;
use crate::reference::Digest;
use crate::upstream::{self, Endpoint, Relayed, Upstream, UpstreamRequest};

/// How often a fetch's pace is looked at.
const PACE_TICK: Duration = Duration::from_secs(1);

/// How long a fetch nobody reads any more goes on: it ends then, unless
/// at its pace it would finish within as long again.
pub(super) const ABANDONED_WINDOW: Duration = Duration::from_secs(5);

/// Resumes of one blob before giving up.
pub(super) const MAX_RESUMES: u32 = 5;

/// Why a transfer stopped before its end.
pub(super) enum Cut {
    /// The connection broke or went silent.
    Broken(String),
    /// Under `min_rate` while someone reads it.
    Slow(String),
    /// Nobody reads it any more, and it is not about to finish: stop.
    Abandoned(String),
    /// Past `fetch_deadline`.
    Deadline(String),
}

impl Cut {
    pub fn why(&self) -> &str {
        match self {
            Cut::Broken(w) | Cut::Slow(w) | Cut::Abandoned(w) | Cut::Deadline(w) => w,
        }
    }

    pub fn resumable(&self) -> bool {
        matches!(self, Cut::Broken(_) | Cut::Slow(_))
    }
}

/// What every connection of one blob fetch shares.
pub(super) struct Ctx<'a> {
    /// Owned, so that a request may go ahead on a task of its own (the
    /// next range of a connection).
    pub upstream: Arc<Upstream>,
    /// The configuration the fetch started with.
    pub snap: Arc<crate::snapshot::Snapshot>,
    pub cluster: Option<&'a Arc<Cluster>>,
    pub req: &'a UpstreamRequest,
    pub digest: &'a Digest,
    /// How many clients read the blob besides the fetch itself.
    pub readers: &'a (dyn Fn() -> usize + Sync),
    /// The blob's progress: how much is written, of how much.
    pub progress: &'a watch::Receiver<Progress>,
    /// When the first answer's headers came in: `fetch_deadline` and the
    /// first stream's pace count from here (bytes that waited in the
    /// socket while the daemon was busy must not look like a fast stream).
    pub started: Instant,
}

/// The pace of one upstream connection. A connection is cut after
/// silence longer than `idle_timeout`, past `fetch_deadline` since the
/// fetch began, slower than `min_rate` over `idle_timeout`, or once
/// nobody has read the blob for [`ABANDONED_WINDOW`] unless it is about
/// to finish (its slot and connection go back to clients that want
/// something).
pub(super) struct Pace<'a> {
    ctx: &'a Ctx<'a>,
    /// A peer's stream is also cut once it is silent and the cluster's
    /// probe found the peer down (a stopped process keeps its sockets).
    peer: Option<Arc<Endpoint>>,
    /// The member that serves the stream when the peer asked sent this
    /// node on to it; watched by the probe while this connection lives.
    relay: Option<(String, crate::cluster::Watching)>,
    last_data: Instant,
    window_start: Instant,
    window_bytes: u64,
    /// Since when nobody reads the blob, and how much was written then.
    unread: Option<(Instant, u64)>,
    tick: tokio::time::Interval,
}

impl<'a> Pace<'a> {
    pub fn new(ctx: &'a Ctx<'a>, ep: &Arc<Endpoint>, relay: Option<Relayed>) -> Pace<'a> {
        let now = Instant::now();
        let relay = relay
            .zip(ctx.cluster)
            .map(|(r, cluster)| (r.key, cluster.watch(r.member)));
        Pace {
            ctx,
            peer: ep.is_peer().then(|| ep.clone()),
            relay,
            last_data: now,
            window_start: now,
            window_bytes: 0,
            unread: None,
            tick: tokio::time::interval(PACE_TICK),
        }
    }

    /// The body's next bytes; `None` at its end.
    pub async fn next(&mut self, body: &mut Incoming) -> Result<Option<Bytes>, Cut> {
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                _ = self.tick.tick() => {
                    self.check()?;
                    continue;
                }
            };
            match frame {
                None => return Ok(None),
                Some(Err(e)) => return Err(Cut::Broken(format!("upstream body: {e}"))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.last_data = Instant::now();
                        self.window_bytes += data.len() as u64;
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    fn check(&mut self) -> Result<(), Cut> {
        let s = &self.ctx.cfg().settings;
        let now = Instant::now();
        if now - self.last_data > s.idle_timeout {
            return Err(Cut::Broken(format!(
                "upstream sent nothing for {:?}",
                s.idle_timeout
            )));
        }
        if let Some(peer) = &self.peer {
            if now - self.last_data > PACE_TICK && self.ctx.upstream.health.backing_off(peer.key())
            {
                return Err(Cut::Broken(
                    "the peer went silent and its probe failed".into(),
                ));
            }
        }
        if let Some((key, _)) = &self.relay {
            if now - self.last_data > PACE_TICK && self.ctx.upstream.health.backing_off(key) {
                return Err(Cut::Broken(
                    "the member relaying the blob went silent and its probe failed".into(),
                ));
            }
        }
        if now - self.ctx.started > s.fetch_deadline {
            return Err(Cut::Deadline(format!(
                "fetch took longer than {:?}",
                s.fetch_deadline
            )));
        }
        if (self.ctx.readers)() == 0 {
            self.abandoned(now)?;
        } else {
            self.unread = None;
        }
        let elapsed = now - self.window_start;
        if elapsed >= s.idle_timeout {
            let rate = self.window_bytes as f64 / elapsed.as_secs_f64();
            if rate < s.min_rate as f64 {
                return Err(Cut::Slow(format!(
                    "upstream sent {rate:.0} bytes/s, under min_rate {}",
                    s.min_rate
                )));
            }
            (self.window_start, self.window_bytes) = (now, 0);
        }
        Ok(())
    }

    /// Nobody reads the blob: after [`ABANDONED_WINDOW`], the fetch ends
    /// unless at the pace of that window it would finish within as long.
    fn abandoned(&mut self, now: Instant) -> Result<(), Cut> {
        let (written, total) = {
            let p = self.ctx.progress.borrow();
            (p.written, p.total)
        };
        let (since, then) = *self.unread.get_or_insert((now, written));
        let unread = now - since;
        if unread < ABANDONED_WINDOW {
            return Ok(());
        }
        let rate = written.saturating_sub(then) as f64 / unread.as_secs_f64();
        let finishing = total.is_some_and(|t| {
            t.saturating_sub(written) as f64 <= rate * ABANDONED_WINDOW.as_secs_f64()
        });
        if finishing {
            return Ok(());
        }
        Err(Cut::Abandoned(format!(
            "nobody has read it for {unread:?}, and at {rate:.0} bytes/s it is not about to finish"
        )))
    }
}

impl Ctx<'_> {
    /// The upstream configuration the fetch started with.
    pub fn cfg(&self) -> &upstream::Config {
        &self.snap.upstream
    }

    /// Marks `ep` failed for a while (see [`upstream::Upstream::report_failure`]).
    pub fn report_failure(&self, ep: &Endpoint, why: &str) {
        self.upstream.report_failure(self.cfg(), ep, why);
    }
}

/// Counts a resumed connection.
pub(super) fn resumed_metric(ep: &Endpoint) {
    crate::metrics::METRICS
        .resumes
        .inc(&[("endpoint", ep.label())]);
}
