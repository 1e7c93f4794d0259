//! The hash of a blob being written: it follows the blob's contiguous
//! start in order, taking written batches from memory where they were
//! kept for it and reading the file where it fell behind or where a part
//! came out of order ([`super::Parts`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::Progress;
use crate::cache::spans::Spans;
use crate::reference::Digest;

/// Bytes hashed per job when the hash reads the file.
const HASH_STEP: usize = 4 << 20;

/// Bytes one hash job takes at most before it lets the pool's other jobs
/// (client reads, other ingests) have the thread: about 25 ms of SHA-256.
const HASH_TURN: u64 = 32 << 20;

/// What the writes and the hash share.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) done: Spans,
    /// Written batches kept for the hash, by offset.
    pub(super) retained: BTreeMap<u64, Arc<Vec<Bytes>>>,
    pub(super) retained_bytes: usize,
    /// How far the hash is.
    pub(super) hashed: u64,
    /// Writes waiting for the hash to catch up.
    pub(super) caught_up: Arc<tokio::sync::Notify>,
    /// The blob's length, once every byte is written.
    pub(super) end: Option<u64>,
}

/// What the hash takes next.
enum Next {
    Batch(Arc<Vec<Bytes>>),
    /// Read `len` bytes at `at` from the file.
    File {
        at: u64,
        len: usize,
    },
    Wait,
    Finished,
}

/// How a hash job ended.
enum Turn {
    CaughtUp,
    More,
    Finished,
}

impl Shared {
    /// Takes what the hash does next: the written batch at the hashed
    /// offset when kept, else the written start from the file, else
    /// nothing yet, or the end. Wakes writes waiting for the hash.
    fn next_for_hash(&mut self) -> Next {
        let hashed = self.hashed;
        // Batches the hash passed (a part written twice) are dropped.
        while let Some(entry) = self.retained.first_entry() {
            if *entry.key() >= hashed {
                break;
            }
            let len: usize = entry.remove().iter().map(Bytes::len).sum();
            self.retained_bytes -= len;
        }
        let ready = self.done.prefix();
        let next = if let Some(batch) = self.retained.remove(&hashed) {
            let len: usize = batch.iter().map(Bytes::len).sum();
            self.retained_bytes -= len;
            self.hashed += len as u64;
            Next::Batch(batch)
        } else if ready > hashed {
            let upto = self.retained.keys().next().map_or(ready, |&k| k.min(ready));
            let len = (upto - hashed).min(HASH_STEP as u64) as usize;
            self.hashed += len as u64;
            Next::File { at: hashed, len }
        } else if self.end == Some(hashed) {
            Next::Finished
        } else {
            Next::Wait
        };
        if !matches!(next, Next::Wait) {
            self.caught_up.notify_waiters();
        }
        next
    }
}

/// Hashes the blob in order as its contiguous start grows: written
/// batches from memory where kept, the file elsewhere. Ends at the length
/// `Ingest::verify` sets.
///
/// One job on the disk pool hashes what is written, batch after batch,
/// until it caught up or took its turn ([`HASH_TURN`]), so the hash does
/// not wait for a wake-up between batches (it is the slowest stage of a
/// cold pull; measured on 2 cores, one job per batch left it idle a third
/// of the time); it holds no thread while nothing is written.
pub(super) async fn hash_in_order(
    file: Arc<File>,
    shared: Arc<Mutex<Shared>>,
    mut progress: watch::Receiver<Progress>,
) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut buf = Vec::new();
    loop {
        // Seen before the job looks, so a write that lands after it
        // looked wakes the wait below.
        progress.borrow_and_update();
        let (f, s) = (file.clone(), shared.clone());
        let turn;
        (hasher, buf, turn) = crate::cache::pool::run(move || -> io::Result<_> {
            let mut taken = 0;
            while taken < HASH_TURN {
                let next = s.lock().next_for_hash();
                match next {
                    Next::Batch(batch) => {
                        for c in batch.iter() {
                            hasher.update(c);
                            taken += c.len() as u64;
                        }
                    }
                    Next::File { at, len } => {
                        buf.resize(len, 0);
                        f.read_exact_at(&mut buf, at)?;
                        hasher.update(&buf);
                        taken += len as u64;
                    }
                    Next::Wait => return Ok((hasher, buf, Turn::CaughtUp)),
                    Next::Finished => return Ok((hasher, buf, Turn::Finished)),
                }
            }
            Ok((hasher, buf, Turn::More))
        })
        .await??;
        match turn {
            Turn::Finished => return Ok(Digest::from_hasher(hasher)),
            Turn::More => continue,
            Turn::CaughtUp => {}
        }
        if progress.changed().await.is_err() {
            return Err(io::Error::other("the ingest ended before its last part"));
        }
    }
}
