//! What the cache knows of each digest beyond its bytes: the namespaces
//! it was verified through (its origins) and, for a blob, the size it
//! was committed with. Kept on disk beside the content, so it survives
//! restarts.
//!
//! `origins/sha256/<2 hex>/<64 hex>` holds `size N` (a blob's) and one
//! namespace per line. A record is written before the content it
//! describes is renamed into `blobs/` or `manifests/`, so content in the
//! store always has its record; content cached by a version that kept
//! none has no origins and is served to nobody until a namespace confirms
//! it (see `mirror`), and no size to check. Whether an origin is public is
//! decided when the content is asked for, from the configuration in force.

use std::io;

use super::{sharded, Store};
use crate::reference::{Digest, Namespace};

/// Origins kept per digest at most: past it, new ones are not recorded
/// (a request under such a namespace is then confirmed with its
/// upstream each time).
const MAX_ORIGINS: usize = 64;

/// What is known of one digest.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Record {
    pub origins: Vec<Namespace>,
    /// A blob's size when it was committed.
    pub size: Option<u64>,
}

impl Record {
    fn parse(text: &str) -> Record {
        let mut r = Record::default();
        for line in text.lines().map(str::trim) {
            if let Some(n) = line.strip_prefix("size ") {
                r.size = n.trim().parse().ok();
            } else if let Ok(ns) = line.parse() {
                // A line that does not parse (a hand edit) names nothing.
                r.origins.push(ns);
            }
        }
        r
    }

    fn text(&self) -> String {
        let mut text = String::new();
        if let Some(n) = self.size {
            text.push_str(&format!("size {n}\n"));
        }
        for ns in &self.origins {
            text.push_str(ns.as_str());
            text.push('\n');
        }
        text
    }
}

impl Store {
    pub(crate) fn origins_path(&self, d: &Digest) -> std::path::PathBuf {
        sharded(&self.root.join("origins"), d)
    }

    /// What is known of `d` (nothing when there is no record).
    pub fn record(&self, d: &Digest) -> io::Result<Record> {
        match std::fs::read_to_string(self.origins_path(d)) {
            Ok(t) => Ok(Record::parse(&t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(e),
        }
    }

    /// The namespaces `d` was verified through; empty when none is known.
    pub fn origins(&self, d: &Digest) -> io::Result<Vec<Namespace>> {
        Ok(self.record(d)?.origins)
    }

    /// Records that `d` was verified through `ns`.
    pub fn add_origin(&self, d: &Digest, ns: &Namespace) -> io::Result<()> {
        self.note(d, Some(ns), None)
    }

    /// Records that `d` was verified through `ns` (when given) and, for a
    /// blob, its size.
    pub fn note(&self, d: &Digest, ns: Option<&Namespace>, size: Option<u64>) -> io::Result<()> {
        let _one_writer = self.origins_lock.lock();
        let mut r = self.record(d)?;
        let before = r.clone();
        if let Some(ns) = ns.filter(|ns| !r.origins.contains(ns)) {
            if r.origins.len() < MAX_ORIGINS {
                r.origins.push(ns.clone());
            } else {
                tracing::debug!(digest = %d, namespace = %ns, "origins full; not recorded");
            }
        }
        if size.is_some() {
            r.size = size;
        }
        if r == before {
            return Ok(());
        }
        crate::atomic::write_via(
            &self.root.join("tmp"),
            &self.origins_path(d),
            r.text().as_bytes(),
        )
    }

    /// Forgets where `d` came from (its content left the store).
    pub fn remove_origins(&self, d: &Digest) {
        let _one_writer = self.origins_lock.lock();
        let _ = std::fs::remove_file(self.origins_path(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_recorded_once_each_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Digest::of(b"x");
        assert!(store.origins(&d).unwrap().is_empty());
        let (a, b): (Namespace, Namespace) =
            ("a.test".parse().unwrap(), "b.test:5000".parse().unwrap());
        store.add_origin(&d, &a).unwrap();
        store.add_origin(&d, &b).unwrap();
        store.add_origin(&d, &a).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.origins(&d).unwrap(), vec![a.clone(), b]);
        store.remove_origins(&d);
        assert!(store.origins(&d).unwrap().is_empty());
        // Bounded.
        for i in 0..100 {
            let n: Namespace = format!("n{i}.test").parse().unwrap();
            store.add_origin(&d, &n).unwrap();
        }
        assert_eq!(store.origins(&d).unwrap().len(), MAX_ORIGINS);
        // The size beside them.
        store.note(&d, None, Some(1234)).unwrap();
        let r = store.record(&d).unwrap();
        assert_eq!((r.size, r.origins.len()), (Some(1234), MAX_ORIGINS));
    }
}
