//! Re-verifying cached blobs in the background, at a bounded rate: a
//! disk that flips a byte of a stored blob is caught (the blob goes to
//! `quarantine/` and is fetched again) instead of being served until
//! someone runs `nodemirror cache verify`.
//!
//! The walk goes shard by shard (`blobs/sha256/00` … `ff`) and starts
//! where the last one stopped (`<cache>/verify.next`), so restarts do not
//! verify the same blobs over and over. Each blob is hashed in 1 MiB
//! reads, each a short job on the disk pool, with pauses that keep the
//! rate at most `verify_rate` bytes a second; 0 turns it off.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::{pool, Store};
use crate::metrics::METRICS;
use crate::reference::Digest;

/// Bytes hashed per pool job.
const STEP: usize = 1 << 20;

/// How long to wait while verification is off, before looking again.
const OFF: Duration = Duration::from_secs(60);

/// The least time between two passes (a small cache is walked quickly).
const BETWEEN_PASSES: Duration = Duration::from_secs(1);

/// Where the walk goes on after a restart.
const NEXT_FILE: &str = "verify.next";

/// Walks the cache for ever, re-verifying blobs at `rate()` bytes a
/// second (read anew for every blob, so a reload changes it).
pub async fn run(store: Arc<Store>, rate: impl Fn() -> u64) {
    let next = store.root().join(NEXT_FILE);
    let path = next.clone();
    let mut shard = pool::run(move || fs::read_to_string(path))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|t| u8::from_str_radix(t.trim(), 16).ok())
        .unwrap_or(0);
    loop {
        if rate() == 0 {
            tokio::time::sleep(OFF).await;
            continue;
        }
        for d in blobs_of(&store, shard).await {
            let r = rate();
            if r == 0 {
                break;
            }
            if let Err(e) = check(&store, &d, r).await {
                tracing::debug!(digest = %d, error = %e, "background verification skipped a blob");
            }
        }
        shard = shard.wrapping_add(1);
        let (path, text) = (next.clone(), format!("{shard:02x}\n"));
        let _ = pool::run(move || fs::write(path, text)).await;
        if shard == 0 {
            tracing::debug!("background verification finished a pass over the cache");
            tokio::time::sleep(BETWEEN_PASSES).await;
        }
    }
}

/// The blobs of one shard folder.
async fn blobs_of(store: &Arc<Store>, shard: u8) -> Vec<Digest> {
    let dir = store
        .root()
        .join("blobs/sha256")
        .join(format!("{shard:02x}"));
    let listed = pool::run(move || -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name();
            if let Ok(d) = format!("sha256:{}", name.to_string_lossy()).parse() {
                out.push(d);
            }
        }
        Ok(out)
    })
    .await;
    match listed {
        Ok(Ok(v)) => v,
        _ => Vec::new(),
    }
}

/// Hashes one blob at `rate` bytes a second; a mismatch quarantines it.
async fn check(store: &Arc<Store>, d: &Digest, rate: u64) -> io::Result<()> {
    let path = store.blob_path(d);
    let file = match pool::run(move || fs::File::open(path)).await? {
        Ok(f) => Arc::new(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let began = Instant::now();
    let mut hasher = Sha256::new();
    let mut at = 0u64;
    loop {
        let f = file.clone();
        let (h, n) = pool::run(move || -> io::Result<(Sha256, usize)> {
            let mut h = hasher;
            let mut buf = vec![0u8; STEP];
            let n = f.read_at(&mut buf, at)?;
            h.update(&buf[..n]);
            Ok((h, n))
        })
        .await??;
        hasher = h;
        if n == 0 {
            break;
        }
        at += n as u64;
        METRICS.verified_bytes.add(&[], n as u64);
        // Keep to the rate: `at` bytes may take `at / rate` seconds.
        let due = Duration::from_secs_f64(at as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(began.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    if Digest::from_hasher(hasher) != *d {
        let (store, d) = (store.clone(), d.clone());
        pool::run(move || {
            store.quarantine_blob(
                &d,
                "its bytes no longer match its digest (background check)",
            )
        })
        .await?;
    }
    Ok(())
}
