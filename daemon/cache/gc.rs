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
    /// Whether the cache was walked: not when the running totals showed
    /// every limit out of reach.
    pub walked: bool,
    /// Files (blobs, manifests, tags) and their bytes before (files and
    /// blobs counted only when walked).
    pub files_before: u64,
    pub bytes_before: u64,
    pub blobs_before: u64,
    /// Files evicted, of them blobs, and their bytes.
    pub evicted: u64,
    pub evicted_blobs: u64,
    pub evicted_bytes: u64,
    /// Blobs that would have been evicted but were in use.
    pub skipped_in_use: u64,
    /// Files kept because a pin names them (`nodemirror pin`), and their
    /// bytes (counted when walked).
    pub pinned: u64,
    pub pinned_bytes: u64,
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

// Ordered by last access (then path), for the selection heap.
impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.accessed, &self.path).cmp(&(other.accessed, &other.path))
    }
}

/// Calls `f` with each file two levels under `dir/sha256`, named by its
/// digest, one shard folder at a time: nothing grows with the cache.
fn each_sharded(dir: &Path, f: &mut dyn FnMut(PathBuf, Digest)) -> io::Result<()> {
    let top = dir.join("sha256");
    let shards = match fs::read_dir(&top) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for shard in shards {
        let shard = shard?.path();
        if !shard.is_dir() {
            continue;
        }
        for e in fs::read_dir(&shard)? {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let Ok(d) = format!("sha256:{name}").parse::<Digest>() {
                f(path, d);
            }
        }
    }
    Ok(())
}

/// Calls `f` with every file under `dir`, at any depth.
fn each_file_under(dir: &Path, f: &mut dyn FnMut(PathBuf)) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => each_file_under(&p, f),
            Ok(_) => f(p),
            Err(_) => {}
        }
    }
}

/// Bytes available to unprivileged users on the cache's filesystem.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// The share of the cache's room the collector keeps free for new
/// downloads (a tenth): reservations are never granted by evicting.
const HEADROOM: u64 = 10;

/// Walks that a collection may make before it stops with what it freed
/// (an entry in use, or one that came in meanwhile, can leave it short).
const PASSES: usize = 4;

/// One walk over what the cache stores.
#[derive(Default)]
struct Walk {
    files: u64,
    blobs: u64,
    bytes: u64,
    /// The oldest entries, not in use, whose bytes cover what was wanted
    /// (newest on top).
    oldest: std::collections::BinaryHeap<Entry>,
    oldest_bytes: u64,
    /// When blobs in use were last read.
    in_use: Vec<SystemTime>,
    /// Pinned files and their bytes.
    pinned: u64,
    pinned_bytes: u64,
}

impl Store {
    pub fn stats(&self) -> io::Result<Stats> {
        let mut stats = Stats {
            temp_files: 0,
            free_bytes: free_bytes(&self.root)?,
            ..Stats::default()
        };
        let size = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        each_sharded(&self.root.join("blobs"), &mut |p, _| {
            stats.blobs += 1;
            stats.blob_bytes += size(&p);
        })?;
        each_sharded(&self.root.join("manifests"), &mut |p, _| {
            stats.manifests += 1;
            stats.manifest_bytes += size(&p);
        })?;
        each_file_under(&self.root.join("tags"), &mut |p| {
            stats.tags += 1;
            stats.tag_bytes += size(&p);
        });
        each_file_under(&self.root.join("tmp"), &mut |_| stats.temp_files += 1);
        Ok(stats)
    }

    /// Calls `f` with every blob, manifest and tag file, its size and last
    /// access (a file that vanished meanwhile is left out).
    fn each_entry(&self, f: &mut dyn FnMut(Entry)) -> io::Result<()> {
        let mut visit = |path: PathBuf, kind: Kind| {
            if let Ok(meta) = fs::metadata(&path) {
                f(Entry {
                    path,
                    kind,
                    size: meta.len(),
                    accessed: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        };
        each_sharded(&self.root.join("blobs"), &mut |p, d| {
            visit(p, Kind::Blob(d))
        })?;
        each_sharded(&self.root.join("manifests"), &mut |p, d| {
            visit(p, Kind::Manifest(d))
        })?;
        each_file_under(&self.root.join("tags"), &mut |p| visit(p, Kind::Tag));
        Ok(())
    }

    /// Walks the cache once: its totals, and the oldest entries not in use
    /// that together hold at least `want` bytes. Memory grows with what is
    /// selected, never with the cache.
    fn walk(&self, want: u64, pinned: &super::pins::Pinned) -> io::Result<Walk> {
        let mut w = Walk::default();
        self.each_entry(&mut |e| {
            w.files += 1;
            w.bytes += e.size;
            let is_pinned = match &e.kind {
                Kind::Blob(d) | Kind::Manifest(d) => pinned.digests.contains(d),
                Kind::Tag => pinned.tag_files.contains(&e.path),
            };
            if is_pinned {
                w.pinned += 1;
                w.pinned_bytes += e.size;
            }
            if let Kind::Blob(d) = &e.kind {
                w.blobs += 1;
                if self.in_use(d) {
                    w.in_use.push(e.accessed);
                    return;
                }
            }
            if is_pinned {
                return;
            }
            if want == 0 {
                return;
            }
            w.oldest_bytes += e.size;
            w.oldest.push(e);
            // Drop the newest while the rest still cover `want`.
            while w
                .oldest
                .peek()
                .is_some_and(|top| w.oldest_bytes - top.size >= want)
            {
                if let Some(top) = w.oldest.pop() {
                    w.oldest_bytes -= top.size;
                }
            }
        })?;
        Ok(w)
    }

    /// Evicts the least recently used blobs, manifests and tags until what
    /// is stored leaves a tenth of the cache's room free: the room is
    /// `max_size`, or what the filesystem has beyond `min_free` (bytes
    /// reserved by downloads under way count as free: they never cause an
    /// eviction), whichever is smaller. A blob in use is never evicted.
    ///
    /// When the running totals are known (the daemon, once its start-up
    /// count is done) and show every limit out of reach, nothing is
    /// walked. Otherwise one walk finds the oldest entries that cover what
    /// must go, without listing or sorting the whole cache.
    pub fn collect(&self, limits: Limits) -> io::Result<Report> {
        let stored_then = self.stored_bytes();
        let free = free_bytes(&self.root)?.saturating_add(self.reserved_bytes());
        // The room is the same whatever is evicted: what goes frees as
        // much on the filesystem.
        let target = |size: u64| {
            let on_disk = size.saturating_add(free).saturating_sub(limits.min_free);
            let room = limits.max_size.map_or(on_disk, |m| m.min(on_disk));
            room - room / HEADROOM
        };
        let mut report = Report::default();
        let mut size = if self.counted() {
            stored_then
        } else {
            // No running total (a tool, or the daemon before its count):
            // count first, in one walk that keeps nothing.
            let w = self.walk(0, &super::pins::Pinned::default())?;
            report.walked = true;
            (report.files_before, report.blobs_before) = (w.files, w.blobs);
            w.bytes
        };
        report.bytes_before = size;
        if size <= target(size) {
            report.bytes_after = size;
            if report.walked {
                self.set_counted(size);
            }
            return Ok(report);
        }
        let target = target(size);
        // What the pins keep, worked out once for this collection.
        let pinned = self.pinned()?;
        for pass in 0..PASSES {
            let w = self.walk(size.saturating_sub(target), &pinned)?;
            report.walked = true;
            if pass == 0 {
                (report.files_before, report.blobs_before) = (w.files, w.blobs);
                report.bytes_before = w.bytes;
                (report.pinned, report.pinned_bytes) = (w.pinned, w.pinned_bytes);
            }
            size = w.bytes;
            let selected = w.oldest.into_sorted_vec();
            let cutoff = selected.last().map(|e| e.accessed);
            report.skipped_in_use = w
                .in_use
                .iter()
                .filter(|t| cutoff.is_some_and(|c| **t <= c))
                .count() as u64;
            let mut freed_any = false;
            for e in selected {
                if size <= target {
                    break;
                }
                match fs::remove_file(&e.path) {
                    Ok(()) => {
                        size -= e.size;
                        freed_any = true;
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
            if size <= target || !freed_any {
                break;
            }
        }
        report.bytes_after = size;
        if size > target && report.pinned_bytes > 0 {
            tracing::warn!(
                stored = size,
                room = target,
                pinned_bytes = report.pinned_bytes,
                "the cache stays over its limits: pinned images are never evicted"
            );
        }
        // What came in while the walk ran still counts.
        let since = self.stored_bytes().saturating_sub(stored_then);
        self.set_counted(size.saturating_add(since));
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
        let mut failed = None;
        for kind in ["blobs", "manifests"] {
            each_sharded(&self.root.join(kind), &mut |path, digest| {
                if failed.is_some() {
                    return;
                }
                checked += 1;
                let ok = match kind {
                    "blobs" => hash_file(&path).map(|h| h == digest),
                    _ => Ok(self.manifest(&digest).is_ok()),
                };
                let dest = self
                    .root
                    .join("quarantine")
                    .join(format!("{kind}-{}", digest.hex()));
                match ok.and_then(|ok| {
                    if ok {
                        Ok(false)
                    } else {
                        fs::rename(&path, &dest).map(|()| true)
                    }
                }) {
                    Ok(false) => {}
                    Ok(true) => {
                        self.content_gone(&digest);
                        tracing::warn!(path = %path.display(), moved_to = %dest.display(), "corrupt cache file quarantined");
                        bad.push(dest);
                    }
                    Err(e) => failed = Some(e),
                }
            })?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((checked, bad)),
        }
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
    fn nothing_is_walked_while_the_running_total_is_within_every_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..3u8 {
            put(&store, &[i; 1000], 10);
        }
        // A running total that says 10 bytes: a walk would find 3,000.
        store.set_counted(10);
        let generous = Limits {
            max_size: Some(1 << 30),
            min_free: 0,
        };
        let r = store.collect(generous).unwrap();
        assert!(!r.walked, "{r:?}");
        assert_eq!((r.bytes_before, r.bytes_after, r.evicted), (10, 10, 0));
        // A limit in reach of the (true) total: one walk, which evicts.
        store.set_counted(3000);
        let r = store
            .collect(Limits {
                max_size: Some(2000),
                min_free: 0,
            })
            .unwrap();
        assert!(r.walked);
        assert_eq!((r.bytes_before, r.evicted, r.bytes_after), (3000, 2, 1000));
        assert_eq!(store.stored_bytes(), 1000);
        // A tool's store has no running total: it counts, keeping nothing.
        let (tool, _) = Store::open_beside(dir.path()).unwrap();
        let r = tool.collect(generous).unwrap();
        assert!(r.walked);
        assert_eq!((r.files_before, r.evicted), (1, 0));
    }

    #[test]
    fn the_oldest_are_found_without_listing_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blobs: Vec<Digest> = (0..1000u32)
            .map(|i| {
                let mut body = [0u8; 100];
                body[..4].copy_from_slice(&i.to_le_bytes());
                put(&store, &body, 10_000 - u64::from(i))
            })
            .collect();
        // The selection for 100 blobs' bytes holds 100 entries, not 1,000.
        let w = store
            .walk(100 * 100, &super::super::pins::Pinned::default())
            .unwrap();
        assert_eq!((w.files, w.bytes), (1000, 100_000));
        assert_eq!(w.oldest.len(), 100);
        // Evicting a tenth takes exactly the oldest tenth.
        let r = store
            .collect(Limits {
                max_size: Some(100_000),
                min_free: 0,
            })
            .unwrap();
        assert_eq!((r.evicted, r.bytes_after), (100, 90_000));
        for (i, d) in blobs.iter().enumerate() {
            assert_eq!(store.blob_path(d).exists(), i >= 100, "blob {i}");
        }
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
