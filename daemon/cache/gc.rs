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
    /// What downloads' reservations are held to under these limits.
    pub fn budget(&self, max_blob_size: u64) -> super::room::Budget {
        super::room::Budget {
            max_size: self.max_size,
            min_free: self.min_free,
            max_blob_size,
        }
    }

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
    pub manifest_bytes: u64,
    pub tags: u64,
    pub tag_bytes: u64,
    pub temp_files: u64,
    pub free_bytes: u64,
}

impl Stats {
    /// What counts against `max_size`: blobs, manifests and tags.
    pub fn stored_bytes(&self) -> u64 {
        self.blob_bytes + self.manifest_bytes + self.tag_bytes
    }
}

/// What a collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Files (blobs, manifests, tags) and their bytes before.
    pub files_before: u64,
    pub bytes_before: u64,
    pub blobs_before: u64,
    /// Files evicted, of them blobs, and their bytes.
    pub evicted: u64,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    /// Blobs that would have been evicted but were in use.
    pub skipped_in_use: u64,
    pub bytes_after: u64,
}

/// What a cached file is.
enum Kind {
    Blob(Digest),
    Manifest(Digest),
    Tag,
}

struct Entry {
    path: PathBuf,
    kind: Kind,
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

/// Every file under `dir`, at any depth.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&p, out),
            Ok(_) => out.push(p),
            Err(_) => {}
        }
    }
}

fn count_files(dir: &Path) -> u64 {
    let mut files = Vec::new();
    files_under(dir, &mut files);
    files.len() as u64
}

fn bytes_of(paths: impl Iterator<Item = PathBuf>) -> (u64, u64) {
    paths.fold((0, 0), |(n, bytes), p| {
        (
            n + 1,
            bytes + fs::metadata(&p).map(|m| m.len()).unwrap_or(0),
        )
    })
}

/// Bytes available to unprivileged users on the cache's filesystem.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// The share of the cache's room the collector keeps free for new
/// downloads (a tenth): reservations are never granted by evicting.
const HEADROOM: u64 = 10;

impl Store {
    pub fn stats(&self) -> io::Result<Stats> {
        let (blobs, blob_bytes) = bytes_of(
            sharded_files(&self.root.join("blobs"))?
                .into_iter()
                .map(|(p, _)| p),
        );
        let (manifests, manifest_bytes) = bytes_of(
            sharded_files(&self.root.join("manifests"))?
                .into_iter()
                .map(|(p, _)| p),
        );
        let mut tags = Vec::new();
        files_under(&self.root.join("tags"), &mut tags);
        let (tags, tag_bytes) = bytes_of(tags.into_iter());
        Ok(Stats {
            blobs,
            blob_bytes,
            manifests,
            manifest_bytes,
            tags,
            tag_bytes,
            temp_files: count_files(&self.root.join("tmp")),
            free_bytes: free_bytes(&self.root)?,
        })
    }

    /// Every blob, manifest and tag file with its size and last access.
    fn entries(&self) -> io::Result<Vec<Entry>> {
        let mut files: Vec<(PathBuf, Kind)> = Vec::new();
        for (p, d) in sharded_files(&self.root.join("blobs"))? {
            files.push((p, Kind::Blob(d)));
        }
        for (p, d) in sharded_files(&self.root.join("manifests"))? {
            files.push((p, Kind::Manifest(d)));
        }
        let mut tags = Vec::new();
        files_under(&self.root.join("tags"), &mut tags);
        files.extend(tags.into_iter().map(|p| (p, Kind::Tag)));
        Ok(files
            .into_iter()
            // A file may vanish under a concurrent collection.
            .filter_map(|(path, kind)| {
                let meta = fs::metadata(&path).ok()?;
                Some(Entry {
                    path,
                    kind,
                    size: meta.len(),
                    accessed: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                })
            })
            .collect())
    }

    /// Evicts the least recently used blobs, manifests and tags until what
    /// is stored leaves a tenth of the cache's room free: the room is
    /// `max_size`, or what the filesystem has beyond `min_free` (bytes
    /// reserved by downloads under way count as free: they never cause an
    /// eviction), whichever is smaller. A blob in use is never evicted.
    pub fn collect(&self, limits: Limits) -> io::Result<Report> {
        let stored_then = self.stored_bytes();
        let mut entries = self.entries()?;
        entries.sort_by_key(|e| e.accessed);
        let mut report = Report {
            files_before: entries.len() as u64,
            bytes_before: entries.iter().map(|e| e.size).sum(),
            blobs_before: entries
                .iter()
                .filter(|e| matches!(e.kind, Kind::Blob(_)))
                .count() as u64,
            ..Default::default()
        };
        let mut size = report.bytes_before;
        let free = free_bytes(&self.root)?.saturating_add(self.reserved_bytes());
        let on_disk = size.saturating_add(free).saturating_sub(limits.min_free);
        let room = limits.max_size.map_or(on_disk, |m| m.min(on_disk));
        let target = room - room / HEADROOM;
        for e in entries {
            if size <= target {
                break;
            }
            if let Kind::Blob(d) = &e.kind {
                if self.in_use(d) {
                    report.skipped_in_use += 1;
                    continue;
                }
            }
            match fs::remove_file(&e.path) {
                Ok(()) => {
                    size -= e.size;
                    report.evicted += 1;
                    report.evicted_bytes += e.size;
                    match &e.kind {
                        Kind::Blob(d) => {
                            report.evicted_blobs += 1;
                            self.content_gone(d);
                            tracing::debug!(digest = %d, bytes = e.size, "evicted blob");
                        }
                        Kind::Manifest(d) => self.content_gone(d),
                        Kind::Tag => {}
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => size -= e.size,
                Err(err) => return Err(err),
            }
        }
        report.bytes_after = size;
        // What came in while the scan ran still counts.
        let since = self.stored_bytes().saturating_sub(stored_then);
        self.set_stored(size.saturating_add(since));
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
        // Down to 1800 (a tenth of the room kept free): three go, the
        // oldest is in use and stays.
        assert_eq!((r.evicted, r.skipped_in_use, r.bytes_after), (3, 1, 1000));
        assert!(store.blob_path(&oldest).exists(), "in use: kept");
        assert!(!store.blob_path(&old).exists());
        assert!(!store.blob_path(&newer).exists());
        assert!(!store.blob_path(&newest).exists());
        assert_eq!(store.stored_bytes(), 1000);
        drop(held);
        let r = store.collect(limits).unwrap();
        assert_eq!(r.evicted, 0, "within limits now");
        assert_eq!(store.stats().unwrap().blobs, 1);
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
    fn manifests_and_tags_count_and_go_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = put(&store, &[9; 1000], 10);
        let body = br#"{"schemaVersion":2,"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
        let m = Digest::of(body);
        store.put_manifest(&m, "application/x-test", body).unwrap();
        let ns: crate::reference::Namespace = "r.test".parse().unwrap();
        let repo: crate::reference::Repository = "a".parse().unwrap();
        store
            .put_tag(&ns, &repo, "v1", crate::oci::accept::Class::ALL, &m)
            .unwrap();
        let stats = store.stats().unwrap();
        assert_eq!((stats.manifests, stats.tags), (1, 1));
        assert!(stats.stored_bytes() > 1000);
        // The blob is the oldest: it goes first; then room for the rest.
        let r = store
            .collect(Limits {
                max_size: Some(stats.stored_bytes() - 1),
                min_free: 0,
            })
            .unwrap();
        assert_eq!((r.evicted, r.evicted_blobs), (1, 1));
        assert!(!store.blob_path(&blob).exists());
        // Nothing left once the limit is tiny: manifests and tags go too.
        let r = store
            .collect(Limits {
                max_size: Some(1),
                min_free: 0,
            })
            .unwrap();
        assert_eq!(r.evicted, 2);
        let after = store.stats().unwrap();
        assert_eq!(
            (after.manifests, after.tags, after.stored_bytes()),
            (0, 0, 0)
        );
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
