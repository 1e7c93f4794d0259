//! Test images: real gzip'd tar layers (so containerd can unpack them), an
//! OCI image config naming their diff IDs, and an OCI manifest.

use std::process::Command;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// What containers/image (podman, skopeo, CRI-O) sends: one `Accept` line
/// per type.
pub const CONTAINERS_IMAGE_ACCEPT: [&str; 6] = [
    OCI_MANIFEST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1_SIGNED,
    DOCKER_SCHEMA1,
    DOCKER_LIST,
    OCI_INDEX,
];

/// What containerd 1.6 sends: one line.
pub const CONTAINERD_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

impl Image {
    /// An OCI image with one layer per entry of `files`, each holding one file.
    pub fn build(files: &[(&str, &[u8])]) -> Image {
        Self::build_as(files, Kind::Oci)
    }

    /// The same as a Docker schema 2 image.
    pub fn build_docker(files: &[(&str, &[u8])]) -> Image {
        Self::build_as(files, Kind::Docker)
    }

    fn build_as(files: &[(&str, &[u8])], kind: Kind) -> Image {
        let (manifest_type, config_type, layer_type) = match kind {
            Kind::Oci => (
                OCI_MANIFEST,
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
            Kind::Docker => (
                DOCKER_MANIFEST,
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
        };
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for (name, content) in files {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(name), content).unwrap();
            let tar = Command::new("tar")
                .args(["--owner=0", "--group=0", "--mtime=@0", "-cf", "-", "-C"])
                .arg(dir.path())
                .arg(name)
                .output()
                .unwrap();
            assert!(tar.status.success(), "tar failed");
            diff_ids.push(super::sha256(&tar.stdout));
            layers.push(super::gzip(&tar.stdout));
        }
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            // Docker's images carry one history entry per layer (and
            // distribution's schema 1 conversion needs them).
            "history": files.iter().map(|(name, _)| serde_json::json!({"created_by": format!("add {name}")})).collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        let descriptor = |media_type: &str, blob: &[u8]| {
            serde_json::json!({
                "mediaType": media_type,
                "digest": super::sha256(blob),
                "size": blob.len(),
            })
        };
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": descriptor(config_type, &config),
            "layers": layers
                .iter()
                .map(|l| descriptor(layer_type, l))
                .collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        Image {
            digest: super::sha256(&manifest),
            config,
            layers,
            manifest,
            media_type: manifest_type.into(),
        }
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Vec<u8>> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

enum Kind {
    Oci,
    Docker,
}

/// An index (OCI) or manifest list (Docker) of `images` for linux/amd64,
/// linux/arm64, ...: its bytes and digest.
pub fn index(media_type: &str, images: &[&Image]) -> (Vec<u8>, String) {
    let arches = ["amd64", "arm64", "s390x", "ppc64le"];
    let manifests: Vec<_> = images
        .iter()
        .zip(arches)
        .map(|(i, arch)| {
            serde_json::json!({
                "mediaType": i.media_type,
                "digest": i.digest,
                "size": i.manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            })
        })
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": manifests,
    })
    .to_string()
    .into_bytes();
    let digest = super::sha256(&body);
    (body, digest)
}
