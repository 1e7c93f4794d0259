//! `nodemirror cache import`: images from an OCI image layout (a folder,
//! or a tar as `skopeo copy ... oci-archive:` and `docker save` since
//! Docker 25 write it) or a `docker save` archive of the classic format,
//! into the cache, so that a node without a network pulls them by tag.
//!
//! Nothing is believed: every file is hashed as it is read and must match
//! the digest it is named by (OCI layout) or is recorded under (docker
//! save); manifests match their descriptors' digests and sizes. Files are
//! staged in the cache's `tmp/` (each with its room reserved) and only
//! when the whole archive was read and every image it holds checks out
//! are they moved into place: blobs, then manifests (an index with every
//! platform manifest it names that the archive holds), then the tags. A
//! failed or interrupted import leaves nothing behind.
//!
//! Each image is recorded under the registry named by its `--as`, as if
//! it had been pulled through that namespace (its origin: private
//! namespaces keep their content to themselves), and its tag for every
//! client that takes its media type.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::room::{NoRoom, Reservation};
use super::{InUse, Store};
use crate::oci::accept::Class;
use crate::oci::media;
use crate::reference::{Digest, ImageRef, Namespace, Reference};

/// Files up to this size are kept in memory until the end ...
const SMALL: u64 = 1 << 20;
/// ... up to this much in all; beyond, they are staged on disk too.
const MEMORY: u64 = 64 << 20;
/// `index.json` and `manifest.json` at most.
const MAX_INDEX: u64 = 16 << 20;
/// Index nesting followed at most.
const MAX_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    NoRoom(#[from] NoRoom),
}

fn invalid(why: impl Into<String>) -> ImportError {
    ImportError::Invalid(why.into())
}

/// What an import did.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Imported {
    /// `registry/repository:tag@digest` of each image.
    pub images: Vec<String>,
    pub manifests: usize,
    pub blobs_added: usize,
    pub blobs_present: usize,
    pub bytes_added: u64,
    /// Platform manifests an index names that the archive lacks (it was
    /// exported for some platforms only): the index is kept whole, those
    /// platforms are not pullable offline.
    pub missing: Vec<String>,
}

enum Held {
    Memory(Bytes),
    Temp {
        path: PathBuf,
        reservation: Option<Reservation>,
    },
}

struct Staged {
    size: u64,
    held: Held,
}

/// One image the archive names at its top level.
struct Root {
    digest: Digest,
    media_type: Option<String>,
    body: Bytes,
    /// What the archive calls it (annotations, RepoTags), for messages.
    name: String,
}

/// An import under way: feed it the archive's files with [`Import::add`],
/// then [`Import::finish`].
pub struct Import {
    store: Arc<Store>,
    targets: Vec<ImageRef>,
    staged: HashMap<Digest, Staged>,
    /// Archive path to the digest of its content (docker save names
    /// files by id, not by digest).
    by_path: HashMap<String, Digest>,
    index_json: Option<Bytes>,
    manifest_json: Option<Bytes>,
    memory: u64,
    /// Paths written into the cache, for [`Import::finish`]'s caller.
    created: Vec<PathBuf>,
    holds: Vec<InUse>,
    /// Blobs moved into place (or found there) by this import.
    done: std::collections::HashSet<Digest>,
    report: Imported,
}

impl Drop for Import {
    fn drop(&mut self) {
        for s in self.staged.values() {
            if let Held::Temp { path, .. } = &s.held {
                let _ = fs::remove_file(path);
            }
        }
    }
}

impl Import {
    pub fn new(store: Arc<Store>, targets: Vec<ImageRef>) -> Result<Import, ImportError> {
        if targets.is_empty() {
            return Err(invalid(
                "name the images with --as REGISTRY/REPOSITORY[:TAG], one per image in the archive",
            ));
        }
        Ok(Import {
            store,
            targets,
            staged: HashMap::new(),
            by_path: HashMap::new(),
            index_json: None,
            manifest_json: None,
            memory: 0,
            created: Vec::new(),
            holds: Vec::new(),
            done: Default::default(),
            report: Imported::default(),
        })
    }

    /// Takes one file of the archive: `path` relative to the layout's
    /// root, `size` bytes read from `r`.
    pub fn add(&mut self, path: &str, size: u64, r: &mut dyn Read) -> Result<(), ImportError> {
        let path = path.trim_start_matches("./");
        match path {
            "index.json" => self.index_json = Some(read_small(path, size, r)?),
            "manifest.json" => self.manifest_json = Some(read_small(path, size, r)?),
            _ if path.starts_with("blobs/") => {
                let rest = &path["blobs/".len()..];
                let expected = match rest.split_once('/') {
                    Some(("sha256", hex)) => format!("sha256:{hex}")
                        .parse::<Digest>()
                        .map_err(|_| invalid(format!("{path}: not a sha256 digest")))?,
                    _ => return Err(invalid(format!("{path}: only sha256 content is supported"))),
                };
                self.stage(path, size, r, Some(expected))?;
            }
            // docker save (classic): configs `<hex>.json`, layers
            // `<id>/layer.tar` (or `<hex>.tar`, as skopeo writes them).
            _ if path.ends_with(".json") || path.ends_with(".tar") => {
                self.stage(path, size, r, None)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn stage(
        &mut self,
        path: &str,
        size: u64,
        r: &mut dyn Read,
        expected: Option<Digest>,
    ) -> Result<(), ImportError> {
        if let Some(d) = expected.as_ref().filter(|d| self.staged.contains_key(*d)) {
            self.by_path.insert(path.to_string(), d.clone());
            return Ok(());
        }
        // A blob the cache holds (verified when it came) is not written
        // again; its bytes here are not needed.
        if let Some(d) = &expected {
            if fs::metadata(self.store.blob_path(d)).is_ok_and(|m| m.len() == size) {
                return Ok(());
            }
        }
        let mut hasher = Sha256::new();
        let held = if size <= SMALL && self.memory + size <= MEMORY {
            let body = read_exact(path, size, r)?;
            hasher.update(&body);
            self.memory += size;
            Held::Memory(body)
        } else {
            let reservation = self.store.reserve(size)?;
            let (mut file, tmp) = self.store.temp_file("import")?;
            let staged = Held::Temp {
                path: tmp.clone(),
                reservation: Some(reservation),
            };
            let copied = copy_hashing(r, &mut file, &mut hasher).and_then(|n| {
                file.sync_all()?;
                Ok(n)
            });
            match copied {
                Ok(n) if n == size => staged,
                Ok(n) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(invalid(format!("{path}: {n} bytes, {size} announced")));
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(e.into());
                }
            }
        };
        let got = Digest::from_hasher(hasher);
        if let Some(want) = expected.filter(|w| *w != got) {
            if let Held::Temp { path: tmp, .. } = &held {
                let _ = fs::remove_file(tmp);
            }
            return Err(invalid(format!(
                "{path}: the content's digest is {got}, not the {want} it is named by"
            )));
        }
        self.by_path.insert(path.to_string(), got.clone());
        if let Some(old) = self.staged.insert(got, Staged { size, held }) {
            if let Held::Temp { path, .. } = old.held {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Bytes of a staged file, or of content already in the cache.
    fn bytes_of(&self, d: &Digest) -> Result<Option<Bytes>, ImportError> {
        match self.staged.get(d).map(|s| &s.held) {
            Some(Held::Memory(b)) => Ok(Some(b.clone())),
            Some(Held::Temp { path, .. }) => Ok(Some(fs::read(path)?.into())),
            None => Ok(self.store.manifest(d)?.map(|(_, b)| b)),
        }
    }

    /// Checks every image the archive holds and moves it into the cache.
    /// Returns what was done and the paths written.
    pub fn finish(mut self) -> Result<(Imported, Vec<PathBuf>), ImportError> {
        let roots = self.roots()?;
        if roots.len() != self.targets.len() {
            let names: Vec<_> = roots.iter().map(|r| r.name.as_str()).collect();
            return Err(invalid(format!(
                "the archive holds {} image(s) ({}) and {} --as were given: name each, in this order",
                roots.len(),
                names.join(", "),
                self.targets.len()
            )));
        }
        // Every image is checked before anything is moved into place.
        let targets = std::mem::take(&mut self.targets);
        for (root, target) in roots.iter().zip(&targets) {
            if let Reference::Digest(d) = &target.reference {
                if *d != root.digest {
                    return Err(invalid(format!(
                        "{target}: the archive's image {} is {}",
                        root.name, root.digest
                    )));
                }
            }
            self.check_tree(&root.digest, root.media_type.as_deref(), &root.body, 0)?;
        }
        for (root, target) in roots.iter().zip(&targets) {
            let media_type = self.commit_tree(
                &root.digest,
                root.media_type.as_deref(),
                &root.body,
                &target.namespace,
                0,
            )?;
            let shown = match &target.reference {
                Reference::Tag(t) => {
                    for class in Class::admitting(&media_type) {
                        self.store.put_tag(
                            &target.namespace,
                            &target.repository,
                            t,
                            class,
                            &root.digest,
                        )?;
                        self.created.push(self.store.tag_path(
                            &target.namespace,
                            &target.repository,
                            t,
                            class,
                        ));
                    }
                    format!(
                        "{}/{}:{t}@{}",
                        target.namespace, target.repository, root.digest
                    )
                }
                Reference::Digest(d) => {
                    format!("{}/{}@{d}", target.namespace, target.repository)
                }
            };
            self.report.images.push(shown);
        }
        let report = std::mem::take(&mut self.report);
        Ok((report, std::mem::take(&mut self.created)))
    }

    /// The images at the archive's top level.
    fn roots(&self) -> Result<Vec<Root>, ImportError> {
        if let Some(index) = &self.index_json {
            let v: serde_json::Value =
                serde_json::from_slice(index).map_err(|e| invalid(format!("index.json: {e}")))?;
            let descs = v["manifests"]
                .as_array()
                .ok_or_else(|| invalid("index.json: no `manifests` list"))?;
            let mut roots = Vec::new();
            for desc in descs {
                let (digest, media_type, size) = descriptor(desc, "index.json")?;
                let body = self.bytes_of(&digest)?.ok_or_else(|| {
                    invalid(format!(
                        "index.json names {digest}, which the archive does not hold"
                    ))
                })?;
                if size.is_some_and(|s| s != body.len() as u64) {
                    return Err(invalid(format!(
                        "index.json: {digest} is {} bytes, not {}",
                        body.len(),
                        size.unwrap_or_default()
                    )));
                }
                let ann = &desc["annotations"];
                let name = ann["io.containerd.image.name"]
                    .as_str()
                    .or(ann["org.opencontainers.image.ref.name"].as_str())
                    .unwrap_or("unnamed")
                    .to_string();
                roots.push(Root {
                    digest,
                    media_type,
                    body,
                    name,
                });
            }
            return Ok(roots);
        }
        if let Some(m) = &self.manifest_json {
            return self.docker_roots(m);
        }
        Err(invalid(
            "neither an OCI image layout (no index.json) nor a docker save archive (no manifest.json)",
        ))
    }

    /// docker save's classic `manifest.json`: each image's config and
    /// layers by path; its manifest is made here, as OCI, with the layers
    /// as they are in the archive (so its digest is not a registry's).
    fn docker_roots(&self, m: &[u8]) -> Result<Vec<Root>, ImportError> {
        let items: Vec<serde_json::Value> =
            serde_json::from_slice(m).map_err(|e| invalid(format!("manifest.json: {e}")))?;
        let mut roots = Vec::new();
        for item in &items {
            let file = |path: &str| -> Result<(Digest, u64), ImportError> {
                let d = self
                    .by_path
                    .get(path.trim_start_matches("./"))
                    .ok_or_else(|| {
                        invalid(format!(
                            "manifest.json names {path}, which the archive does not hold"
                        ))
                    })?;
                Ok((d.clone(), self.staged[d].size))
            };
            let config_path = item["Config"]
                .as_str()
                .ok_or_else(|| invalid("manifest.json: an image without `Config`"))?;
            let (config, config_size) = file(config_path)?;
            let mut layers = Vec::new();
            for l in item["Layers"].as_array().into_iter().flatten() {
                let path = l
                    .as_str()
                    .ok_or_else(|| invalid("manifest.json: a layer that is not a path"))?;
                let (d, size) = file(path)?;
                layers.push(serde_json::json!({
                    "mediaType": self.layer_type(&d)?,
                    "digest": d.to_string(),
                    "size": size,
                }));
            }
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": media::OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config.to_string(),
                    "size": config_size,
                },
                "layers": layers,
            });
            let body = Bytes::from(manifest.to_string());
            let name = item["RepoTags"][0]
                .as_str()
                .unwrap_or("unnamed")
                .to_string();
            roots.push(Root {
                digest: Digest::of(&body),
                media_type: Some(media::OCI_MANIFEST.into()),
                body,
                name,
            });
        }
        Ok(roots)
    }

    /// A docker save layer's type, by its first bytes.
    fn layer_type(&self, d: &Digest) -> Result<&'static str, ImportError> {
        let mut head = [0u8; 4];
        let n = match &self.staged[d].held {
            Held::Memory(b) => {
                let n = b.len().min(4);
                head[..n].copy_from_slice(&b[..n]);
                n
            }
            Held::Temp { path, .. } => File::open(path)?.read(&mut head)?,
        };
        Ok(match &head[..n] {
            [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
            [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
            _ => "application/vnd.oci.image.layer.v1.tar",
        })
    }

    /// Checks a manifest and what it names before anything is committed:
    /// an image's config and layers must be in the archive or the cache;
    /// an index's platform manifests are checked where the archive holds
    /// them.
    fn check_tree(
        &mut self,
        digest: &Digest,
        declared: Option<&str>,
        body: &Bytes,
        depth: usize,
    ) -> Result<(), ImportError> {
        let (_, contents) = parse_manifest(digest, declared, body, depth)?;
        for child in &contents.manifests {
            let d = parse_digest(&child.digest, digest)?;
            if let Some(b) = self.bytes_of(&d)? {
                self.check_tree(&d, None, &b, depth + 1)?;
            }
        }
        for blob in contents.config.iter().chain(&contents.layers) {
            let d = parse_digest(&blob.digest, digest)?;
            if !self.staged.contains_key(&d) && !self.store.blob_path(&d).exists() {
                return Err(invalid(format!(
                    "image {digest} needs {d}, which is neither in the archive nor in the cache"
                )));
            }
        }
        Ok(())
    }

    /// Moves a checked manifest and what it names into the cache under
    /// `ns`; its media type comes back.
    fn commit_tree(
        &mut self,
        digest: &Digest,
        declared: Option<&str>,
        body: &Bytes,
        ns: &Namespace,
        depth: usize,
    ) -> Result<String, ImportError> {
        let (media_type, contents) = parse_manifest(digest, declared, body, depth)?;
        for child in &contents.manifests {
            let d = parse_digest(&child.digest, digest)?;
            match self.bytes_of(&d)? {
                Some(b) => {
                    self.commit_tree(&d, None, &b, ns, depth + 1)?;
                }
                None => self.report.missing.push(d.to_string()),
            }
        }
        for blob in contents.config.iter().chain(&contents.layers) {
            let d = parse_digest(&blob.digest, digest)?;
            self.commit_blob(&d, ns)?;
        }
        self.store.add_origin(digest, ns)?;
        self.store.put_manifest(digest, &media_type, body)?;
        self.created.push(self.store.origins_path(digest));
        self.created.push(self.store.manifest_path(digest));
        self.report.manifests += 1;
        Ok(media_type)
    }

    fn commit_blob(&mut self, d: &Digest, ns: &Namespace) -> Result<(), ImportError> {
        if !self.done.insert(d.clone()) {
            return Ok(self.store.add_origin(d, ns)?);
        }
        self.holds.push(self.store.hold(d));
        let path = self.store.blob_path(d);
        self.created.push(self.store.origins_path(d));
        if path.exists() {
            self.store.add_origin(d, ns)?;
            self.report.blobs_present += 1;
            if let Some(Held::Temp { path, .. }) = self.staged.remove(d).map(|s| s.held) {
                let _ = fs::remove_file(path);
            }
            return Ok(());
        }
        let Some(staged) = self.staged.remove(d) else {
            return Err(invalid(format!(
                "{d} is neither in the archive nor in the cache"
            )));
        };
        self.store.note(d, Some(ns), Some(staged.size))?;
        match staged.held {
            Held::Memory(bytes) => {
                let reservation = self.store.reserve(staged.size)?;
                crate::atomic::write_via(&self.store.root().join("tmp"), &path, &bytes)?;
                reservation.commit(staged.size);
            }
            Held::Temp {
                path: tmp,
                mut reservation,
            } => {
                self.store.commit_blob(&tmp, d)?;
                if let Some(r) = reservation.take() {
                    r.commit(staged.size);
                }
            }
        }
        self.created.push(path);
        self.report.blobs_added += 1;
        self.report.bytes_added += staged.size;
        Ok(())
    }
}

/// A manifest's media type (declared, or its own `mediaType`) and what it
/// names, checked to be a manifest of that type.
fn parse_manifest(
    digest: &Digest,
    declared: Option<&str>,
    body: &[u8],
    depth: usize,
) -> Result<(String, media::Contents), ImportError> {
    if depth > MAX_DEPTH {
        return Err(invalid(format!("{digest}: indexes nested too deep")));
    }
    let fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
    let own = fields.get("mediaType").and_then(|v| v.as_str());
    let media_type = declared
        .or(own)
        .ok_or_else(|| invalid(format!("manifest {digest}: no media type")))?
        .to_string();
    if !media::is_manifest(&media_type)
        || media::is_schema1(&media_type)
        || !media::has_manifest_shape(&media_type, &fields)
    {
        return Err(invalid(format!(
            "{digest}: not an image manifest or index ({media_type})"
        )));
    }
    let contents: media::Contents =
        serde_json::from_slice(body).map_err(|e| invalid(format!("manifest {digest}: {e}")))?;
    Ok((media_type, contents))
}

fn parse_digest(s: &str, within: &Digest) -> Result<Digest, ImportError> {
    s.parse().map_err(|_| {
        invalid(format!(
            "manifest {within} names {s:?}, not a sha256 digest"
        ))
    })
}

/// A descriptor's digest, media type and size.
fn descriptor(
    v: &serde_json::Value,
    file: &str,
) -> Result<(Digest, Option<String>, Option<u64>), ImportError> {
    let digest = v["digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| invalid(format!("{file}: a descriptor without a sha256 digest")))?;
    Ok((
        digest,
        v["mediaType"].as_str().map(str::to_string),
        v["size"].as_u64(),
    ))
}

fn read_small(path: &str, size: u64, r: &mut dyn Read) -> Result<Bytes, ImportError> {
    if size > MAX_INDEX {
        return Err(invalid(format!(
            "{path}: {size} bytes, more than {MAX_INDEX}"
        )));
    }
    read_exact(path, size, r)
}

fn read_exact(path: &str, size: u64, r: &mut dyn Read) -> Result<Bytes, ImportError> {
    let mut buf = Vec::with_capacity(size as usize);
    r.take(size.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 != size {
        return Err(invalid(format!(
            "{path}: {} bytes, {size} announced",
            buf.len()
        )));
    }
    Ok(buf.into())
}

fn copy_hashing(r: &mut dyn Read, w: &mut File, hasher: &mut Sha256) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0u64;
    loop {
        let got = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..got]);
        w.write_all(&buf[..got])?;
        n += got as u64;
    }
}

/// Counts the bytes read through it, telling `progress` every 8 MiB.
struct Counting<'a, R> {
    inner: R,
    read: u64,
    told: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read - self.told >= 8 << 20 {
            self.told = self.read;
            (self.progress)(self.read);
        }
        Ok(n)
    }
}

/// Feeds an uncompressed tar (an OCI layout or a docker save archive) to
/// `import`, telling `progress` the bytes read so far.
pub fn read_tar(
    import: &mut Import,
    input: impl Read,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ImportError> {
    let mut counting = Counting {
        inner: input,
        read: 0,
        told: 0,
        progress,
    };
    let mut head = [0u8; 2];
    let mut peeked = 0;
    while peeked < 2 {
        match counting.read(&mut head[peeked..])? {
            0 => break,
            n => peeked += n,
        }
    }
    if head[..peeked] == [0x1f, 0x8b] {
        return Err(invalid(
            "a gzip-compressed archive: gunzip it first (skopeo and docker save write plain tar)",
        ));
    }
    let chained = (&head[..peeked]).chain(counting);
    let mut archive = tar::Archive::new(chained);
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("a broken tar archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| invalid(format!("a tar entry with a bad name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let size = entry.size();
        import.add(&path, size, &mut entry)?;
    }
    Ok(())
}

/// The regular files under `root` (links and other kinds left out), each
/// as its path relative to `root` and its size.
pub fn files_under(root: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        for entry in fs::read_dir(root.join(&rel))? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(rel);
            } else if kind.is_file() {
                files.push((rel, entry.metadata()?.len()));
            }
        }
    }
    Ok(files)
}

/// Feeds an OCI layout folder (or an unpacked docker save archive).
pub fn read_dir(
    import: &mut Import,
    root: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(), ImportError> {
    let mut read = 0u64;
    for (rel, _) in files_under(root)? {
        let mut file = File::open(root.join(&rel))?;
        let size = file.metadata()?.len();
        import.add(&rel.to_string_lossy(), size, &mut file)?;
        read += size;
        progress(read);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, path, *body).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn image() -> (Vec<(String, Vec<u8>)>, Digest) {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_vec();
        let layer = b"not really a tar, but content all the same".to_vec();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": Digest::of(&config).to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": Digest::of(&layer).to_string(), "size": layer.len()}],
        })
        .to_string()
        .into_bytes();
        let md = Digest::of(&manifest);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": media::OCI_MANIFEST, "digest": md.to_string(),
                           "size": manifest.len(),
                           "annotations": {"org.opencontainers.image.ref.name": "v1"}}],
        })
        .to_string()
        .into_bytes();
        let blob = |b: &Vec<u8>| (format!("blobs/sha256/{}", Digest::of(b).hex()), b.clone());
        (
            vec![
                (
                    "oci-layout".into(),
                    br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
                ),
                blob(&layer),
                blob(&config),
                blob(&manifest),
                ("index.json".into(), index),
            ],
            md,
        )
    }

    fn run(store: &Arc<Store>, files: &[(String, Vec<u8>)]) -> Result<Imported, ImportError> {
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(p, b)| (p.as_str(), b.as_slice()))
            .collect();
        let tar = layout(&refs);
        let mut import = Import::new(store.clone(), vec!["reg.test/app:v1".parse().unwrap()])?;
        read_tar(&mut import, tar.as_slice(), &mut |_| {})?;
        import.finish().map(|(r, _)| r)
    }

    #[test]
    fn a_layout_lands_whole_with_its_tag_and_origin() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (files, md) = image();
        let r = run(&store, &files).unwrap();
        assert_eq!((r.manifests, r.blobs_added), (1, 2), "{r:?}");
        let ns: Namespace = "reg.test".parse().unwrap();
        let repo = "app".parse().unwrap();
        assert_eq!(
            store.tag(&ns, &repo, "v1", Class::ALL).unwrap().unwrap().0,
            md
        );
        assert!(store.manifest(&md).unwrap().is_some());
        assert_eq!(store.origins(&md).unwrap(), vec![ns]);
        assert_eq!(super::super::read_dir_len(&dir.path().join("tmp")), 0);
        // Again: everything is there already.
        let r = run(&store, &files).unwrap();
        assert_eq!((r.blobs_added, r.blobs_present), (0, 2), "{r:?}");
    }

    #[test]
    fn a_wrong_byte_or_a_missing_blob_leaves_nothing_behind() {
        let (mut files, md) = image();
        files[1].1[0] ^= 1;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let e = run(&store, &files).unwrap_err().to_string();
        assert!(e.contains("not the sha256:"), "{e}");
        let (mut files, _) = image();
        files.remove(1);
        let e = run(&store, &files).unwrap_err().to_string();
        assert!(e.contains("neither in the archive nor in the cache"), "{e}");
        assert!(store.manifest(&md).unwrap().is_none());
        assert_eq!(store.stats().unwrap().blobs, 0);
        assert_eq!(super::super::read_dir_len(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn a_layout_folder_reads_like_its_tar() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let layout = tempfile::tempdir().unwrap();
        let (files, md) = image();
        for (path, body) in &files {
            let p = layout.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, body).unwrap();
        }
        let mut import =
            Import::new(store.clone(), vec!["reg.test/app:v1".parse().unwrap()]).unwrap();
        let mut told = 0;
        read_dir(&mut import, layout.path(), &mut |n| told = n).unwrap();
        let (r, created) = import.finish().unwrap();
        assert_eq!((r.manifests, r.blobs_added), (1, 2), "{r:?}");
        assert_eq!(told, files.iter().map(|(_, b)| b.len() as u64).sum::<u64>());
        assert!(created.contains(&store.blob_path(&Digest::of(&files[1].1))));
        assert!(store.manifest(&md).unwrap().is_some());
    }

    #[test]
    fn compressed_and_foreign_archives_are_refused_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let target = || vec!["reg.test/app:v1".parse().unwrap()];
        let mut import = Import::new(store.clone(), target()).unwrap();
        let e = read_tar(&mut import, &[0x1f, 0x8b, 8, 0][..], &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("gunzip"), "{e}");
        let tar = layout(&[("hello.txt", b"hi")]);
        let mut import = Import::new(store.clone(), target()).unwrap();
        read_tar(&mut import, tar.as_slice(), &mut |_| {}).unwrap();
        let e = import.finish().unwrap_err().to_string();
        assert!(e.contains("neither an OCI image layout"), "{e}");
        assert!(Import::new(store, Vec::new()).is_err());
    }
}
