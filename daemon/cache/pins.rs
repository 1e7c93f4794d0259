//! Pins: images whose manifests, blobs and tag records the collector never
//! evicts (`nodemirror pin add|rm|ls`).
//!
//! A pin is a file in `pins/` holding one image reference
//! (`registry/repository:tag` or `@digest`), named by the SHA-256 of that
//! text, so pinning twice is one pin. What a pin keeps is worked out anew
//! at every collection from what the cache holds then: a tag pin keeps the
//! tag's records and whatever manifest each of them points to now, so it
//! follows the tag when a revalidation moves it; a manifest keeps, for an
//! index, every manifest it lists (all platforms), and for an image, its
//! config and layers. Nothing here fetches: content missing from the cache
//! is simply not there to keep (`pin add` pulls the image first).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::Store;
use crate::reference::{Digest, ImageRef, Reference};

/// What the pins keep, as the cache is now.
#[derive(Debug, Default)]
pub struct Pinned {
    /// Manifests and blobs.
    pub digests: HashSet<Digest>,
    /// Tag records of pinned tags.
    pub tag_files: HashSet<PathBuf>,
}

impl Pinned {
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty() && self.tag_files.is_empty()
    }
}

/// One pin as `pin ls` shows it.
#[derive(Debug)]
pub struct PinStatus {
    pub image: ImageRef,
    /// Manifests the pin resolves to now (a tag's, per client class).
    pub roots: Vec<Digest>,
    /// Manifests and blobs found in the cache, and their bytes.
    pub cached: u64,
    pub cached_bytes: u64,
    /// Manifests and blobs named but not in the cache.
    pub missing: u64,
}

/// The pin's text: `registry/repository:tag` or `registry/repository@digest`.
fn canonical(image: &ImageRef) -> String {
    image.to_string()
}

/// The digests a manifest names: an index's manifests, an image's config
/// and layers.
fn children(body: &[u8]) -> Vec<Digest> {
    let Ok(m) = serde_json::from_slice::<crate::oci::media::Contents>(body) else {
        return Vec::new();
    };
    m.all().filter_map(|d| d.digest.parse().ok()).collect()
}

impl Store {
    fn pins_dir(&self) -> PathBuf {
        self.root.join("pins")
    }

    fn pin_path(&self, image: &ImageRef) -> PathBuf {
        let name = hex::encode(Sha256::digest(canonical(image).as_bytes()));
        self.pins_dir().join(name)
    }

    /// Pins `image`; false when it was pinned already.
    pub fn add_pin(&self, image: &ImageRef) -> io::Result<bool> {
        let path = self.pin_path(image);
        if path.exists() {
            return Ok(false);
        }
        let dir = self.pins_dir();
        fs::create_dir_all(&dir)?;
        // The temporary file is in pins/ itself (a dot file, skipped by
        // [`Store::pins`]): a tool beside the daemon never writes in tmp/.
        crate::atomic::write_via(&dir, &path, format!("{}\n", canonical(image)).as_bytes())?;
        Ok(true)
    }

    /// Unpins `image`; false when it was not pinned.
    pub fn remove_pin(&self, image: &ImageRef) -> io::Result<bool> {
        match fs::remove_file(self.pin_path(image)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every pin; a file that is not one is logged and left out.
    pub fn pins(&self) -> io::Result<Vec<ImageRef>> {
        let entries = match fs::read_dir(self.pins_dir()) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut pins = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'))
            {
                continue;
            }
            match read_pin(&path) {
                Ok(image) => pins.push(image),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "not a pin; ignored")
                }
            }
        }
        pins.sort_by_key(canonical);
        Ok(pins)
    }

    /// The manifests `image` resolves to now, and the tag records that
    /// say so.
    fn roots(&self, image: &ImageRef) -> (Vec<Digest>, Vec<PathBuf>) {
        match &image.reference {
            Reference::Digest(d) => (vec![d.clone()], Vec::new()),
            Reference::Tag(tag) => {
                let dir = self
                    .root
                    .join("tags")
                    .join(image.namespace.as_str())
                    .join(image.repository.as_str());
                let (plain, classed) = (format!("@{tag}"), format!("@{tag}~"));
                let mut roots = Vec::new();
                let mut files = Vec::new();
                for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if name != plain && !name.starts_with(&classed) {
                        continue;
                    }
                    let path = entry.path();
                    if let Some(d) = fs::read_to_string(&path)
                        .ok()
                        .and_then(|t| t.trim().parse::<Digest>().ok())
                    {
                        if !roots.contains(&d) {
                            roots.push(d);
                        }
                    }
                    files.push(path);
                }
                (roots, files)
            }
        }
    }

    /// Calls `f` with every manifest and blob under `roots` (once each),
    /// and whether the cache holds it, with its size.
    fn each_pinned(&self, roots: &[Digest], f: &mut dyn FnMut(&Digest, Option<u64>)) {
        let mut seen = HashSet::new();
        let mut queue: Vec<Digest> = roots.to_vec();
        while let Some(d) = queue.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            // A manifest file, read without refreshing its last use.
            let manifest = fs::read(self.manifest_path(&d)).ok();
            if let Some(raw) = &manifest {
                f(&d, Some(raw.len() as u64));
                if let Some(nl) = raw.iter().position(|&b| b == b'\n') {
                    queue.extend(children(&raw[nl + 1..]));
                }
                continue;
            }
            f(&d, fs::metadata(self.blob_path(&d)).ok().map(|m| m.len()));
        }
    }

    /// What the pins keep from eviction, as the cache is now.
    pub fn pinned(&self) -> io::Result<Pinned> {
        let mut pinned = Pinned::default();
        for image in self.pins()? {
            let (roots, files) = self.roots(&image);
            pinned.tag_files.extend(files);
            self.each_pinned(&roots, &mut |d, _| {
                pinned.digests.insert(d.clone());
            });
        }
        Ok(pinned)
    }

    /// Every pin with what it resolves to and how much of it is cached.
    pub fn pin_status(&self) -> io::Result<Vec<PinStatus>> {
        let mut out = Vec::new();
        for image in self.pins()? {
            let (roots, _) = self.roots(&image);
            let (mut cached, mut cached_bytes, mut missing) = (0, 0, 0);
            self.each_pinned(&roots, &mut |_, size| match size {
                Some(s) => {
                    cached += 1;
                    cached_bytes += s;
                }
                None => missing += 1,
            });
            out.push(PinStatus {
                image,
                roots,
                cached,
                cached_bytes,
                missing,
            });
        }
        Ok(out)
    }
}

fn read_pin(path: &Path) -> io::Result<ImageRef> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.len() > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a small regular file",
        ));
    }
    fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|e: crate::reference::ParseError| {
            io::Error::new(io::ErrorKind::InvalidData, e.to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(store: &Store, body: &str) -> Digest {
        let d = Digest::of(body.as_bytes());
        store
            .put_manifest(
                &d,
                "application/vnd.oci.image.manifest.v1+json",
                body.as_bytes(),
            )
            .unwrap();
        d
    }

    fn blob(store: &Store, body: &[u8]) -> Digest {
        let d = Digest::of(body);
        let path = store.blob_path(&d);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
        d
    }

    fn image(store: &Store, layer: &[u8]) -> (Digest, Digest, Digest) {
        let (config, layer) = (blob(store, b"{}"), blob(store, layer));
        let m = manifest(
            store,
            &format!(
                r#"{{"schemaVersion":2,"config":{{"digest":"{config}"}},"layers":[{{"digest":"{layer}"}}]}}"#
            ),
        );
        (m, config, layer)
    }

    /// A tag pin keeps the tag's records, an index, every platform's
    /// manifest and their blobs; when the tag moves, the pin follows it.
    #[test]
    fn a_tag_pin_keeps_its_image_and_follows_the_tag() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_beside(dir.path()).unwrap();
        let (amd, amd_config, amd_layer) = image(&store, b"amd64 layer");
        let (arm, _, arm_layer) = image(&store, b"arm64 layer");
        let index = manifest(
            &store,
            &format!(
                r#"{{"schemaVersion":2,"manifests":[{{"digest":"{amd}"}},{{"digest":"{arm}"}}]}}"#
            ),
        );
        let (other, _, other_layer) = image(&store, b"another image");
        let ns = "reg.test".parse().unwrap();
        let repo = "app".parse().unwrap();
        store
            .put_tag(&ns, &repo, "v1", crate::oci::accept::Class::ALL, &index)
            .unwrap();
        let pin: ImageRef = "reg.test/app:v1".parse().unwrap();
        assert!(store.add_pin(&pin).unwrap());
        assert!(!store.add_pin(&pin).unwrap(), "pinned once");
        let pinned = store.pinned().unwrap();
        for d in [&index, &amd, &arm, &amd_config, &amd_layer, &arm_layer] {
            assert!(pinned.digests.contains(d), "{d} is kept");
        }
        assert!(!pinned.digests.contains(&other_layer));
        assert_eq!(pinned.tag_files.len(), 1);
        // The tag moves (a revalidation found a new digest).
        store
            .put_tag(&ns, &repo, "v1", crate::oci::accept::Class::ALL, &other)
            .unwrap();
        let pinned = store.pinned().unwrap();
        assert!(pinned.digests.contains(&other_layer));
        assert!(!pinned.digests.contains(&amd_layer));
        let status = store.pin_status().unwrap();
        assert_eq!(status.len(), 1);
        assert_eq!((status[0].cached, status[0].missing), (3, 0));
        assert!(store.remove_pin(&pin).unwrap());
        assert!(store.pinned().unwrap().is_empty());
    }

    /// A collection down to nothing evicts everything but what the pins
    /// keep, and says how much that is.
    #[test]
    fn collection_never_evicts_what_a_pin_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_beside(dir.path()).unwrap();
        let (kept, kept_config, kept_layer) = image(&store, &[7u8; 10_000]);
        let (gone, _, gone_layer) = image(&store, &[8u8; 10_000]);
        let ns = "reg.test".parse().unwrap();
        let repo = "app".parse().unwrap();
        let all = crate::oci::accept::Class::ALL;
        store.put_tag(&ns, &repo, "v1", all, &kept).unwrap();
        store.put_tag(&ns, &repo, "v2", all, &gone).unwrap();
        store.add_pin(&"reg.test/app:v1".parse().unwrap()).unwrap();
        let limits = super::super::Limits {
            max_size: Some(0),
            min_free: 0,
        };
        let r = store.collect(limits).unwrap();
        assert_eq!(
            r.pinned, 4,
            "a tag, a manifest, a config and a layer: {r:?}"
        );
        for d in [&kept_config, &kept_layer] {
            assert!(store.blob_path(d).exists(), "{d} kept");
        }
        assert!(store.manifest(&kept).unwrap().is_some());
        assert!(store.tag(&ns, &repo, "v1", all).unwrap().is_some());
        assert!(!store.blob_path(&gone_layer).exists());
        assert!(store.manifest(&gone).unwrap().is_none());
        assert!(store.tag(&ns, &repo, "v2", all).unwrap().is_none());
    }

    /// A digest pin needs no tag; content missing from the cache is
    /// counted as missing; a file in pins/ that is not a pin is ignored.
    #[test]
    fn a_digest_pin_and_a_stray_file() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open_beside(dir.path()).unwrap();
        let (m, _, layer) = image(&store, b"layer");
        fs::remove_file(store.blob_path(&layer)).unwrap();
        let pin: ImageRef = format!("reg.test/app@{m}").parse().unwrap();
        store.add_pin(&pin).unwrap();
        fs::write(store.pins_dir().join("stray"), "NOT A REFERENCE").unwrap();
        let status = store.pin_status().unwrap();
        assert_eq!(status.len(), 1);
        assert_eq!((status[0].cached, status[0].missing), (2, 1));
        assert!(store.pinned().unwrap().digests.contains(&layer));
    }
}
