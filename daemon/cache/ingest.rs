//! Writing a blob into the store: a temporary file written in parts at
//! their offsets (one part from the start for a single stream, several for
//! a parallel ranged fetch), a hash that follows the blob's contiguous
//! start in order, and progress published for readers of the growing file
//! ([`super::read`]). Only after every byte matched the digest is the file
//! synced and renamed into `blobs/`.
//!
//! Writes and the hash are short jobs on the disk pool. The hash never
//! holds up receiving: it takes the written batches from memory while it
//! keeps up (a few MiB are kept for it), and reads the file where it fell
//! behind or where a part arrived out of order.
//!
//! Where the bytes come from is not this module's concern: the mirror's
//! single-flight fetch pushes them in; the store knows nothing of upstreams.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod hash;

use super::room::{NoRoom, Reservation};
use super::spans::Present;
use super::Store;
use crate::oci::ServeError;
use crate::reference::{Digest, Namespace};
use hash::{hash_in_order, Shared};

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
    /// Every byte range in the file, the start and parts further on (a
    /// range fetched ahead for a reader there).
    pub present: Present,
}

impl Progress {
    pub fn complete(len: u64) -> Progress {
        let present = Present::default();
        present.add(0, len);
        Progress {
            phase: Phase::Done,
            written: len,
            total: Some(len),
            present,
        }
    }

    /// Where the bytes readable from `pos` end: the written run `pos` is in.
    pub fn readable_from(&self, pos: u64) -> u64 {
        if pos < self.written {
            return self.written;
        }
        self.present.run_end(pos)
    }
}

/// Why an ingest could not begin.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    #[error(transparent)]
    NoRoom(#[from] NoRoom),
    #[error("{0}")]
    Io(#[from] io::Error),
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
    /// The room reserved for the blob (shared with its writes).
    reservation: Option<Arc<Mutex<Reservation>>>,
}

/// Written batches kept in memory for the hash, per ingest.
const RETAINED: usize = 8 << 20;

/// How far a write that extends the blob's readable start may run ahead
/// of the hash: past it, receiving waits for the hash (which is what the
/// last byte waits for anyway), so the hash takes batches from memory
/// instead of reading them back from the file.
const HASH_LAG: u64 = RETAINED as u64;

impl Ingest {
    /// Starts an ingest of `digest` into a new temporary file.
    pub fn start(store: &Arc<Store>, digest: &Digest) -> io::Result<Ingest> {
        let (file, tmp) = store.temp_file("blob")?;
        let (progress, _) = watch::channel(Progress {
            phase: Phase::Connecting,
            written: 0,
            total: None,
            present: Present::default(),
        });
        Ok(Ingest {
            store: store.clone(),
            digest: digest.clone(),
            file: Some(file),
            tmp,
            progress,
            committed: false,
            reservation: None,
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

    /// The source is found and `total` bytes (when known) will come: they
    /// are reserved ([`super::room`]: without evicting anything; a body of
    /// unknown size reserves as it arrives) and one extent is allocated up
    /// front, so a full disk fails here, early.
    pub async fn reserve(&mut self, total: Option<u64>) -> Result<(), ReserveError> {
        let store = self.store.clone();
        let file = self.file.as_ref().map(File::try_clone).transpose()?;
        let reservation = super::pool::run(move || -> Result<Reservation, ReserveError> {
            let reservation = store.reserve(total.unwrap_or(0))?;
            if let (Some(t), Some(file)) = (total.filter(|&t| t > 0), file) {
                let len = i64::try_from(t).unwrap_or(i64::MAX);
                if let Err(e) = nix::fcntl::posix_fallocate(&file, 0, len) {
                    if e != nix::errno::Errno::EOPNOTSUPP && e != nix::errno::Errno::EINVAL {
                        return Err(io::Error::other(format!(
                            "allocating {t} bytes in the cache: {e}"
                        ))
                        .into());
                    }
                }
            }
            Ok(reservation)
        })
        .await??;
        self.reservation = Some(Arc::new(Mutex::new(reservation)));
        self.progress.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
        });
        Ok(())
    }

    /// Starts writing the blob in parts at their offsets, `total` bytes
    /// when known. `written` (what readers may read) is the contiguous
    /// start of the blob; a task hashes it in order as it grows.
    pub fn parts(&mut self, total: Option<u64>) -> io::Result<Parts> {
        let file = Arc::new(
            self.file
                .take()
                .ok_or_else(|| io::Error::other("ingest already writing"))?,
        );
        let shared = Arc::new(Mutex::new(Shared::default()));
        let hasher = tokio::spawn(hash_in_order(
            file.clone(),
            shared.clone(),
            self.progress.subscribe(),
        ));
        let reservation = self
            .reservation
            .clone()
            .ok_or_else(|| io::Error::other("ingest written before its room was reserved"))?;
        Ok(Parts {
            file,
            total,
            shared,
            progress: self.progress.clone(),
            hasher,
            reservation,
        })
    }

    /// Waits for the hash of a blob whose `len` bytes are all written, and
    /// checks it against the digest and the announced size. On success
    /// readers may send the last byte; durability follows in
    /// [`Ingest::commit`].
    pub async fn verify(&mut self, parts: Parts, len: u64) -> Result<u64, IngestError> {
        let io_error = |source| IngestError::Write {
            path: self.tmp.clone(),
            source,
        };
        let Parts {
            file,
            total,
            shared,
            hasher,
            ..
        } = parts;
        if self.progress.borrow().written != len {
            hasher.abort();
            return Err(io_error(io::Error::other("parts of the blob missing")));
        }
        shared.lock().end = Some(len);
        self.progress.send_modify(|_| {}); // wakes the hash to see the end
        let got = hasher
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r)
            .map_err(io_error)?;
        if got != self.digest || total.is_some_and(|t| t != len) {
            return Err(IngestError::Mismatch {
                expected: self.digest.clone(),
                got,
                len,
            });
        }
        self.file =
            Some(Arc::try_unwrap(file).map_err(|_| {
                io_error(io::Error::other("file still shared after the last write"))
            })?);
        // Clients may have their last byte now; durability is the cache's
        // concern and continues without holding them.
        self.progress.send_modify(|p| p.phase = Phase::Verified);
        Ok(len)
    }

    /// Records `origin` as a namespace the blob was verified through,
    /// syncs the verified file and renames it into the store (or, when
    /// another route's copy got there first, keeps that one: the bytes
    /// are the same). On failure readers still finish from their open
    /// file; only caching failed.
    pub async fn commit(&mut self, origin: &Namespace) -> io::Result<()> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("nothing verified to commit"))?;
        let store = self.store.clone();
        let (tmp, d, origin) = (self.tmp.clone(), self.digest.clone(), origin.clone());
        let len = self.progress.borrow().written;
        let reservation = self.reservation.take();
        super::pool::run(move || {
            store.note(&d, Some(&origin), Some(len))?;
            if store.blob_path(&d).exists() {
                return std::fs::remove_file(&tmp);
            }
            file.sync_all()?;
            store.commit_blob(&tmp, &d)?;
            // The reserved room is the stored blob now.
            if let Some(r) = reservation.and_then(|r| Arc::try_unwrap(r).ok()) {
                r.into_inner().commit(len);
            } else {
                store.stored_changed(len, 0);
            }
            Ok(())
        })
        .await??;
        self.committed = true;
        Ok(())
    }

    /// Publishes how the ingest ended, removing the temporary file first
    /// unless the blob is in the store.
    /// The file is removed on the disk pool (never on an async worker),
    /// and the end is published once it is gone.
    pub fn end(mut self, phase: Phase) {
        let progress = self.progress.clone();
        let publish = move || progress.send_modify(|p| p.phase = phase);
        match self.take_temp() {
            Some(tmp) => super::pool::detach(move || {
                let _ = std::fs::remove_file(&tmp);
                publish();
            }),
            None => publish(),
        }
    }

    /// The temporary file's path, once, unless the blob is in the store.
    fn take_temp(&mut self) -> Option<PathBuf> {
        if self.committed {
            return None;
        }
        self.committed = true; // nothing left to remove
        Some(self.tmp.clone())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Some(tmp) = self.take_temp() {
            super::pool::detach(move || {
                let _ = std::fs::remove_file(&tmp);
            });
        }
    }
}

/// A blob being written in parts at their offsets ([`Ingest::parts`]).
pub struct Parts {
    file: Arc<File>,
    total: Option<u64>,
    shared: Arc<Mutex<Shared>>,
    progress: watch::Sender<Progress>,
    hasher: JoinHandle<io::Result<Digest>>,
    /// Grown as bytes of a blob of unknown size arrive.
    reservation: Arc<Mutex<Reservation>>,
}

impl Parts {
    /// Waits, before a write at `offset` that extends the readable start,
    /// until the hash is less than [`HASH_LAG`] behind it. Writes further
    /// on (a piece ahead of others) never wait.
    pub async fn hash_room(&self, offset: u64) {
        loop {
            let (hashed, notify) = {
                let s = self.shared.lock();
                if s.done.prefix() != offset || offset.saturating_sub(s.hashed) <= HASH_LAG {
                    return;
                }
                (s.hashed, s.caught_up.clone())
            };
            let woken = notify.notified();
            if self.shared.lock().hashed != hashed {
                continue;
            }
            woken.await;
        }
    }

    /// Starts writing `chunks` at `offset` on the disk pool at once (the
    /// caller may go on receiving meanwhile), then publishes the readable
    /// start of the blob when it grew.
    pub fn write_at(
        &self,
        offset: u64,
        chunks: Vec<Bytes>,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send {
        let (file, shared) = (self.file.clone(), self.shared.clone());
        let (progress, total) = (self.progress.clone(), self.total);
        let reservation = self.reservation.clone();
        let present = self.progress.borrow().present.clone();
        let job = super::pool::run(move || -> io::Result<()> {
            let len: usize = chunks.iter().map(Bytes::len).sum();
            let end = offset + len as u64;
            if total.is_some_and(|t| end > t) {
                return Err(io::Error::other("part ends past the blob"));
            }
            // A body of unknown size is held to the same limits as it
            // arrives.
            reservation
                .lock()
                .grow(end)
                .map_err(|e| io::Error::new(io::ErrorKind::StorageFull, e.to_string()))?;
            write_all_at(&file, &chunks, offset)?;
            let prefix = {
                let mut s = shared.lock();
                if offset >= s.hashed && s.retained_bytes + len <= RETAINED {
                    s.retained_bytes += len;
                    s.retained.insert(offset, Arc::new(chunks));
                }
                s.done.insert(offset, end);
                s.done.prefix()
            };
            present.add(offset, end);
            // Readers of the start and of parts further on, and the hash.
            progress.send_modify(|p| p.written = p.written.max(prefix));
            Ok(())
        });
        async move { job.await? }
    }

    /// Stops without verifying (the source broke).
    pub fn stop(self) {
        self.hasher.abort();
    }
}

/// Writes `chunks` at `offset` with `pwritev`, without copying them first.
fn write_all_at(file: &File, chunks: &[Bytes], mut offset: u64) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = chunks.iter().map(|c| io::IoSlice::new(c)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let off = i64::try_from(offset).map_err(io::Error::other)?;
        match nix::sys::uio::pwritev(file, rest, off) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                offset += n as u64;
                io::IoSlice::advance_slices(&mut rest, n);
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// 40 MiB (more than one hash turn and than the memory kept for the
    /// hash) written as 1 MiB batches in `order`, then verified.
    async fn ingest_in(order: &[usize]) -> Result<u64, IngestError> {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let blob: Vec<u8> = (0..40u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut ingest = Ingest::start(&store, &Digest::of(&blob)).unwrap();
        let total = blob.len() as u64;
        ingest.reserve(Some(total)).await.unwrap();
        let parts = ingest.parts(Some(total)).unwrap();
        for &i in order {
            let at = (i << 20) as u64;
            parts.hash_room(at).await;
            let chunk = Bytes::copy_from_slice(&blob[i << 20..(i + 1) << 20]);
            parts.write_at(at, vec![chunk]).await.unwrap();
        }
        let verified = tokio::time::timeout(Duration::from_secs(60), ingest.verify(parts, total));
        verified.await.expect("the hash hung")
    }

    #[tokio::test]
    async fn the_hash_follows_parts_in_order_and_out_of_order() {
        let in_order: Vec<usize> = (0..40).collect();
        assert_eq!(ingest_in(&in_order).await.unwrap(), 40 << 20);
        // The second half first: the hash reads it back from the file
        // once the first half is there.
        let halves: Vec<usize> = (20..40).chain(0..20).collect();
        assert_eq!(ingest_in(&halves).await.unwrap(), 40 << 20);
        // A missing part is an error, not a wrong digest or a hang.
        let gap: Vec<usize> = (0..40).filter(|&i| i != 7).collect();
        assert!(matches!(
            ingest_in(&gap).await,
            Err(IngestError::Write { .. })
        ));
    }
}
