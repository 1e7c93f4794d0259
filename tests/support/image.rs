//! Test images: real gzip'd tar layers (so containerd can unpack them), an
//! OCI image config naming their diff IDs, and an OCI manifest.

use std::process::Command;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

impl Image {
    /// An image with one layer per entry of `files`, each holding one file.
    pub fn build(files: &[(&str, &[u8])]) -> Image {
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
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers
                .iter()
                .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar+gzip", l))
                .collect::<Vec<_>>(),
        })
        .to_string()
        .into_bytes();
        Image {
            digest: super::sha256(&manifest),
            config,
            layers,
            manifest,
            media_type: OCI_MANIFEST.into(),
        }
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Vec<u8>> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}
