//! Manifest media types.

use http::HeaderValue;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Docker's image manifest schema 1 (deprecated): registries convert to it
/// for clients that do not accept schema 2, under a different digest.
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// A media type without parameters, lowercase.
pub fn essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether `media_type` is an image manifest or index type (schema 1 too).
pub fn is_manifest(media_type: &str) -> bool {
    let t = essence(media_type);
    MANIFESTS.contains(&t.as_str()) || is_schema1(&t)
}

/// Whether `media_type` is Docker schema 1, which is never cached.
pub fn is_schema1(media_type: &str) -> bool {
    let t = media_type.split(';').next().unwrap_or("").trim();
    t.eq_ignore_ascii_case(DOCKER_SCHEMA1) || t.eq_ignore_ascii_case(DOCKER_SCHEMA1_SIGNED)
}

/// Whether a JSON object of a manifest type has what that type has: an
/// index its `manifests`, an image manifest its `config` and `layers`,
/// schema 1 its `fsLayers`. A JSON object labelled as a manifest is not
/// one for all that.
pub fn has_manifest_shape(
    media_type: &str,
    fields: &serde_json::Map<String, serde_json::Value>,
) -> bool {
    let t = essence(media_type);
    let array = |k: &str| fields.get(k).is_some_and(|v| v.is_array());
    if t == OCI_INDEX || t == DOCKER_LIST {
        array("manifests")
    } else if t == OCI_MANIFEST || t == DOCKER_MANIFEST {
        fields.get("config").is_some_and(|v| v.is_object()) && array("layers")
    } else if is_schema1(&t) {
        array("fsLayers")
    } else {
        true
    }
}

/// A descriptor as manifests and indexes name content: its digest and, in
/// an index, the platform.
#[derive(serde::Deserialize)]
pub struct Descriptor {
    pub digest: String,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(serde::Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
}

/// What an index (`manifests`) or an image manifest (`config`, `layers`)
/// names; parsed leniently, whatever the media type.
#[derive(serde::Deserialize)]
pub struct Contents {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

impl Contents {
    /// Every descriptor: an index's manifests, an image's config and layers.
    pub fn all(&self) -> impl Iterator<Item = &Descriptor> {
        self.manifests
            .iter()
            .chain(self.config.iter())
            .chain(self.layers.iter())
    }
}

/// The manifest and index types of images today, most capable first.
pub const MANIFESTS: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// An `Accept` value naming every type in [`MANIFESTS`], for a client
/// that names none.
pub fn accept_all() -> HeaderValue {
    // The constants above are plain ASCII, so the joined value is valid.
    HeaderValue::try_from(MANIFESTS.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static(OCI_MANIFEST))
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_all_names_every_type() {
        let v = super::accept_all();
        let v = v.to_str().unwrap();
        for t in super::MANIFESTS {
            assert!(v.contains(t), "{v}");
        }
    }
}
