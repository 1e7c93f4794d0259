//! Writing a blob into the store: a temporary file fed by a writer thread,
//! a hasher thread beside it, and progress published for readers of the
//! growing file ([`super::read`]). Only after every byte matched the
//! digest is the file synced and renamed into `blobs/`.
//!
//! Where the bytes come from is not this module's concern: the mirror's
//! single-flight fetch pushes them in; the store knows nothing of upstreams.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::Store;
use crate::oci::ServeError;
use crate::reference::Digest;

/// Where an ingest stands.
#[derive(Clone, Debug)]
pub enum Phase {
    /// Looking for an endpoint that has the blob.
    Connecting,
    /// Bytes are arriving; `written` of them are in the file.
    Streaming,
    /// Every byte is in the file and matched the digest; it is being
    /// synced and moved into the store. Readers may finish now.
    Verified,
    /// Verified and in the store.
    Done,
    /// No endpoint could serve it; nothing was sent.
    Unavailable(ServeError),
    /// The transfer broke or the digest did not match.
    Failed(Arc<str>),
}

impl Phase {
    /// Why readers must stop, when the fetch failed.
    pub fn failure(&self) -> Option<String> {
        match self {
            Phase::Failed(why) => Some(format!("blob transfer failed: {why}")),
            Phase::Unavailable(e) => Some(format!("blob unavailable: {e}")),
            Phase::Connecting | Phase::Streaming | Phase::Verified | Phase::Done => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: Phase,
    /// Bytes in the file and readable.
    pub written: u64,
    /// The blob's size, once known from the upstream's headers.
    pub total: Option<u64>,
}

impl Progress {
    pub fn complete(len: u64) -> Progress {
        Progress {
            phase: Phase::Done,
            written: len,
            total: Some(len),
        }
    }
}

/// Why an ingest did not verify.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// The bytes were not the blob: the source lied or broke.
    #[error("blob digest mismatch: expected {expected}, got {got} ({len} bytes)")]
    Mismatch {
        expected: Digest,
        got: Digest,
        len: u64,
    },
}

/// One blob being written. Its temporary file is removed when it is
/// dropped without having been committed.
pub struct Ingest {
    store: Arc<Store>,
    digest: Digest,
    file: Option<File>,
    tmp: PathBuf,
    progress: watch::Sender<Progress>,
    committed: bool,
}

/// Upstream frames queued for writing and hashing. Frames are up to a few
/// hundred KiB (hyper's read buffer): this bounds an ingest to a few MiB.
const FRAMES_QUEUED: usize = 8;

/// Bytes gathered before a write, unless the queue runs dry first.
const WRITE_BATCH: usize = 1 << 20;

impl Ingest {
    /// Starts an ingest of `digest` into a new temporary file.
    pub fn start(store: &Arc<Store>, digest: &Digest) -> io::Result<Ingest> {
        let (file, tmp) = store.temp_file("blob")?;
        let (progress, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            written: 0,
            total: None,
        });
        Ok(Ingest {
            store: store.clone(),
            digest: digest.clone(),
            file: Some(file),
            tmp,
            progress,
            committed: false,
        })
    }

    /// A handle on the growing file for a reader (`pread` ignores offsets).
    pub fn reader(&self) -> io::Result<File> {
        match &self.file {
            Some(f) => f.try_clone(),
            None => Err(io::Error::other("ingest already writing")),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The source is found and `total` bytes (when known) will come: one
    /// extent is allocated up front, so a full disk fails here, early.
    pub fn reserve(&mut self, total: Option<u64>) -> Result<(), String> {
        if let (Some(t), Some(file)) = (total.filter(|&t| t > 0), &self.file) {
            let len = i64::try_from(t).unwrap_or(i64::MAX);
            if let Err(e) = nix::fcntl::posix_fallocate(file, 0, len) {
                if e != nix::errno::Errno::EOPNOTSUPP && e != nix::errno::Errno::EINVAL {
                    return Err(format!("reserving {t} bytes in the cache: {e}"));
                }
            }
        }
        self.progress.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
        });
        Ok(())
    }

    /// Starts the task that writes and hashes what [`Pump::push`] queues.
    /// Each batch is written and hashed side by side as two short jobs on
    /// the disk pool ([`super::pool`]): readers follow the writes, and the
    /// last byte waits only for the hash.
    pub fn pump(&mut self) -> io::Result<Pump> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("ingest already writing"))?;
        let (frames, rx) = mpsc::channel::<Bytes>(FRAMES_QUEUED);
        let progress = self.progress.clone();
        let task = tokio::spawn(write_and_hash(Arc::new(file), rx, progress));
        Ok(Pump { frames, task })
    }

    /// Waits for every byte to be written and hashed, and checks them
    /// against the digest and `total`. On success readers may send the
    /// last byte; durability follows in [`Ingest::commit`].
    pub async fn verify(&mut self, pump: Pump, total: Option<u64>) -> Result<u64, IngestError> {
        let Pump { frames, task } = pump;
        drop(frames);
        let done = task
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r);
        let (file, len, got) = done.map_err(|source| IngestError::Write {
            path: self.tmp.clone(),
            source,
        })?;
        if got != self.digest || total.is_some_and(|t| t != len) {
            return Err(IngestError::Mismatch {
                expected: self.digest.clone(),
                got,
                len,
            });
        }
        self.file = Some(Arc::try_unwrap(file).map_err(|_| IngestError::Write {
            path: self.tmp.clone(),
            source: io::Error::other("file still shared after the last write"),
        })?);
        // Clients may have their last byte now; durability is the cache's
        // concern and continues without holding them.
        self.progress.send_modify(|p| p.phase = Phase::Verified);
        Ok(len)
    }

    /// Starts writing the blob in parts at their offsets, for a fetch over
    /// several connections. `written` (what readers may read) is the
    /// contiguous start of the blob; a task hashes it in order from the
    /// file as it grows.
    pub fn parts(&mut self, total: u64) -> io::Result<Parts> {
        let file = Arc::new(
            self.file
                .take()
                .ok_or_else(|| io::Error::other("ingest already writing"))?,
        );
        let hasher = tokio::spawn(hash_in_order(
            file.clone(),
            self.progress.subscribe(),
            total,
        ));
        Ok(Parts {
            file,
            total,
            done: Arc::new(Mutex::new(Done::default())),
            progress: self.progress.clone(),
            hasher,
        })
    }

    /// Waits for the hash of a blob whose parts are all written, and checks
    /// it. On success readers may send the last byte.
    pub async fn verify_parts(&mut self, parts: Parts) -> Result<u64, IngestError> {
        let io_error = |source| IngestError::Write {
            path: self.tmp.clone(),
            source,
        };
        let Parts {
            file,
            total,
            hasher,
            ..
        } = parts;
        if self.progress.borrow().written != total {
            hasher.abort();
            return Err(io_error(io::Error::other("parts missing")));
        }
        let got = hasher
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(io_error)?;
        if got != self.digest {
            return Err(IngestError::Mismatch {
                expected: self.digest.clone(),
                got,
                len: total,
            });
        }
        self.file =
            Some(Arc::try_unwrap(file).map_err(|_| {
                io_error(io::Error::other("file still shared after the last write"))
            })?);
        self.progress.send_modify(|p| p.phase = Phase::Verified);
        Ok(total)
    }

    /// Syncs the verified file and renames it into the store. On failure
    /// readers still finish from their open file; only caching failed.
    pub async fn commit(&mut self) -> io::Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("nothing verified to commit"))?;
        let store = self.store.clone();
        let (tmp, d) = (self.tmp.clone(), self.digest.clone());
        super::pool::run(move || {
            file.sync_all()?;
            store.commit_blob(&tmp, &d)
        })
        .await??;
        self.committed = true;
        Ok(())
    }

    /// Publishes how the ingest ended, removing the temporary file first
    /// unless the blob is in the store.
    pub fn end(mut self, phase: Phase) {
        self.remove_temp();
        self.progress.send_modify(|p| p.phase = phase);
    }

    fn remove_temp(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            self.committed = true; // nothing left to remove
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.remove_temp();
    }
}

/// What feeds an ingest's writing and hashing.
pub struct Pump {
    frames: mpsc::Sender<Bytes>,
    task: JoinHandle<io::Result<(Arc<File>, u64, Digest)>>,
}

impl Pump {
    /// Queues `data` for writing and hashing; false once writing has
    /// failed (its error comes out of [`Ingest::verify`]).
    pub async fn push(&self, data: Bytes) -> bool {
        self.frames.send(data).await.is_ok()
    }

    /// Stops without verifying (the source broke): waits for the last
    /// write to let go of the file.
    pub async fn stop(self) {
        drop(self.frames);
        let _ = self.task.await;
    }
}

/// A blob being written in parts at their offsets ([`Ingest::parts`]).
pub struct Parts {
    file: Arc<File>,
    total: u64,
    done: Arc<Mutex<Done>>,
    progress: watch::Sender<Progress>,
    hasher: JoinHandle<io::Result<Digest>>,
}

impl Parts {
    /// Starts writing `chunks` at `offset` on the disk pool at once, and
    /// publishes the readable start of the blob when it grew. The caller
    /// may go on receiving while this runs.
    pub fn write_at(
        &self,
        offset: u64,
        chunks: Vec<Bytes>,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        let (file, done, progress) = (self.file.clone(), self.done.clone(), self.progress.clone());
        let total = self.total;
        let job = super::pool::run(move || -> io::Result<()> {
            let mut at = offset;
            for c in &chunks {
                file.write_all_at(c, at)?;
                at += c.len() as u64;
            }
            if at > total {
                return Err(io::Error::other("part ends past the blob"));
            }
            let prefix = done.lock().add(offset, at);
            progress.send_if_modified(|p| {
                let grew = prefix > p.written;
                if grew {
                    p.written = prefix;
                }
                grew
            });
            Ok(())
        });
        async move { job.await? }
    }

    /// Stops without verifying: the hash of the start ends.
    pub fn stop(self) {
        self.hasher.abort();
    }
}

/// The byte ranges of a blob written so far, merged.
#[derive(Default)]
struct Done {
    ranges: BTreeMap<u64, u64>,
}

impl Done {
    /// Adds `start..end` and returns how long the contiguous start is.
    fn add(&mut self, mut start: u64, mut end: u64) -> u64 {
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.ranges.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.ranges.remove(&s);
        }
        self.ranges.insert(start, end);
        self.ranges.get(&0).copied().unwrap_or(0)
    }
}

/// Bytes hashed per job when hashing a blob written in parts.
const HASH_STEP: u64 = 4 << 20;

/// Hashes the blob from its file in order as its contiguous start grows,
/// up to `total`.
async fn hash_in_order(
    file: Arc<File>,
    mut progress: watch::Receiver<Progress>,
    total: u64,
) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut hashed = 0u64;
    while hashed < total {
        let ready = progress.borrow_and_update().written;
        if ready <= hashed {
            if progress.changed().await.is_err() {
                return Err(io::Error::other("the ingest ended before its last part"));
            }
            continue;
        }
        let len = (ready - hashed).min(HASH_STEP);
        let (f, at) = (file.clone(), hashed);
        hasher = super::pool::run(move || -> io::Result<Sha256> {
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, at)?;
            hasher.update(&buf);
            Ok(hasher)
        })
        .await??;
        hashed += len;
    }
    Ok(Digest::from_hasher(hasher))
}

/// Writes and hashes batches of queued frames (as much as is queued, up to
/// [`WRITE_BATCH`]), publishing after every write how much is readable.
/// Frames are written with one `writev`, without copying them first.
async fn write_and_hash(
    file: Arc<File>,
    mut rx: mpsc::Receiver<Bytes>,
    progress: watch::Sender<Progress>,
) -> io::Result<(Arc<File>, u64, Digest)> {
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    while let Some(first) = rx.recv().await {
        let mut batched = first.len();
        let mut batch = vec![first];
        while batched < WRITE_BATCH {
            match rx.try_recv() {
                Ok(more) => {
                    batched += more.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        let batch = Arc::new(batch);
        let (f, to_write, to_hash) = (file.clone(), batch.clone(), batch);
        let write = super::pool::run(move || write_all_vectored(&f, &to_write));
        let hash = super::pool::run(move || {
            for chunk in to_hash.iter() {
                hasher.update(chunk);
            }
            hasher
        });
        let (wrote, hashed) = tokio::join!(write, hash);
        wrote??;
        hasher = hashed?;
        written += batched as u64;
        progress.send_modify(|p| p.written = written);
    }
    Ok((file, written, Digest::from_hasher(hasher)))
}

fn write_all_vectored(file: &File, chunks: &[Bytes]) -> io::Result<()> {
    let mut file = file;
    let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Done;

    #[test]
    fn parts_merge_into_a_contiguous_start() {
        let mut d = Done::default();
        assert_eq!(d.add(10, 20), 0);
        assert_eq!(d.add(30, 40), 0);
        assert_eq!(d.add(0, 5), 5);
        assert_eq!(d.add(5, 10), 20);
        assert_eq!(d.add(20, 30), 40);
        assert_eq!(d.ranges.len(), 1);
        assert_eq!(d.add(50, 60), 40);
        assert_eq!(d.add(45, 55), 40);
        assert_eq!(d.add(40, 45), 60);
        assert_eq!(d.ranges.len(), 1);
    }
}
