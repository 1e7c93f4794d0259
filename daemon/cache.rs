//! The on-disk cache shared by every upstream.
//!
//! Layout under the cache directory:
//! - `blobs/sha256/<2 hex>/<64 hex>`: blob content, named by its digest, so a
//!   layer common to two registries is stored once. A file appears here only
//!   by rename after its bytes were hashed, matched and fsynced.
//! - `manifests/sha256/<2 hex>/<64 hex>`: the manifest's media type, a
//!   newline, then its bytes (verified like blobs).
//! - `tags/<namespace>/<repository>/@<tag>`: the digest the tag pointed to;
//!   the file's mtime is when that was last confirmed upstream.
//! - `tmp/`: ingests in progress; emptied at start, so a `kill -9` leaves
//!   nothing half-written that could ever be served.
//! - `quarantine/`: files that failed `nodemirror cache verify`.
//! - `origins/sha256/<2 hex>/<64 hex>`: the namespaces a digest was
//!   verified through, one per line ([`origins`]).
//!
//! A blob's mtime is its last access, for least-recently-used eviction.

pub mod export;
pub mod gc;
pub mod import;
pub(crate) mod ingest;
mod origins;
pub mod pins;
pub(crate) mod pool;
pub(crate) mod read;
pub mod room;
pub(crate) mod spans;
pub mod verify;

pub use gc::{Limits, Report, Stats};
pub use origins::Record;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::oci::accept::Class;
use crate::reference::{Digest, Namespace, Repository};

/// Access times are refreshed at most this often per blob, to keep reads
/// from turning into metadata writes.
const TOUCH_GRANULARITY: Duration = Duration::from_secs(60);

/// The content-addressed store.
pub struct Store {
    root: PathBuf,
    /// Blobs being read or written: never evicted.
    in_use: Mutex<HashMap<Digest, usize>>,
    /// One writer of origin records at a time (read, add, replace).
    origins_lock: Mutex<()>,
    /// The daemon's hold on the cache folder (`lock`): no other daemon
    /// uses it meanwhile, and tools know one runs ([`Store::open_beside`]).
    owner: Mutex<Option<nix::fcntl::Flock<File>>>,
    /// Bytes held and reserved ([`room`]).
    room: room::Room,
}

/// The file whose lock says a daemon uses the cache.
const LOCK_FILE: &str = "lock";

/// A blob in the store and what is known of it.
pub struct CachedBlob {
    pub file: File,
    pub len: u64,
    pub origins: Vec<Namespace>,
}

/// Keeps a blob from eviction while alive.
pub struct InUse {
    store: Arc<Store>,
    digest: Digest,
    /// Kept alive as long as the hold (a reader's count on a fetch).
    _also: Option<Box<dyn Send + Sync>>,
}

impl InUse {
    /// The same hold, also keeping `guard` alive until it drops.
    pub fn keeping(mut self, guard: impl Send + Sync + 'static) -> InUse {
        self._also = Some(Box::new(guard));
        self
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut map = self.store.in_use.lock();
        if let Some(n) = map.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.digest);
            }
        }
    }
}

fn sharded(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("sha256").join(&d.hex()[..2]).join(d.hex())
}

impl Store {
    /// Opens (creating) the cache at `root` for the daemon: takes the
    /// cache's lock (another process that holds it is an error) and
    /// removes leftovers of its own interrupted ingests.
    pub fn open(root: &Path) -> io::Result<Arc<Store>> {
        let store = Store::layout(root)?;
        store.check_writable()?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK_FILE))?;
        let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!("another nodemirror daemon uses this cache ({e})"),
                )
            })?;
        *store.owner.lock() = Some(held);
        store.clear_temp()?;
        Ok(Arc::new(store))
    }

    /// Opens the cache for a tool (`nodemirror cache ...`) beside a daemon
    /// that may be running: nothing in `tmp/` is touched (the daemon's
    /// downloads), and whether a daemon holds the cache comes back.
    pub fn open_beside(root: &Path) -> io::Result<(Arc<Store>, bool)> {
        let store = Store::layout(root)?;
        let lock = fs::File::open(root.join(LOCK_FILE)).ok();
        let daemon = match lock {
            None => false,
            Some(f) => {
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err()
            }
        };
        Ok((Arc::new(store), daemon))
    }

    /// Lets go of the cache's lock (the daemon, as it stops).
    pub fn release(&self) {
        self.owner.lock().take();
    }

    /// The cache's folders, created when missing, and a check that they
    /// can be written.
    /// Fails when files cannot be written into the cache (checked at
    /// start, so that it fails now, not at the first download).
    pub fn check_writable(&self) -> io::Result<()> {
        let probe = self
            .root
            .join("tmp")
            .join(format!(".probe.{}", std::process::id()));
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot write to it: {e}")))
    }

    fn layout(root: &Path) -> io::Result<Store> {
        for sub in [
            "blobs/sha256",
            "manifests/sha256",
            "tags",
            "tmp",
            "quarantine",
            "origins/sha256",
        ] {
            fs::create_dir_all(root.join(sub)).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot write to it ({sub}): {e}"))
            })?;
        }
        Ok(Store {
            root: root.to_path_buf(),
            in_use: Mutex::default(),
            origins_lock: Mutex::default(),
            owner: Mutex::default(),
            room: room::Room::default(),
        })
    }

    /// Empties `tmp/`: downloads a crash interrupted (only the lock's
    /// holder may, so no running download is lost).
    fn clear_temp(&self) -> io::Result<()> {
        let mut removed = 0;
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let path = entry?.path();
            let r = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            if r.is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed interrupted downloads from the cache");
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        sharded(&self.root.join("blobs"), d)
    }

    pub(crate) fn manifest_path(&self, d: &Digest) -> PathBuf {
        sharded(&self.root.join("manifests"), d)
    }

    fn tag_path(&self, ns: &Namespace, repo: &Repository, tag: &str, class: Class) -> PathBuf {
        // All three are validated: no '/', '..' or '@' can come from them
        // except repository separators, and a repository component never
        // starts with '@', so tag files and repository folders cannot clash.
        // Clients that take every current manifest type share `@<tag>`;
        // others have `@<tag>~<class>` (a tag never holds '~').
        let name = if class == Class::ALL {
            format!("@{tag}")
        } else {
            format!("@{tag}~{:x}", class.bits())
        };
        self.root
            .join("tags")
            .join(ns.as_str())
            .join(repo.as_str())
            .join(name)
    }

    /// Marks `d` in use until the guard drops.
    pub fn hold(self: &Arc<Self>, d: &Digest) -> InUse {
        *self.in_use.lock().entry(d.clone()).or_insert(0) += 1;
        InUse {
            store: self.clone(),
            digest: d.clone(),
            _also: None,
        }
    }

    /// How many holds `d` has (readers and fetches).
    pub fn holders(&self, d: &Digest) -> usize {
        self.in_use.lock().get(d).copied().unwrap_or(0)
    }

    pub fn in_use(&self, d: &Digest) -> bool {
        self.in_use.lock().contains_key(d)
    }

    /// The cached blob, opened, with its length; records the access.
    pub fn open_blob(&self, d: &Digest) -> io::Result<Option<(File, u64)>> {
        let path = self.blob_path(d);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        touch(&file, &meta);
        Ok(Some((file, meta.len())))
    }

    /// The cached blob `d`, opened, with its length and origins; records
    /// the access. A file whose size is not the one it was committed with
    /// is damaged: it is moved to `quarantine/` and the blob counts as not
    /// cached (it is fetched again).
    pub fn cached_blob(&self, d: &Digest) -> io::Result<Option<CachedBlob>> {
        let Some((file, len)) = self.open_blob(d)? else {
            return Ok(None);
        };
        let record = self.record(d)?;
        if let Some(size) = record.size.filter(|&s| s != len) {
            self.quarantine_blob(d, &format!("{len} bytes, committed with {size}"));
            return Ok(None);
        }
        Ok(Some(CachedBlob {
            file,
            len,
            origins: record.origins,
        }))
    }

    /// Moves a damaged blob out of the store (into `quarantine/`), so it
    /// is never served again and is fetched anew.
    pub fn quarantine_blob(&self, d: &Digest, why: &str) {
        let dest = self
            .root
            .join("quarantine")
            .join(format!("blobs-{}", d.hex()));
        let len = fs::metadata(self.blob_path(d)).map_or(0, |m| m.len());
        match fs::rename(self.blob_path(d), &dest) {
            Ok(()) => {
                self.stored_changed(0, len);
                self.content_gone(d);
                crate::metrics::METRICS.quarantined.inc(&[]);
                tracing::warn!(digest = %d, why, moved_to = %dest.display(),
                    "damaged cache file quarantined; it will be fetched again");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "cannot quarantine a damaged cache file")
            }
        }
    }

    /// Creates a private temporary file for an ingest.
    pub fn temp_file(&self, purpose: &str) -> io::Result<(File, PathBuf)> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{purpose}.{}.{n}", std::process::id()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Moves a fully written, verified and synced temp file into place.
    pub fn commit_blob(&self, tmp: &Path, d: &Digest) -> io::Result<()> {
        crate::atomic::rename(tmp, &self.blob_path(d))
    }

    /// The cached manifest: media type and bytes, re-verified on read.
    pub fn manifest(&self, d: &Digest) -> io::Result<Option<(String, Bytes)>> {
        use std::io::Read;
        let mut file = match File::open(self.manifest_path(d)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Manifests are evicted least recently used, like blobs.
        touch(&file, &file.metadata()?);
        let mut raw = Vec::new();
        file.read_to_end(&mut raw)?;
        let Some(nl) = raw.iter().position(|&b| b == b'\n') else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "manifest file without media type",
            ));
        };
        let body = Bytes::copy_from_slice(&raw[nl + 1..]);
        if Digest::of(&body) != *d {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "cached manifest does not match its digest",
            ));
        }
        let media_type = String::from_utf8_lossy(&raw[..nl]).into_owned();
        Ok(Some((media_type, body)))
    }

    /// Stores a manifest already verified against `d`.
    pub fn put_manifest(&self, d: &Digest, media_type: &str, body: &[u8]) -> io::Result<()> {
        let path = self.manifest_path(d);
        if path.exists() {
            return Ok(());
        }
        let mut content = Vec::with_capacity(media_type.len() + 1 + body.len());
        content.extend_from_slice(media_type.as_bytes());
        content.push(b'\n');
        content.extend_from_slice(body);
        crate::atomic::write_via(&self.root.join("tmp"), &path, &content)?;
        self.stored_changed(content.len() as u64, 0);
        Ok(())
    }

    /// The digest `tag` pointed to for clients of `class`, and when that
    /// was last confirmed.
    pub fn tag(
        &self,
        ns: &Namespace,
        repo: &Repository,
        tag: &str,
        class: Class,
    ) -> io::Result<Option<(Digest, SystemTime)>> {
        let path = self.tag_path(ns, repo, tag, class);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let digest = text.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let confirmed = fs::metadata(&path)?.modified()?;
        Ok(Some((digest, confirmed)))
    }

    /// Records that `tag` points to `d` for clients of `class`, now.
    pub fn put_tag(
        &self,
        ns: &Namespace,
        repo: &Repository,
        tag: &str,
        class: Class,
        d: &Digest,
    ) -> io::Result<()> {
        let path = self.tag_path(ns, repo, tag, class);
        let was = fs::metadata(&path).map_or(0, |m| m.len());
        let text = format!("{d}\n");
        crate::atomic::write_via(&self.root.join("tmp"), &path, text.as_bytes())?;
        self.stored_changed(text.len() as u64, was);
        Ok(())
    }
}

/// How many entries a folder has (0 when unreadable).
#[cfg(test)]
pub(crate) fn read_dir_len(dir: &Path) -> usize {
    fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Records an access as the file's mtime, at most once per granularity.
fn touch(file: &File, meta: &fs::Metadata) {
    let now = SystemTime::now();
    let stale = meta
        .modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .is_none_or(|age| age > TOUCH_GRANULARITY);
    if stale {
        let _ = file.set_modified(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_and_tags_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let body = br#"{"schemaVersion":2}"#;
        let d = Digest::of(body);
        assert!(store.manifest(&d).unwrap().is_none());
        store.put_manifest(&d, "application/x-test", body).unwrap();
        let (mt, got) = store.manifest(&d).unwrap().unwrap();
        assert_eq!(
            (mt.as_str(), got.as_ref()),
            ("application/x-test", &body[..])
        );

        let ns: Namespace = "reg.test:5000".parse().unwrap();
        let repo: Repository = "a/b".parse().unwrap();
        let all = Class::ALL;
        assert!(store.tag(&ns, &repo, "v1", all).unwrap().is_none());
        store.put_tag(&ns, &repo, "v1", all, &d).unwrap();
        assert_eq!(store.tag(&ns, &repo, "v1", all).unwrap().unwrap().0, d);
        // A repository nested under another does not clash with its tags.
        let nested: Repository = "a/b/v1".parse().unwrap();
        store.put_tag(&ns, &nested, "x", all, &d).unwrap();
        assert_eq!(store.tag(&ns, &repo, "v1", all).unwrap().unwrap().0, d);
        // Another class of client has its own record.
        let narrow = crate::oci::Accept::from_headers(&{
            let mut h = http::HeaderMap::new();
            h.insert(
                http::header::ACCEPT,
                http::HeaderValue::from_static(crate::oci::media::DOCKER_MANIFEST),
            );
            h
        })
        .class();
        assert!(store.tag(&ns, &repo, "v1", narrow).unwrap().is_none());
    }

    #[test]
    fn a_corrupted_manifest_is_an_error_not_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"{}");
        store.put_manifest(&d, "t", b"{}").unwrap();
        fs::write(store.manifest_path(&d), b"t\n{ }").unwrap();
        assert!(store.manifest(&d).is_err());
    }

    #[test]
    fn open_clears_interrupted_ingests() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_f, tmp) = store.temp_file("blob").unwrap();
        assert!(tmp.exists());
        store.release();
        drop(store);
        Store::open(dir.path()).unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn one_daemon_holds_the_cache_and_tools_leave_its_downloads_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_f, tmp) = store.temp_file("blob").unwrap();
        // A second daemon is refused.
        let e = Store::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("another nodemirror daemon"), "{e}");
        // A tool sees the daemon and keeps its download.
        let (_tool, daemon) = Store::open_beside(dir.path()).unwrap();
        assert!(daemon);
        assert!(tmp.exists());
        store.release();
        let (_tool, daemon) = Store::open_beside(dir.path()).unwrap();
        assert!(!daemon);
        assert!(tmp.exists(), "tools never empty tmp/");
    }

    #[test]
    fn in_use_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"x");
        let a = store.hold(&d);
        let b = store.hold(&d);
        drop(a);
        assert!(store.in_use(&d));
        drop(b);
        assert!(!store.in_use(&d));
    }
}
