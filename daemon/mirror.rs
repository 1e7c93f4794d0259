//! Serving the pull API from upstreams: manifests are read whole (bounded)
//! and verified before a byte is sent, so a lying endpoint falls back
//! transparently; blobs stream through with their digest checked.

pub mod stream;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::reference::{Digest, Namespace, Reference, Repository};
use crate::server::{boxed, full, ResponseBody, ServeError, API_VERSION};
use crate::upstream::{AttemptError, Endpoint, Upstream, UpstreamRequest};
use stream::{UpstreamBody, Verify};

/// Largest manifest accepted; OCI registries commonly refuse over 4 MiB.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Asked for when the client names no media types.
const DEFAULT_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The pull API over the upstream endpoint chains.
pub struct Mirror {
    pub upstream: Arc<Upstream>,
}

/// A manifest as fetched and verified.
struct Manifest {
    digest: Digest,
    media_type: HeaderValue,
    /// `None` for HEAD, where only the length is known.
    body: Option<Bytes>,
    length: u64,
}

impl Mirror {
    pub async fn manifest(
        &self,
        method: &Method,
        ns: Namespace,
        repository: Repository,
        reference: Reference,
        headers: &HeaderMap,
    ) -> Result<Response<ResponseBody>, ServeError> {
        let head = method == Method::HEAD;
        let req = UpstreamRequest {
            method: if head { Method::HEAD } else { Method::GET },
            namespace: ns,
            tail: format!("manifests/{reference}"),
            repository,
            needs_resolve: matches!(reference, Reference::Tag(_)),
            accept: Some(
                headers
                    .get(ACCEPT)
                    .cloned()
                    .unwrap_or(HeaderValue::from_static(DEFAULT_ACCEPT)),
            ),
            range: None,
        };
        let want = reference.digest();
        let result = self
            .upstream
            .first_success(&req, |ep, resp| self.take_manifest(ep, resp, &req, want))
            .await;
        let (m, _) = result.map_err(|source| ServeError::Upstream {
            what: "manifest",
            source,
        })?;
        let builder = Response::builder()
            .status(StatusCode::OK)
            .header(API_VERSION.0, API_VERSION.1)
            .header(CONTENT_TYPE, m.media_type)
            .header(CONTENT_LENGTH, m.length)
            .header(DOCKER_CONTENT_DIGEST, m.digest.to_string());
        builder
            .body(full(m.body.unwrap_or_default()))
            .map_err(|e| ServeError::Internal(e.to_string()))
    }

    /// Checks one endpoint's manifest response. For HEAD, the headers must
    /// name digest, type and length; when they do not, the manifest is
    /// fetched with GET from the same endpoint and measured.
    async fn take_manifest(
        &self,
        ep: Arc<Endpoint>,
        resp: Response<Incoming>,
        req: &UpstreamRequest,
        want: Option<&Digest>,
    ) -> Result<Manifest, AttemptError> {
        let check = |digest: &Digest| match want {
            Some(w) if w != digest => Err(AttemptError::Invalid(format!(
                "manifest digest mismatch: asked for {w}, got {digest}"
            ))),
            _ => Ok(()),
        };
        if req.method == Method::HEAD {
            let h = resp.headers();
            let digest = h
                .get(DOCKER_CONTENT_DIGEST)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<Digest>().ok());
            let length = h
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let media_type = h.get(CONTENT_TYPE).cloned();
            if let (Some(digest), Some(length), Some(media_type)) = (digest, length, media_type) {
                check(&digest)?;
                return Ok(Manifest {
                    digest,
                    media_type,
                    body: None,
                    length,
                });
            }
            let get = UpstreamRequest {
                method: Method::GET,
                ..req.clone()
            };
            let resp = self.upstream.attempt(&ep, &get).await?;
            let mut m = self.read_manifest(resp).await?;
            check(&m.digest)?;
            m.body = None;
            return Ok(m);
        }
        let m = self.read_manifest(resp).await?;
        check(&m.digest)?;
        Ok(m)
    }

    async fn read_manifest(&self, resp: Response<Incoming>) -> Result<Manifest, AttemptError> {
        let header_type = resp.headers().get(CONTENT_TYPE).cloned();
        let idle = self.upstream.settings().idle_timeout;
        let read = Limited::new(resp.into_body(), MAX_MANIFEST_BYTES).collect();
        let body = tokio::time::timeout(idle, read)
            .await
            .map_err(|_| {
                AttemptError::Invalid(format!("manifest body not received within {idle:?}"))
            })?
            .map_err(|e| AttemptError::Invalid(format!("manifest body: {e}")))?
            .to_bytes();
        let media_type = match header_type {
            Some(t) if !t.is_empty() => t,
            _ => media_type_of(&body).ok_or_else(|| {
                AttemptError::Invalid("manifest has neither Content-Type nor mediaType".into())
            })?,
        };
        Ok(Manifest {
            digest: Digest::of(&body),
            media_type,
            length: body.len() as u64,
            body: Some(body),
        })
    }

    pub async fn blob(
        &self,
        method: &Method,
        ns: Namespace,
        repository: Repository,
        digest: Digest,
        headers: &HeaderMap,
    ) -> Result<Response<ResponseBody>, ServeError> {
        let head = method == Method::HEAD;
        let range = headers.get(RANGE).cloned().filter(|_| !head);
        let req = UpstreamRequest {
            method: method.clone(),
            namespace: ns,
            tail: format!("blobs/{digest}"),
            repository,
            needs_resolve: false,
            accept: None,
            range: range.clone(),
        };
        let result = self
            .upstream
            .first_success(&req, |ep, resp| async move {
                let st = resp.status();
                if st != StatusCode::OK && st != StatusCode::PARTIAL_CONTENT {
                    return Err(AttemptError::Status(st));
                }
                if st == StatusCode::PARTIAL_CONTENT && !resp.headers().contains_key(CONTENT_RANGE)
                {
                    return Err(AttemptError::Invalid("206 without Content-Range".into()));
                }
                Ok((ep, resp))
            })
            .await;
        let ((ep, resp), _) = result.map_err(|source| ServeError::Upstream {
            what: "blob",
            source,
        })?;
        let status = resp.status();
        let mut builder = Response::builder()
            .status(status)
            .header(API_VERSION.0, API_VERSION.1)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(ACCEPT_RANGES, "bytes")
            .header(DOCKER_CONTENT_DIGEST, digest.to_string());
        for name in [CONTENT_LENGTH, CONTENT_RANGE] {
            if let Some(v) = resp.headers().get(&name) {
                builder = builder.header(name, v);
            }
        }
        if head {
            return builder
                .body(full(Bytes::new()))
                .map_err(|e| ServeError::Internal(e.to_string()));
        }
        // Only a whole blob can be checked against its digest.
        let verify = (status == StatusCode::OK).then(|| Verify {
            want: digest,
            upstream: self.upstream.clone(),
            endpoint: ep,
        });
        let idle = self.upstream.settings().idle_timeout;
        builder
            .body(boxed(UpstreamBody::new(resp.into_body(), idle, verify)))
            .map_err(|e| ServeError::Internal(e.to_string()))
    }
}

/// The `mediaType` field of a manifest, for upstreams that omit the header.
fn media_type_of(body: &[u8]) -> Option<HeaderValue> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    let p: Probe = serde_json::from_slice(body).ok()?;
    HeaderValue::try_from(p.media_type?).ok()
}
