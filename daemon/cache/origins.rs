//! Where cached content came from: the namespaces each digest (blob or
//! manifest) was verified through, kept on disk beside the content so
//! that it survives restarts.
//!
//! `origins/sha256/<2 hex>/<64 hex>` holds one namespace per line. A
//! record is written before the content it describes is renamed into
//! `blobs/` or `manifests/`, so content in the store always has its
//! record; content cached by a version that kept none has no origins and
//! is served to nobody until a namespace confirms it (see `mirror`).
//! Whether an origin is public is decided when the content is asked for,
//! from the configuration in force.

use std::io;

use super::{sharded, Store};
use crate::reference::{Digest, Namespace};

/// Origins kept per digest at most: past it, new ones are not recorded
/// (a request under such a namespace is then confirmed with its
/// upstream each time).
const MAX_ORIGINS: usize = 64;

impl Store {
    fn origins_path(&self, d: &Digest) -> std::path::PathBuf {
        sharded(&self.root.join("origins"), d)
    }

    /// The namespaces `d` was verified through; empty when none is known.
    pub fn origins(&self, d: &Digest) -> io::Result<Vec<Namespace>> {
        let text = match std::fs::read_to_string(self.origins_path(d)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // A line that does not parse (a hand edit) names nothing.
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Records that `d` was verified through `ns`.
    pub fn add_origin(&self, d: &Digest, ns: &Namespace) -> io::Result<()> {
        let _one_writer = self.origins_lock.lock();
        let mut known = self.origins(d)?;
        if known.contains(ns) {
            return Ok(());
        }
        if known.len() >= MAX_ORIGINS {
            tracing::debug!(digest = %d, namespace = %ns, "origins full; not recorded");
            return Ok(());
        }
        known.push(ns.clone());
        let mut text = String::new();
        for n in &known {
            text.push_str(n.as_str());
            text.push('\n');
        }
        crate::atomic::write_via(
            &self.root.join("tmp"),
            &self.origins_path(d),
            text.as_bytes(),
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
    }
}
