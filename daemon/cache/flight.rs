//! Single-flight blob ingest: however many clients ask for an uncached
//! blob at once, one task fetches it. The task is not tied to any client,
//! so a client hanging up never cancels it. It hashes and writes the bytes
//! to a temp file from a blocking thread, publishes progress, and only
//! after fsync and a digest match renames the file into the store.
//! Followers read the same file as it grows (see [`super::read`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};

use super::Store;
use crate::reference::{Digest, Namespace, Repository};
use crate::upstream::{AttemptError, Exhausted, Upstream, UpstreamRequest};

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
    Unavailable(Arc<Exhausted>),
    /// The transfer broke or the digest did not match.
    Failed(Arc<str>),
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: Phase,
    /// Bytes in the file and readable.
    pub written: u64,
    /// The blob's size, once known from the upstream's headers.
    pub total: Option<u64>,
}

impl Phase {
    /// Why readers must stop, when the fetch failed.
    pub fn failure(&self) -> Option<String> {
        match self {
            Phase::Failed(why) => Some(format!("blob transfer failed: {why}")),
            Phase::Unavailable(ex) => Some(format!("blob unavailable: {ex}")),
            Phase::Connecting | Phase::Streaming | Phase::Verified | Phase::Done => None,
        }
    }
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

/// One blob being fetched.
pub struct Flight {
    pub progress: watch::Receiver<Progress>,
    /// The file being written, for readers (`pread` ignores its offset).
    pub file: File,
}

/// What a blob request reads from.
pub enum Source {
    Cached(File, u64),
    /// A fetch under way. The request that started it also gets the
    /// upstream's frames straight from memory (see [`super::read::tee`]).
    Flight(Arc<Flight>, Option<mpsc::Receiver<Bytes>>),
}

/// Frames the starting request may lag behind before it is switched to
/// reading the file, so a slow or stuck client never slows the fetch.
const LEADER_FRAMES: usize = 16;

/// The blobs being fetched now, by digest.
pub struct Flights {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
}

impl Flights {
    pub fn new(store: Arc<Store>, upstream: Arc<Upstream>) -> Arc<Flights> {
        Arc::new(Flights {
            store,
            upstream,
            map: Mutex::default(),
        })
    }

    /// How many fetches are under way.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flight for `digest` if one is under way.
    pub fn current(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
    }

    /// The cached blob, the fetch under way, or a new fetch.
    pub fn get_or_start(
        self: &Arc<Self>,
        ns: &Namespace,
        repository: &Repository,
        digest: &Digest,
    ) -> io::Result<Source> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(digest) {
            return Ok(Source::Flight(f.clone(), None));
        }
        // Checked under the lock: a flight commits before it leaves the map,
        // so a blob is either in the map or in the store, never neither
        // while it is being fetched.
        if let Some((file, len)) = self.store.open_blob(digest)? {
            return Ok(Source::Cached(file, len));
        }
        let (file, tmp) = self.store.temp_file("blob")?;
        let (tx, rx) = watch::channel(Progress {
            phase: Phase::Connecting,
            written: 0,
            total: None,
        });
        let flight = Arc::new(Flight {
            progress: rx,
            file: file.try_clone()?,
        });
        map.insert(digest.clone(), flight.clone());
        let (leader, leader_rx) = mpsc::channel(LEADER_FRAMES);
        let req = UpstreamRequest {
            method: Method::GET,
            namespace: ns.clone(),
            repository: repository.clone(),
            tail: format!("blobs/{digest}"),
            needs_resolve: false,
            accept: None,
            range: None,
        };
        let this = self.clone();
        let digest = digest.clone();
        tokio::spawn(async move {
            let _held = this.store.hold(&digest);
            let tx = Arc::new(tx);
            let outcome = this
                .fetch(&req, &digest, file, &tmp, tx.clone(), leader)
                .await;
            if !matches!(outcome, Phase::Done) {
                let _ = std::fs::remove_file(&tmp);
            }
            if let Phase::Failed(why) = &outcome {
                tracing::warn!(%digest, error = %why, "blob fetch failed");
            }
            tx.send_modify(|p| p.phase = outcome);
            this.map
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&digest);
        });
        Ok(Source::Flight(flight, Some(leader_rx)))
    }

    async fn fetch(
        &self,
        req: &UpstreamRequest,
        digest: &Digest,
        file: File,
        tmp: &std::path::Path,
        tx: Arc<watch::Sender<Progress>>,
        leader: mpsc::Sender<Bytes>,
    ) -> Phase {
        let found = self
            .upstream
            .first_success(req, |ep, resp| async move {
                if resp.status() != StatusCode::OK {
                    return Err(AttemptError::Status(resp.status()));
                }
                Ok((ep, resp))
            })
            .await;
        let (ep, resp) = match found {
            Ok((found, _)) => found,
            Err(exhausted) => return Phase::Unavailable(Arc::new(exhausted)),
        };
        let total = crate::server::content_length(resp.headers());
        if let Some(t) = total.filter(|&t| t > 0) {
            // One extent allocation up front; a full disk fails here, early.
            let len = i64::try_from(t).unwrap_or(i64::MAX);
            if let Err(e) = nix::fcntl::posix_fallocate(&file, 0, len) {
                if e != nix::errno::Errno::EOPNOTSUPP && e != nix::errno::Errno::EINVAL {
                    return Phase::Failed(format!("reserving {t} bytes in the cache: {e}").into());
                }
            }
        }
        tx.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
        });

        // Writing and hashing run on two threads side by side: readers follow
        // the writes, and the last byte waits only for the hash to finish.
        // Frames are up to a few hundred KiB (hyper's read buffer), and both
        // queues share them: this bounds an ingest to a few MiB of memory.
        let (chunks, rx) = mpsc::channel::<Bytes>(FRAMES_QUEUED);
        let (to_hash, hash_rx) = mpsc::channel::<Bytes>(FRAMES_QUEUED);
        let writer_tx = tx.clone();
        let writer = tokio::task::spawn_blocking(move || write_chunks(file, rx, &writer_tx));
        let hasher = tokio::task::spawn_blocking(move || hash_chunks(hash_rx));
        let idle = self.upstream.settings().idle_timeout;
        let mut leader = Some(leader);
        let mut body = resp.into_body();
        let pumped: Result<(), String> = loop {
            match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => break Err(format!("upstream sent nothing for {idle:?}")),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => break Err(format!("upstream body: {e}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        // Never wait for the leader: when it lags or has
                        // gone, it continues from the file.
                        if leader
                            .as_ref()
                            .is_some_and(|l| l.try_send(data.clone()).is_err())
                        {
                            leader = None;
                        }
                        let hashed = to_hash.send(data.clone()).await;
                        if hashed.is_err() || chunks.send(data).await.is_err() {
                            break Ok(()); // the writer failed; its error says why
                        }
                    }
                }
            }
        };
        drop((chunks, to_hash));
        let written = writer
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r);
        let hashed = hasher.await.map_err(|e| io::Error::other(e.to_string()));
        if let Err(why) = pumped {
            self.upstream.report_failure(&ep, &why);
            return Phase::Failed(why.into());
        }
        let ((file, len), got) = match (written, hashed) {
            (Ok(w), Ok(h)) => (w, h),
            (Err(e), _) | (_, Err(e)) => {
                return Phase::Failed(format!("writing {}: {e}", tmp.display()).into())
            }
        };
        if got != *digest || total.is_some_and(|t| t != len) {
            let why = format!("blob digest mismatch: expected {digest}, got {got} ({len} bytes)");
            self.upstream.report_failure(&ep, &why);
            return Phase::Failed(why.into());
        }
        // Clients may have their last byte now; durability is the cache's
        // concern and continues without holding them.
        tx.send_modify(|p| p.phase = Phase::Verified);
        let store = self.store.clone();
        let (tmp, d) = (tmp.to_path_buf(), digest.clone());
        let committed = tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            store.commit_blob(&tmp, &d)
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))
        .and_then(|r| r);
        if let Err(e) = committed {
            // Readers finish from their open file; only caching failed, and
            // the temp file is removed once they are done with it.
            tracing::warn!(%digest, error = %e, "verified blob could not be stored");
            return Phase::Verified;
        }
        crate::metrics::METRICS.upstream_bytes.add(&[], len);
        crate::metrics::METRICS.blob_committed(len);
        tracing::info!(%digest, bytes = len, endpoint = ep.key(), "blob cached");
        Phase::Done
    }
}

/// Upstream frames queued for the writer and the hasher.
const FRAMES_QUEUED: usize = 8;

/// Bytes gathered before a write, unless the queue runs dry first.
const WRITE_BATCH: usize = 1 << 20;

fn hash_chunks(mut rx: mpsc::Receiver<Bytes>) -> Digest {
    let mut hasher = Sha256::new();
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
    }
    Digest::from_hasher(hasher)
}

/// Writes chunks as they come, publishing after every write how much is
/// readable. Chunks queued together are written with one `writev`, without
/// copying them into a buffer first.
fn write_chunks(
    mut file: File,
    mut rx: mpsc::Receiver<Bytes>,
    tx: &watch::Sender<Progress>,
) -> io::Result<(File, u64)> {
    let mut batch: Vec<Bytes> = Vec::new();
    let mut written = 0u64;
    while let Some(first) = rx.blocking_recv() {
        let mut batched = first.len();
        batch.push(first);
        while batched < WRITE_BATCH {
            match rx.try_recv() {
                Ok(more) => {
                    batched += more.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        write_all_vectored(&mut file, &batch)?;
        batch.clear();
        written += batched as u64;
        tx.send_modify(|p| p.written = written);
    }
    Ok((file, written))
}

fn write_all_vectored(file: &mut File, chunks: &[Bytes]) -> io::Result<()> {
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
