//! Single-flight blob ingest: however many clients ask for an uncached
//! blob at once, one task fetches it. The task is not tied to any client,
//! so a client hanging up never cancels it. It hashes and writes the bytes
//! to a temp file from a blocking thread, publishes progress, and only
//! after fsync and a digest match renames the file into the store.
//! Followers read the same file as it grows (see [`super::read`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
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
    pub digest: Digest,
    pub progress: watch::Receiver<Progress>,
    /// The file being written, for readers (`pread` ignores its offset).
    pub file: File,
}

/// What a blob request reads from.
pub enum Source {
    Cached(File, u64),
    Flight(Arc<Flight>),
}

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
            return Ok(Source::Flight(f.clone()));
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
            digest: digest.clone(),
            progress: rx,
            file: file.try_clone()?,
        });
        map.insert(digest.clone(), flight.clone());
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
            let outcome = this.fetch(&req, &digest, file, &tmp, tx.clone()).await;
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
        Ok(Source::Flight(flight))
    }

    async fn fetch(
        &self,
        req: &UpstreamRequest,
        digest: &Digest,
        file: File,
        tmp: &std::path::Path,
        tx: Arc<watch::Sender<Progress>>,
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
        let total = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        tx.send_modify(|p| {
            p.phase = Phase::Streaming;
            p.total = total;
        });

        let (chunks, rx) = mpsc::channel::<Bytes>(32);
        let writer_tx = tx.clone();
        let writer = tokio::task::spawn_blocking(move || write_and_hash(file, rx, &writer_tx));
        let idle = self.upstream.settings().idle_timeout;
        let mut body = resp.into_body();
        let pumped: Result<(), String> = loop {
            match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => break Err(format!("upstream sent nothing for {idle:?}")),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => break Err(format!("upstream body: {e}")),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if chunks.send(data).await.is_err() {
                            break Ok(()); // the writer failed; its error says why
                        }
                    }
                }
            }
        };
        drop(chunks);
        let written = writer
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r);
        if let Err(why) = pumped {
            self.upstream.report_failure(&ep, &why);
            return Phase::Failed(why.into());
        }
        let (got, len) = match written {
            Ok(w) => w,
            Err(e) => return Phase::Failed(format!("writing {}: {e}", tmp.display()).into()),
        };
        if got != *digest || total.is_some_and(|t| t != len) {
            let why = format!("blob digest mismatch: expected {digest}, got {got} ({len} bytes)");
            self.upstream.report_failure(&ep, &why);
            return Phase::Failed(why.into());
        }
        if let Err(e) = self.store.commit_blob(tmp, digest) {
            return Phase::Failed(format!("storing blob: {e}").into());
        }
        tracing::info!(%digest, bytes = len, endpoint = ep.key(), "blob cached");
        Phase::Done
    }
}

/// Writes and hashes chunks as they come, publishing how much is readable.
/// Writes are batched while chunks queue up, flushed when the queue drains.
fn write_and_hash(
    file: File,
    mut rx: mpsc::Receiver<Bytes>,
    tx: &watch::Sender<Progress>,
) -> io::Result<(Digest, u64)> {
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        out.write_all(&chunk)?;
        hasher.update(&chunk);
        written += chunk.len() as u64;
        if rx.is_empty() {
            out.flush()?;
            tx.send_modify(|p| p.written = written);
        }
    }
    out.flush()?;
    tx.send_modify(|p| p.written = written);
    out.get_ref().sync_all()?;
    Ok((Digest::from_hasher(hasher), written))
}
