//! Wiring a node's container runtimes to the mirror: containerd's certs.d
//! and config.toml ([`containerd`]), rke2/k3s `registries.yaml`
//! ([`registries`]), and containers/image's registries.conf.d for CRI-O,
//! podman, skopeo and buildah ([`crio`]). Every file an installer writes is
//! journaled with its original bytes, so uninstall puts back exactly what
//! was there.

pub mod containerd;
pub mod crio;
pub mod doctor;
pub mod registries;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not valid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Refused { path: PathBuf, message: String },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file changed by `install`.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Touched {
    pub path: PathBuf,
    /// The bytes before, or `None` if the file did not exist.
    pub original: Option<String>,
    /// sha256 of what install wrote, to tell whether it was edited since.
    pub written_sha256: String,
}

pub(crate) fn sha(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, InstallError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}
