//! Who fetches which bytes of one blob: the piece table of a flight.
//!
//! A blob in flight is a set of byte ranges: those in the file or being
//! fetched (`covered`), each fetched range held by one connection (a
//! claim), and the ranges readers wait for (wants). A connection takes
//! the next range to fetch from here ([`Pieces::claim`]): first the start
//! of a range a reader waits for that nobody fetches, else, while the rest
//! of the blob is to be fetched, the lowest range nobody fetches (so the
//! hash, which follows the blob's start, keeps up).
//!
//! Zero waste: with an upstream that answers ranges ([`Runs::Bounded`])
//! every request asks for a bounded range that nobody else fetches, and
//! is read to its end; no request is ever cut for another's sake, so the
//! upstream sends each byte once. Ranges are kept short enough that a
//! reader waiting inside one is reached soon: a single stream's runs
//! start at [`FIRST_RUN`] and grow eightfold up to what the connection
//! brings in [`RUN_TIME`] (a tail under a quarter of a run goes with
//! it), each asked for before the answer to it is needed
//! ([`Pieces::ask_early`]); when the rest is split over several
//! connections, each takes that much at a time, or a share of what is
//! left once that is less (a quarter of it at least), so they finish
//! close together without one taking over another's range.
//!
//! An endpoint that answers with the whole blob (it ignores `Range`, or
//! a cluster peer, asked for whole blobs) is one stream to the end
//! ([`Runs::Whole`]): nothing else fetches beside it, and readers of
//! parts further on wait for it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::cache::spans::Spans;

/// A single stream's first range, at most (less when the endpoints may
/// split small blobs: an eighth of their `parallel_threshold`).
pub const FIRST_RUN: u64 = 4 << 20;

/// The least one request of the rest asks for, however slow the stream.
pub const MIN_CAP: u64 = 1 << 20;

/// The least a range asked for a reader spans (a little read-ahead).
pub const MIN_RUN: u64 = 256 << 10;

/// The most one request asks for.
pub const MAX_RUN: u64 = 256 << 20;

/// A single stream's runs grow by this factor, up to what it brings in
/// [`RUN_TIME`]: few requests for a fast stream (a 256 MiB blob in three),
/// while a rate measured on too little is never trusted far.
const GROWTH: u64 = 8;

/// A single stream's ranges grow up to what it brings in this long: a
/// reader waiting inside the range being fetched waits at most about this.
pub const RUN_TIME: Duration = Duration::from_millis(250);

/// How the blob's endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// Bounded ranges, several connections at once if need be.
    Bounded,
    /// One whole stream.
    Whole,
}

/// A flight's piece table; see the module's documentation.
pub struct Pieces {
    state: Mutex<Table>,
    changed: Notify,
}

struct Table {
    total: Option<u64>,
    runs: Runs,
    /// In the file, or claimed.
    covered: Spans,
    claims: HashMap<u64, Claim>,
    /// Ranges readers wait for, by registration.
    wants: BTreeMap<u64, (u64, u64)>,
    next_id: u64,
    /// Whether the rest of the blob is fetched without a reader asking.
    rest: bool,
    /// Whether the rest is fetched even once nobody reads (a range read
    /// with the rest fetched in the background).
    keep: bool,
    /// Connections for the rest: one, or the plan's once split.
    connections: usize,
    /// The next single-stream run.
    run: u64,
    /// What the first request asked for.
    first: u64,
    /// When the first answer came.
    started: Option<Instant>,
    /// One connection's rate when the rest was split (what the pieces of
    /// the rest are sized by).
    split_rate: Option<f64>,
    /// Why the blob cannot be completed.
    failed: Option<String>,
    /// How long an answer takes to come (the last ones, averaged).
    latency: Option<Duration>,
}

struct Claim {
    start: u64,
    end: u64,
    pos: u64,
    /// Taken for a reader.
    wanted: bool,
}

/// A range a connection fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    pub id: u64,
    pub start: u64,
    pub end: u64,
}

impl Pieces {
    pub fn new(rest: bool, keep: bool) -> Pieces {
        Pieces {
            state: Mutex::new(Table {
                total: None,
                runs: Runs::Bounded,
                covered: Spans::default(),
                claims: HashMap::new(),
                wants: BTreeMap::new(),
                next_id: 0,
                rest,
                keep: keep && rest,
                connections: 1,
                run: FIRST_RUN,
                first: FIRST_RUN,
                started: None,
                split_rate: None,
                failed: None,
                latency: None,
            }),
            changed: Notify::new(),
        }
    }

    fn update<T>(&self, f: impl FnOnce(&mut Table) -> T) -> T {
        let out = f(&mut self.state.lock());
        self.changed.notify_waiters();
        out
    }

    /// Resolves at the table's next change.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The first answer came: the blob's size (when known), how its
    /// endpoint answers, and the range it carries (`start..end`), claimed
    /// by the connection that carries it.
    pub fn answered(&self, total: Option<u64>, runs: Runs, start: u64, end: u64) -> Claimed {
        self.update(|t| {
            t.total = total;
            t.runs = runs;
            t.started = Some(Instant::now());
            if runs == Runs::Bounded {
                t.first = end - start;
                t.run = (end - start)
                    .max(MIN_CAP)
                    .saturating_mul(GROWTH)
                    .min(MAX_RUN);
            }
            t.claim(start, end, start > 0)
        })
    }

    /// An answer took `took` to come.
    pub fn answer_took(&self, took: Duration) {
        let mut t = self.state.lock();
        t.latency = Some(t.latency.map_or(took, |l| (l + took) / 2));
    }

    /// Whether a connection with `left` bytes of its range still to read
    /// asks for its next range now rather than in the range's last
    /// quarter: when what is left takes less than two answers' waits at
    /// the stream's pace (once that is measured), so that the next answer
    /// is there when the range ends. Only while the rest of the blob is
    /// fetched: a reader's ranges are asked for as the reader comes.
    pub fn ask_early(&self, left: u64) -> bool {
        let t = self.state.lock();
        if t.runs != Runs::Bounded || !t.rest || !t.measured() {
            return false;
        }
        match (t.stream_rate(), t.latency) {
            (Some(r), Some(l)) => (left as f64) < r * 2.0 * l.as_secs_f64(),
            _ => false,
        }
    }

    pub fn total(&self) -> Option<u64> {
        self.state.lock().total
    }

    pub fn runs(&self) -> Runs {
        self.state.lock().runs
    }

    /// A reader waits for `start..end`; [`Pieces::unwant`] when it is done.
    pub fn want(&self, start: u64, end: u64) -> u64 {
        self.update(|t| {
            let id = t.next_id;
            t.next_id += 1;
            t.wants.insert(id, (start, end));
            id
        })
    }

    pub fn unwant(&self, id: u64) {
        self.update(|t| t.wants.remove(&id));
    }

    /// The rest of the blob is wanted (a whole read); `keep`: even once
    /// nobody reads it.
    pub fn fetch_rest(&self, keep: bool) {
        self.update(|t| {
            t.rest = true;
            t.keep |= keep;
        });
    }

    /// Whether the blob is fetched even while nobody reads it.
    pub fn kept(&self) -> bool {
        self.state.lock().keep
    }

    /// The rest goes over `n` connections (its one stream is slow).
    pub fn split(&self, n: usize) {
        self.update(|t| {
            if t.connections == 1 && n > 1 {
                t.split_rate = t.stream_rate();
            }
            t.connections = t.connections.max(n);
        });
    }

    /// The next range for a connection, or `None`: nothing for it to do.
    pub fn claim(&self) -> Option<Claimed> {
        self.update(|t| t.next(None))
    }

    /// Whether another connection would have something to do now (with
    /// `running` connections, of at most `max`).
    pub fn needs_connection(&self, running: usize, max: usize) -> bool {
        let t = self.state.lock();
        if running >= max || t.total.is_none() || t.failed.is_some() {
            return false;
        }
        if t.runs == Runs::Whole {
            return running == 0 && t.gap(0).is_some() && (t.rest || !t.wants.is_empty());
        }
        // A reader whose first byte nobody fetches gets a connection at
        // once; the rest of its range follows on the connections working
        // for readers (one is started when none is).
        let starved = t.wants.values().any(|&(a, _)| t.covered.run_end(a) == a);
        let for_readers = t.claims.values().filter(|c| c.wanted).count();
        let resting = t.claims.len() - for_readers;
        starved
            || (for_readers == 0 && t.wanted_gap().is_some())
            || (t.rest && resting < t.connections && t.gap(0).is_some())
    }

    /// A connection reached `pos` of its range.
    pub fn advance(&self, id: u64, pos: u64) {
        if let Some(c) = self.state.lock().claims.get_mut(&id) {
            c.pos = pos;
        }
    }

    /// The range is in the file.
    pub fn finish(&self, id: u64) {
        self.update(|t| t.claims.remove(&id));
    }

    /// The next range of the connection holding `id`, claimed while it
    /// still reads that one (its next request is sent ahead).
    pub fn claim_next(&self, id: u64) -> Option<Claimed> {
        self.update(|t| t.claims.contains_key(&id).then(|| t.next(Some(id)))?)
    }

    /// The range is in the file; the connection's next range, at once (no
    /// other connection is started for the work it takes on).
    pub fn finish_and_claim(&self, id: u64) -> Option<Claimed> {
        self.update(|t| {
            t.claims.remove(&id);
            t.next(None)
        })
    }

    /// The range could not be fetched past `pos`: what is left of it is
    /// nobody's, and the blob cannot be completed (why).
    pub fn fail(&self, id: u64, pos: u64, why: &str) {
        self.update(|t| {
            if let Some(c) = t.claims.remove(&id) {
                t.covered.remove(pos, c.end);
            }
            t.failed.get_or_insert_with(|| why.to_string());
        });
    }

    /// Why the blob cannot be completed, if it cannot.
    pub fn failed(&self) -> Option<String> {
        self.state.lock().failed.clone()
    }

    /// Every byte is in the file.
    pub fn complete(&self) -> bool {
        let t = self.state.lock();
        t.claims.is_empty() && t.total.is_some_and(|n| t.covered.prefix() >= n)
    }

    /// How long the bytes not yet brought would take at what one
    /// connection has brought since the first answer.
    pub fn time_left_on_one(&self) -> Option<Duration> {
        let t = self.state.lock();
        let rate = t.stream_rate()?;
        let left = t.total?.saturating_sub(t.brought()) as f64;
        Some(Duration::from_secs_f64((left / rate.max(1.0)).min(1e9)))
    }
}

impl Table {
    fn claim(&mut self, start: u64, end: u64, wanted: bool) -> Claimed {
        let id = self.next_id;
        self.next_id += 1;
        self.covered.insert(start, end);
        self.claims.insert(
            id,
            Claim {
                start,
                end,
                pos: start,
                wanted,
            },
        );
        Claimed { id, start, end }
    }

    /// Bytes brought so far: finished ranges and the claims' progress.
    fn brought(&self) -> u64 {
        let claimed: u64 = self
            .claims
            .values()
            .map(|c| c.end.saturating_sub(c.pos))
            .sum();
        self.covered.len().saturating_sub(claimed)
    }

    /// Bytes a second one connection has brought since the first answer
    /// (a range asked for ahead is not read yet: not counted as one).
    fn stream_rate(&self) -> Option<f64> {
        let elapsed = self.started?.elapsed().as_secs_f64().max(1e-3);
        let reading = self.claims.values().filter(|c| c.pos > c.start).count();
        Some(self.brought() as f64 / elapsed / reading.max(1) as f64)
    }

    /// Whether the stream's pace is measured on enough bytes to ask
    /// early by: the first request's.
    fn measured(&self) -> bool {
        self.brought() >= self.first
    }

    /// The first range nobody has or fetches from `from` on.
    fn gap(&self, from: u64) -> Option<(u64, u64)> {
        self.covered.gap(from, self.total?)
    }

    /// The first range a reader waits for that nobody fetches.
    fn wanted_gap(&self) -> Option<(u64, u64)> {
        self.wants.values().find_map(|&(a, b)| {
            let (s, e) = self.gap(a)?;
            (s < b).then_some((s, e.min(b.max(s + MIN_RUN))))
        })
    }

    /// The most one request asks for now: what one connection brings in
    /// [`RUN_TIME`], so a reader inside a range being fetched is reached
    /// within about that, and connections sharing the rest finish within
    /// about that of each other (with few requests: one per quarter
    /// second of a connection's work).
    fn cap(&self) -> u64 {
        self.split_rate
            .or_else(|| self.stream_rate())
            .map_or(MIN_CAP, |r| (r * RUN_TIME.as_secs_f64()) as u64)
            .clamp(MIN_CAP, MAX_RUN)
    }

    /// How much one request of the rest asks for: a single stream's runs
    /// grow by [`GROWTH`] up to [`Table::cap`].
    fn piece(&mut self) -> u64 {
        if self.connections > 1 {
            // A share of what is left while that is less, so every
            // connection has work to the end; never under a quarter of
            // the cap (requests stay few).
            let cap = self.cap();
            let left = self.total.unwrap_or(0).saturating_sub(self.covered.len());
            return (left / self.connections as u64).clamp((cap / 4).max(MIN_RUN), cap);
        }
        // A pace measured on few bytes is trusted for a run of at most
        // eight times as many (or as the first request asked for).
        let trusted = self
            .brought()
            .max(self.first)
            .max(MIN_CAP)
            .saturating_mul(GROWTH);
        let run = self.run.min(self.cap()).min(trusted);
        self.run = self.run.saturating_mul(GROWTH).min(MAX_RUN);
        run
    }

    /// The next range for a connection; `holder`: the claim that
    /// connection still reads, counted as done (its next range is asked
    /// for ahead).
    fn next(&mut self, holder: Option<u64>) -> Option<Claimed> {
        if self.failed.is_some() {
            return None;
        }
        let total = self.total?;
        if self.runs == Runs::Whole {
            // One stream from the first byte nobody has to the end.
            if !self.claims.is_empty() {
                return None;
            }
            let (s, _) = self.gap(0)?;
            return Some(self.claim(s, total, false));
        }
        if let Some((s, e)) = self.wanted_gap() {
            let end = e.min(s.saturating_add(self.cap().max(MIN_RUN)));
            return Some(self.claim(s, end, true));
        }
        let resting = self
            .claims
            .iter()
            .filter(|&(id, c)| !c.wanted && Some(*id) != holder)
            .count();
        if !self.rest || resting >= self.connections {
            return None;
        }
        let (s, gap_end) = self.gap(0)?;
        let len = self.piece();
        let mut end = gap_end.min(s.saturating_add(len));
        // A tail of less than a quarter of this piece goes with it: a
        // request less for a few percent more time on this one.
        if gap_end - end < len / 4 && gap_end - s <= MAX_RUN {
            end = gap_end;
        }
        Some(self.claim(s, end, false))
    }
}

#[cfg(test)]
mod tests;
