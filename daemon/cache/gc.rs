//! Cache maintenance: statistics, least-recently-used eviction against a
//! size limit and a free-disk floor, and re-verification of every file.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use super::Store;
use crate::reference::Digest;

/// When to evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Evict until blobs take at most this many bytes.
    pub max_size: Option<u64>,
    /// Evict until the filesystem has at least this many bytes free.
    pub min_free: u64,
}

impl Limits {
    /// The limits `settings` describe, a percentage floor taken of the
    /// filesystem holding `root`.
    pub fn from_settings(
        settings: &crate::config::CacheSettings,
        root: &Path,
    ) -> io::Result<Limits> {
        let min_free = match settings.min_free {
            crate::config::MinFree::Bytes(b) => b,
            crate::config::MinFree::Percent(p) => {
                let s = nix::sys::statvfs::statvfs(root).map_err(io::Error::from)?;
                let size = (s.blocks() as u64).saturating_mul(s.fragment_size() as u64);
                size / 100 * u64::from(p)
            }
        };
        Ok(Limits {
            max_size: settings.max_size,
            min_free,
        })
    }
}

/// What is in the cache.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub blobs: u64,
    pub blob_bytes: u64,
    pub manifests: u64,
    pub tags: u64,
    pub temp_files: u64,
    pub free_bytes: u64,
}

/// What a collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub blobs_before: u64,
    pub bytes_before: u64,
    pub evicted: u64,
    pub evicted_bytes: u64,
    /// Blobs that would have been evicted but were in use.
    pub skipped_in_use: u64,
    pub bytes_after: u64,
}

struct Entry {
    path: PathBuf,
    digest: Digest,
    size: u64,
    accessed: SystemTime,
}

/// Files two levels under `dir/sha256`, named by their digest.
fn sharded_files(dir: &Path) -> io::Result<Vec<(PathBuf, Digest)>> {
    let mut out = Vec::new();
    let top = dir.join("sha256");
    let shards = match fs::read_dir(&top) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for shard in shards {
        let shard = shard?.path();
        if !shard.is_dir() {
            continue;
        }
        for f in fs::read_dir(&shard)? {
            let path = f?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Ok(d) = format!("sha256:{name}").parse::<Digest>() {
                out.push((path, d));
            }
        }
    }
    Ok(out)
}

fn count_files(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

/// Bytes available to unprivileged users on the cache's filesystem.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

impl Store {
    pub fn stats(&self) -> io::Result<Stats> {
        let blobs = sharded_files(&self.root.join("blobs"))?;
        let mut blob_bytes = 0;
        for (p, _) in &blobs {
            blob_bytes += fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        }
        Ok(Stats {
            blobs: blobs.len() as u64,
            blob_bytes,
            manifests: sharded_files(&self.root.join("manifests"))?.len() as u64,
            tags: count_files(&self.root.join("tags")),
            temp_files: count_files(&self.root.join("tmp")),
            free_bytes: free_bytes(&self.root)?,
        })
    }

    /// Evicts least-recently-used blobs until both limits hold, never one
    /// that is in use.
    pub fn collect(&self, limits: Limits) -> io::Result<Report> {
        let mut entries = Vec::new();
        for (path, digest) in sharded_files(&self.root.join("blobs"))? {
            // A blob may vanish under a concurrent `nodemirror cache gc`.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            entries.push(Entry {
                path,
                digest,
                size: meta.len(),
                accessed: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        entries.sort_by_key(|e| e.accessed);
        let mut report = Report {
            blobs_before: entries.len() as u64,
            bytes_before: entries.iter().map(|e| e.size).sum(),
            ..Default::default()
        };
        let mut size = report.bytes_before;
        let mut free = free_bytes(&self.root)?;
        for e in entries {
            let over = limits.max_size.is_some_and(|m| size > m) || free < limits.min_free;
            if !over {
                break;
            }
            if self.in_use(&e.digest) {
                report.skipped_in_use += 1;
                continue;
            }
            match fs::remove_file(&e.path) {
                Ok(()) => {
                    self.content_gone(&e.digest);
                    size -= e.size;
                    free += e.size;
                    report.evicted += 1;
                    report.evicted_bytes += e.size;
                    tracing::debug!(digest = %e.digest, bytes = e.size, "evicted blob");
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => size -= e.size,
                Err(err) => return Err(err),
            }
        }
        report.bytes_after = size;
        Ok(report)
    }

    /// Drops the origin record of `d` once neither a blob nor a manifest
    /// of that digest is left.
    pub(crate) fn content_gone(&self, d: &Digest) {
        if !self.blob_path(d).exists() && !self.manifest_path(d).exists() {
            self.remove_origins(d);
        }
    }

    /// Re-hashes every blob and manifest; a file that does not match its
    /// name is moved to `quarantine/`. Returns (checked, quarantined).
    pub fn verify(&self) -> io::Result<(u64, Vec<PathBuf>)> {
        let mut checked = 0;
        let mut bad = Vec::new();
        for kind in ["blobs", "manifests"] {
            for (path, digest) in sharded_files(&self.root.join(kind))? {
                checked += 1;
                let ok = match kind {
                    "blobs" => hash_file(&path)? == digest,
                    _ => self.manifest(&digest).is_ok(),
                };
                if !ok {
                    let dest = self
                        .root
                        .join("quarantine")
                        .join(format!("{kind}-{}", digest.hex()));
                    fs::rename(&path, &dest)?;
                    self.content_gone(&digest);
                    tracing::warn!(path = %path.display(), moved_to = %dest.display(), "corrupt cache file quarantined");
                    bad.push(dest);
                }
            }
        }
        Ok((checked, bad))
    }
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(Digest::from_hasher(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn put(store: &Store, content: &[u8], age_secs: u64) -> Digest {
        let d = Digest::of(content);
        let (mut f, tmp) = store.temp_file("t").unwrap();
        f.write_all(content).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_secs))
            .unwrap();
        store.commit_blob(&tmp, &d).unwrap();
        d
    }

    #[test]
    fn evicts_least_recently_used_first_and_spares_blobs_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let oldest = put(&store, &[1; 1000], 300);
        let old = put(&store, &[2; 1000], 200);
        let newer = put(&store, &[3; 1000], 100);
        let newest = put(&store, &[4; 1000], 0);
        let held = store.hold(&oldest);
        let limits = Limits {
            max_size: Some(2000),
            min_free: 0,
        };
        let r = store.collect(limits).unwrap();
        assert_eq!((r.blobs_before, r.bytes_before), (4, 4000));
        assert_eq!((r.evicted, r.skipped_in_use, r.bytes_after), (2, 1, 2000));
        assert!(store.blob_path(&oldest).exists(), "in use: kept");
        assert!(!store.blob_path(&old).exists());
        assert!(!store.blob_path(&newer).exists());
        assert!(store.blob_path(&newest).exists());
        drop(held);
        let r = store.collect(limits).unwrap();
        assert_eq!(r.evicted, 0, "within limits now");
        assert_eq!(store.stats().unwrap().blobs, 2);
    }

    #[test]
    fn free_space_floor_evicts_everything_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        put(&store, b"a", 10);
        put(&store, b"b", 5);
        let r = store
            .collect(Limits {
                max_size: None,
                min_free: u64::MAX,
            })
            .unwrap();
        assert_eq!(r.evicted, 2);
    }

    #[test]
    fn verify_quarantines_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = put(&store, b"good", 0);
        let bad = put(&store, b"bad!", 0);
        fs::write(store.blob_path(&bad), b"evil").unwrap();
        let (checked, quarantined) = store.verify().unwrap();
        assert_eq!(checked, 2);
        assert_eq!(quarantined.len(), 1);
        assert!(store.blob_path(&good).exists());
        assert!(!store.blob_path(&bad).exists());
    }
}
