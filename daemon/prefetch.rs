//! `nodemirror prefetch <image>`: pulls an image through a running daemon
//! so that its manifests and blobs are cached before a node needs them.
//! For an index, the manifests of the wanted platforms are followed.

use bytes::Bytes;
use http::header::ACCEPT;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest as _, Sha256};

use crate::oci::media::{Contents, Descriptor};
use crate::reference::{Digest, ImageRef, Reference};

#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("{url}: {why}")]
    Request { url: String, why: String },
    #[error("{url}: answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{url}: invalid manifest: {why}")]
    Manifest { url: String, why: String },
    #[error("{url}: content does not match {digest}")]
    Mismatch { url: String, digest: Digest },
    #[error("no manifest in the index matches platform {0}")]
    NoPlatform(String),
}

/// Which platforms of a multi-platform image to fetch.
#[derive(Debug, Clone)]
pub enum Platforms {
    All,
    /// `os/arch`, e.g. `linux/amd64`.
    One(String),
}

impl Platforms {
    /// This machine's platform in OCI terms.
    pub fn host() -> Platforms {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platforms::One(format!("linux/{arch}"))
    }
}

/// What a prefetch fetched.
#[derive(Debug, Default)]
pub struct Summary {
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Pulls `image` through the daemon at `server` (e.g. `http://127.0.0.1:5780`).
pub async fn prefetch(
    server: &str,
    image: &ImageRef,
    platforms: &Platforms,
) -> Result<Summary, PrefetchError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (manifests, blobs) = walk(&client, server, image, platforms).await?;
    let mut summary = Summary {
        manifests,
        ..Summary::default()
    };
    for digest in blobs {
        let url = blob_url(server, image, &digest);
        let (_, len) = fetch(&client, &url, false, Some(&digest)).await?;
        summary.blobs += 1;
        summary.bytes += len;
    }
    Ok(summary)
}

/// One blob of a cluster preheat, as it ended.
pub struct Preheated<'a> {
    pub index: usize,
    pub of: usize,
    pub digest: &'a Digest,
    /// The owner and the blob's size, or why not.
    pub result: &'a Result<(String, u64), String>,
}

/// What a cluster preheat did.
#[derive(Debug, Default)]
pub struct PreheatSummary {
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
    pub failed: Vec<(Digest, String)>,
}

/// Makes the cluster of the daemon at `server` hold `image`: its
/// manifests are pulled through that daemon (the wanted platforms of an
/// index), and each blob's owner fetches the blob once (or finds it
/// cached), without the blobs being stored on that daemon's node. Every
/// blob is tried; `progress` hears of each as it ends.
pub async fn preheat(
    server: &str,
    image: &ImageRef,
    platforms: &Platforms,
    progress: &mut dyn FnMut(Preheated<'_>),
) -> Result<PreheatSummary, PrefetchError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let (manifests, blobs) = walk(&client, server, image, platforms).await?;
    let mut summary = PreheatSummary {
        manifests,
        ..PreheatSummary::default()
    };
    let of = blobs.len();
    for (i, digest) in blobs.iter().enumerate() {
        let result = crate::admin::request_preheat(
            server,
            image.namespace.as_str(),
            image.repository.as_str(),
            &digest.to_string(),
        )
        .await;
        progress(Preheated {
            index: i + 1,
            of,
            digest,
            result: &result,
        });
        match result {
            Ok((_, bytes)) => {
                summary.blobs += 1;
                summary.bytes += bytes;
            }
            Err(e) => summary.failed.push((digest.clone(), e)),
        }
    }
    Ok(summary)
}

fn blob_url(server: &str, image: &ImageRef, digest: &Digest) -> String {
    format!(
        "{}/v2/{}/blobs/{digest}?ns={}",
        server.trim_end_matches('/'),
        image.repository,
        image.namespace
    )
}

/// Fetches the manifests of `image` through the daemon, following an
/// index to the wanted platforms: how many, and the blobs they name (each
/// once, in order).
async fn walk(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    server: &str,
    image: &ImageRef,
    platforms: &Platforms,
) -> Result<(usize, Vec<Digest>), PrefetchError> {
    let base = format!("{}/v2/{}", server.trim_end_matches('/'), image.repository);
    let ns = format!("ns={}", image.namespace);
    let mut manifests = 0;
    let mut blobs: Vec<Digest> = Vec::new();
    let mut queue = vec![image.reference.clone()];
    while let Some(reference) = queue.pop() {
        let url = format!("{base}/manifests/{reference}?{ns}");
        let (body, _) = fetch(client, &url, true, reference.digest()).await?;
        manifests += 1;
        let m: Contents = serde_json::from_slice(&body).map_err(|e| PrefetchError::Manifest {
            url: url.clone(),
            why: e.to_string(),
        })?;
        let digest_of = |d: &Descriptor| {
            d.digest
                .parse::<Digest>()
                .map_err(|e| PrefetchError::Manifest {
                    url: url.clone(),
                    why: e.to_string(),
                })
        };
        if !m.manifests.is_empty() {
            let mut matched = 0;
            for d in &m.manifests {
                let wanted = match (platforms, &d.platform) {
                    (Platforms::All, _) => true,
                    (Platforms::One(want), Some(p)) => {
                        format!("{}/{}", p.os, p.architecture) == *want
                    }
                    (Platforms::One(_), None) => false,
                };
                if wanted {
                    matched += 1;
                    queue.push(Reference::Digest(digest_of(d)?));
                }
            }
            if matched == 0 {
                let Platforms::One(p) = platforms else {
                    unreachable!("All matches every entry")
                };
                return Err(PrefetchError::NoPlatform(p.clone()));
            }
            continue;
        }
        for d in m.config.iter().chain(m.layers.iter()) {
            let digest = digest_of(d)?;
            if !blobs.contains(&digest) {
                blobs.push(digest);
            }
        }
    }
    Ok((manifests, blobs))
}

/// GETs `url`, checks the digest, and returns the body when `keep`.
async fn fetch(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    url: &str,
    keep: bool,
    want: Option<&Digest>,
) -> Result<(Vec<u8>, u64), PrefetchError> {
    let fail = |why: String| PrefetchError::Request {
        url: url.to_string(),
        why,
    };
    let req = Request::get(url)
        .header(ACCEPT, crate::oci::media::accept_all())
        .body(Empty::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| fail(crate::upstream::error_chain(&e)))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut kept = Vec::new();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            hasher.update(&data);
            len += data.len() as u64;
            if keep || status != StatusCode::OK {
                kept.extend_from_slice(&data);
            }
        }
    }
    if status != StatusCode::OK {
        return Err(PrefetchError::Status {
            url: url.to_string(),
            status,
            body: String::from_utf8_lossy(&kept).into_owned(),
        });
    }
    if let Some(w) = want {
        if Digest::from_hasher(hasher) != *w {
            return Err(PrefetchError::Mismatch {
                url: url.to_string(),
                digest: w.clone(),
            });
        }
    }
    Ok((kept, len))
}
