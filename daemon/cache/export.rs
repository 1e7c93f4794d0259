//! `nodemirror cache export`: images in the cache written as an OCI image
//! layout tar (what `skopeo copy ... oci-archive:` reads and `ctr import`
//! takes), so that a connected machine prepares what an air-gapped site
//! imports (`nodemirror cache import`).
//!
//! Each image goes whole: an index with every platform manifest and their
//! blobs, or with `--platform` the index as it is (so its digest stays the
//! registry's) and the chosen platforms' manifests and blobs only. Every
//! file is hashed as it is written and must match its digest, so a
//! damaged cache file never leaves the node as content.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

use super::Store;
use crate::oci::accept::Class;
use crate::oci::media;
use crate::reference::{Digest, ImageRef, Reference};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What an export wrote.
#[derive(Debug, Default)]
pub struct Exported {
    /// `reference@digest` of each image.
    pub images: Vec<String>,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// A platform to keep, `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformChoice {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::str::FromStr for PlatformChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [os, arch] | [os, arch, _] if !os.is_empty() && !arch.is_empty() => {
                Ok(PlatformChoice {
                    os: os.into(),
                    architecture: arch.into(),
                    variant: parts.get(2).map(|v| v.to_string()),
                })
            }
            _ => Err(format!(
                "{s:?}: a platform is os/architecture[/variant], e.g. linux/amd64"
            )),
        }
    }
}

impl PlatformChoice {
    fn matches(&self, p: &serde_json::Value) -> bool {
        p["os"].as_str() == Some(self.os.as_str())
            && p["architecture"].as_str() == Some(self.architecture.as_str())
            && self
                .variant
                .as_deref()
                .is_none_or(|v| p["variant"].as_str() == Some(v))
    }
}

/// One file of the layout, opened while the export was planned (so that
/// an eviction meanwhile cannot take it away).
enum Part {
    Manifest(Digest, Vec<u8>),
    Blob(Digest, File, u64),
}

/// Writes the images as an OCI layout tar to `out`, telling `progress`
/// the bytes written so far.
pub fn export(
    store: &Store,
    images: &[ImageRef],
    platforms: &[PlatformChoice],
    out: impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<Exported, ExportError> {
    let mut parts = Vec::new();
    let mut seen = HashSet::new();
    let mut index = Vec::new();
    let mut report = Exported::default();
    for image in images {
        let digest = resolve(store, image)?;
        let (media_type, body) = store.manifest(&digest)?.ok_or_else(|| {
            ExportError::Missing(format!(
                "{image}: manifest {digest} is not in the cache (pull it through the daemon first, \
                 e.g. nodemirror prefetch {image})"
            ))
        })?;
        plan(
            store, image, &digest, &body, platforms, &mut seen, &mut parts, 0,
        )?;
        let mut annotations = serde_json::Map::new();
        let name = match &image.reference {
            Reference::Tag(t) => {
                annotations.insert("org.opencontainers.image.ref.name".into(), t.clone().into());
                image.to_string()
            }
            Reference::Digest(_) => image.to_string(),
        };
        annotations.insert("io.containerd.image.name".into(), name.clone().into());
        index.push(serde_json::json!({
            "mediaType": media_type,
            "digest": digest.to_string(),
            "size": body.len(),
            "annotations": annotations,
        }));
        report.images.push(format!("{name}@{digest}"));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": index,
    })
    .to_string();

    let mut tar = tar::Builder::new(out);
    let mut written = 0u64;
    append(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    append(&mut tar, "index.json", index.as_bytes())?;
    for part in parts {
        match part {
            Part::Manifest(d, body) => {
                append(&mut tar, &format!("blobs/sha256/{}", d.hex()), &body)?;
                written += body.len() as u64;
                report.manifests += 1;
            }
            Part::Blob(d, file, len) => {
                let mut header = header(len);
                let mut hashing = Hashing {
                    inner: file.take(len),
                    hasher: Sha256::new(),
                };
                tar.append_data(
                    &mut header,
                    format!("blobs/sha256/{}", d.hex()),
                    &mut hashing,
                )?;
                let got = Digest::from_hasher(hashing.hasher);
                if got != d {
                    store.quarantine_blob(&d, "its content changed (found by export)");
                    return Err(ExportError::Missing(format!(
                        "cached blob {d} is damaged (its content hashes to {got}); it was \
                         quarantined: pull the image again and export anew"
                    )));
                }
                written += len;
                report.blobs += 1;
                report.bytes += len;
                progress(written);
            }
        }
    }
    tar.into_inner()?.flush()?;
    Ok(report)
}

fn header(len: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(len);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    h
}

fn append<W: Write>(tar: &mut tar::Builder<W>, path: &str, body: &[u8]) -> io::Result<()> {
    tar.append_data(&mut header(body.len() as u64), path, body)
}

/// The digest an image reference names in the cache: a tag's record (any
/// client's; the one every client shares first), or the digest itself.
fn resolve(store: &Store, image: &ImageRef) -> Result<Digest, ExportError> {
    let tag = match &image.reference {
        Reference::Digest(d) => return Ok(d.clone()),
        Reference::Tag(t) => t,
    };
    if let Some((d, _)) = store.tag(&image.namespace, &image.repository, tag, Class::ALL)? {
        return Ok(d);
    }
    let mut best: Option<(Digest, std::time::SystemTime)> = None;
    for class in Class::every() {
        if let Some((d, when)) = store.tag(&image.namespace, &image.repository, tag, class)? {
            if best.as_ref().is_none_or(|(_, b)| when > *b) {
                best = Some((d, when));
            }
        }
    }
    best.map(|(d, _)| d).ok_or_else(|| {
        ExportError::Missing(format!(
            "{image}: no such tag in the cache (pull it through the daemon first, e.g. \
             nodemirror prefetch {image})"
        ))
    })
}

/// Adds a manifest and what it names (the chosen platforms of an index)
/// to `parts`, each file once.
#[allow(clippy::too_many_arguments)]
fn plan(
    store: &Store,
    image: &ImageRef,
    digest: &Digest,
    body: &[u8],
    platforms: &[PlatformChoice],
    seen: &mut HashSet<Digest>,
    parts: &mut Vec<Part>,
    depth: usize,
) -> Result<(), ExportError> {
    if !seen.insert(digest.clone()) {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ExportError::Missing(format!("manifest {digest}: {e}")))?;
    parts.push(Part::Manifest(digest.clone(), body.to_vec()));
    for child in v["manifests"].as_array().into_iter().flatten() {
        let chosen =
            platforms.is_empty() || platforms.iter().any(|p| p.matches(&child["platform"]));
        if !chosen || depth > 3 {
            continue;
        }
        let d = digest_of(child, digest)?;
        let (_, b) = store.manifest(&d)?.ok_or_else(|| {
            ExportError::Missing(format!(
                "{image}: platform manifest {d} ({}) is not in the cache: pull that platform \
                 too, or choose platforms with --platform",
                platform_text(&child["platform"])
            ))
        })?;
        plan(store, image, &d, &b, platforms, seen, parts, depth + 1)?;
    }
    let blobs = v["config"].as_object().map(|_| &v["config"]).into_iter();
    for blob in blobs.chain(v["layers"].as_array().into_iter().flatten()) {
        let d = digest_of(blob, digest)?;
        if !seen.insert(d.clone()) {
            continue;
        }
        let (file, len) = open_soon(store, &d)?.ok_or_else(|| {
            ExportError::Missing(format!(
                "{image}: blob {d} of {digest} is not in the cache (pull the image through \
                 the daemon first)"
            ))
        })?;
        parts.push(Part::Blob(d, file, len));
    }
    Ok(())
}

/// A blob the daemon just sent is stored a moment after its last byte
/// (`prefetch` then `export` at once): a missing one is looked for again
/// for a few seconds before it counts as missing.
fn open_soon(store: &Store, d: &Digest) -> io::Result<Option<(File, u64)>> {
    for _ in 0..COMMIT_WAIT_STEPS {
        if let Some(found) = store.open_blob(d)? {
            return Ok(Some(found));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    store.open_blob(d)
}

/// Looks for a missing blob for this many tenths of a second.
const COMMIT_WAIT_STEPS: u32 = 30;

fn digest_of(desc: &serde_json::Value, within: &Digest) -> Result<Digest, ExportError> {
    desc["digest"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| ExportError::Missing(format!("manifest {within}: a bad descriptor")))
}

fn platform_text(p: &serde_json::Value) -> String {
    let part = |k: &str| p[k].as_str().unwrap_or("").to_string();
    let mut s = format!("{}/{}", part("os"), part("architecture"));
    if let Some(v) = p["variant"].as_str() {
        s = format!("{s}/{v}");
    }
    s
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::import::{read_tar, Import};
    use super::*;
    use crate::reference::Namespace;

    #[test]
    fn an_exported_index_imports_back_whole_or_by_platform() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ns: Namespace = "reg.test".parse().unwrap();
        let mut children = Vec::new();
        for arch in ["amd64", "arm64"] {
            let config = format!(r#"{{"architecture":"{arch}","os":"linux"}}"#).into_bytes();
            let layer = format!("layer for {arch}").into_bytes();
            for b in [&config, &layer] {
                let d = Digest::of(b);
                crate::atomic::write(&store.blob_path(&d), b).unwrap();
            }
            let m = serde_json::json!({"schemaVersion":2,"mediaType":media::OCI_MANIFEST,
                "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":Digest::of(&config).to_string(),"size":config.len()},
                "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":Digest::of(&layer).to_string(),"size":layer.len()}]}).to_string();
            let d = Digest::of(m.as_bytes());
            store
                .put_manifest(&d, media::OCI_MANIFEST, m.as_bytes())
                .unwrap();
            children.push(
                serde_json::json!({"mediaType":media::OCI_MANIFEST,"digest":d.to_string(),
                "size":m.len(),"platform":{"os":"linux","architecture":arch}}),
            );
        }
        let index = serde_json::json!({"schemaVersion":2,"mediaType":media::OCI_INDEX,"manifests":children}).to_string();
        let id = Digest::of(index.as_bytes());
        store
            .put_manifest(&id, media::OCI_INDEX, index.as_bytes())
            .unwrap();
        store
            .put_tag(&ns, &"app".parse().unwrap(), "v1", Class::ALL, &id)
            .unwrap();

        let image: ImageRef = "reg.test/app:v1".parse().unwrap();
        let mut tar = Vec::new();
        let r = export(
            &store,
            std::slice::from_ref(&image),
            &[],
            &mut tar,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!((r.manifests, r.blobs), (3, 4), "{r:?}");
        let amd64: PlatformChoice = "linux/amd64".parse().unwrap();
        let mut one = Vec::new();
        let r = export(&store, &[image], &[amd64], &mut one, &mut |_| {}).unwrap();
        assert_eq!((r.manifests, r.blobs), (2, 2), "{r:?}");

        // Into an empty cache under another registry name.
        let other = tempfile::tempdir().unwrap();
        let target = Store::open(other.path()).unwrap();
        let as_: ImageRef = "mirror.test/app:v1".parse().unwrap();
        let mut import = Import::new(target.clone(), vec![as_.clone()]).unwrap();
        read_tar(&mut import, tar.as_slice(), &mut |_| {}).unwrap();
        let (got, _) = import.finish().unwrap();
        assert_eq!((got.manifests, got.blobs_added), (3, 4), "{got:?}");
        let found = target
            .tag(&as_.namespace, &as_.repository, "v1", Class::ALL)
            .unwrap()
            .unwrap();
        assert_eq!(found.0, id, "the registry's digest is kept");
        // One platform into another empty cache: the index whole, the
        // other platform's manifest missing.
        let third = tempfile::tempdir().unwrap();
        let mut import = Import::new(Store::open(third.path()).unwrap(), vec![as_]).unwrap();
        read_tar(&mut import, one.as_slice(), &mut |_| {}).unwrap();
        let (got, _) = import.finish().unwrap();
        assert_eq!((got.manifests, got.blobs_added), (2, 2), "{got:?}");
        assert_eq!(got.missing.len(), 1, "{got:?}");
    }

    #[test]
    fn a_damaged_cache_file_is_not_exported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let layer = b"layer".to_vec();
        let d = Digest::of(&layer);
        crate::atomic::write(&store.blob_path(&d), b"LAYER").unwrap();
        let m = serde_json::json!({"schemaVersion":2,"mediaType":media::OCI_MANIFEST,
            "config":{"mediaType":"x","digest":d.to_string(),"size":5},"layers":[]})
        .to_string();
        let md = Digest::of(m.as_bytes());
        store
            .put_manifest(&md, media::OCI_MANIFEST, m.as_bytes())
            .unwrap();
        let image: ImageRef = format!("reg.test/app@{md}").parse().unwrap();
        let e = export(&store, &[image], &[], &mut Vec::new(), &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(!store.blob_path(&d).exists(), "quarantined");
    }
}
