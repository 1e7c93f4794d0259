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
        // One look at which shard folders exist, then only those: an
        // empty or small cache costs an idle node one folder read a pass
        // (measured before: 512 jobs on the disk pool a second, 2 % of a
        // core per idle daemon).
        let from = shard;
        for s in shards(&store).await.into_iter().filter(|&s| s >= from) {
            let blobs = blobs_of(&store, s).await;
            let checked = !blobs.is_empty();
            for d in blobs {
                let r = rate();
                if r == 0 {
                    break;
                }
                if let Err(e) = check(&store, &d, r).await {
                    tracing::debug!(digest = %d, error = %e, "background verification skipped a blob");
                }
            }
            shard = s.wrapping_add(1);
            if checked {
                let (path, text) = (next.clone(), format!("{shard:02x}\n"));
                let _ = pool::run(move || fs::write(path, text)).await;
            }
            if shard == 0 {
                break;
            }
        }
        shard = 0;
        tracing::debug!("background verification finished a pass over the cache");
        tokio::time::sleep(BETWEEN_PASSES).await;
    }
}

/// The shard folders there are (`blobs/sha256/<2 hex>`), in order.
async fn shards(store: &Arc<Store>) -> Vec<u8> {
    let dir = store.root().join("blobs/sha256");
    let listed = pool::run(move || -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name();
            if let Some(s) = name.to_str().and_then(|n| u8::from_str_radix(n, 16).ok()) {
                out.push(s);
            }
        }
        out.sort_unstable();
        Ok(out)
    })
    .await;
    match listed {
        Ok(Ok(v)) => v,
        _ => Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle node with an empty cache: a pass is one folder read, no
    /// write (before: a read and a write per shard, 512 jobs a second).
    #[tokio::test]
    async fn an_empty_cache_costs_a_pass_one_folder_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let walker = tokio::spawn(run(store.clone(), || 1 << 30));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !dir.path().join(NEXT_FILE).exists(),
            "no shard was checked, nothing to remember"
        );
        // A blob in one shard is checked, and where to go on is kept.
        let body = b"a blob to check";
        let d = Digest::of(body);
        crate::atomic::write(&store.blob_path(&d), b"not the blob").unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        walker.abort();
        assert!(
            !store.blob_path(&d).exists(),
            "the damaged blob was quarantined"
        );
        let next = fs::read_to_string(dir.path().join(NEXT_FILE)).unwrap();
        assert_eq!(
            u8::from_str_radix(next.trim(), 16).unwrap(),
            u8::from_str_radix(&d.hex()[..2], 16)
                .unwrap()
                .wrapping_add(1)
        );
    }
}
