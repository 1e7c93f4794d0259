//! Serving the pull API from the cache and the upstreams.
//!
//! Manifests are read whole (bounded), verified, stored by digest with
//! their media type, and only then sent, so a lying endpoint falls back
//! transparently. A tag's digest is trusted for the tag TTL, then
//! revalidated with a HEAD; when every endpoint fails, the last known
//! digest and content are served, so a warm node pulls with upstreams down.
//! Blobs go through the single-flight fetch ([`flight`]) and the cache
//! ([`blob`]).

mod access;
mod blob;
mod conn;
mod fetch;
pub mod flight;
mod limit;
mod list;
mod multipart;
mod pace;
mod pieces;
pub mod range;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;

use crate::cache::{pool, Store};
use crate::cluster::{Cluster, PeerRole};
use crate::metrics::METRICS;
use crate::oci::{
    content_length, full, media, Accept, Content, ResponseBody, ServeError, Verdict, API_VERSION,
    DOCKER_CONTENT_DIGEST,
};
use crate::reference::{Digest, Namespace, Reference, Repository};
use crate::sendfile::Mappings;
use crate::snapshot::Snapshot;
use crate::upstream::{self, AttemptError, Endpoint, Upstream, UpstreamRequest};
use flight::Flights;
pub use limit::Limits;
pub use list::List;

/// Largest manifest accepted; OCI registries commonly refuse over 4 MiB.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// The pull API over the cache and the upstream endpoint chains.
pub struct Mirror {
    pub upstream: Arc<Upstream>,
    pub store: Arc<Store>,
    pub flights: Arc<Flights>,
    /// Slots of upstream fetches under way, shared with `flights`.
    pub limits: Arc<Limits>,
    /// Cluster mode: the peers, when `[cluster]` is configured.
    pub cluster: Option<Arc<Cluster>>,
}

/// One client request, as the mirror needs it: the configuration it
/// started under, the namespace, HEAD or GET, the client's headers, and
/// the connection's sendfile mappings when it can send a file.
pub struct Pull<'a> {
    pub snap: Arc<Snapshot>,
    pub ns: Namespace,
    /// The path and query as the client sent them.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub head: bool,
    pub headers: &'a HeaderMap,
    pub zero_copy: Option<&'a Arc<Mappings>>,
    /// Cluster mode: the request came from a peer, asking as this.
    pub peer: Option<PeerRole>,
}

/// A manifest as fetched or cached.
#[derive(Clone)]
struct Manifest {
    digest: Digest,
    media_type: String,
    /// `None` when only an upstream HEAD was made.
    body: Option<Bytes>,
    length: u64,
}

fn internal(e: impl std::fmt::Display) -> ServeError {
    ServeError::Internal(e.to_string())
}

impl Mirror {
    pub async fn manifest(
        &self,
        pull: &Pull<'_>,
        repository: Repository,
        reference: Reference,
    ) -> Result<Response<ResponseBody>, ServeError> {
        let accept = Accept::from_headers(pull.headers);
        let m = match &reference {
            Reference::Digest(d) => {
                self.manifest_by_digest(pull, &repository, d, &accept)
                    .await?
            }
            Reference::Tag(tag) => {
                self.manifest_by_tag(pull, &repository, tag, &accept)
                    .await?
            }
        };
        respond_manifest(m, pull.head)
    }

    /// From the cache when the client accepts the cached manifest's type
    /// and may see it; otherwise the client gets what the upstream
    /// answers its `Accept`.
    async fn manifest_by_digest(
        &self,
        pull: &Pull<'_>,
        repository: &Repository,
        d: &Digest,
        accept: &Accept,
    ) -> Result<Manifest, ServeError> {
        let (snap, ns, peer) = (&*pull.snap, &pull.ns, pull.peer);
        if let Some((m, seen)) = self
            .cached_manifest(pull, d)
            .await
            .filter(|(m, _)| accept.admits(&m.media_type))
        {
            let hit = || {
                METRICS
                    .cache
                    .inc(&[("kind", "manifest"), ("result", "hit")])
            };
            if seen {
                hit();
                return Ok(m);
            }
            if peer.is_some() {
                return Err(ServeError::NotHeld(Content::Manifest));
            }
            if snap.upstream.vouches_for(ns) {
                let tail = format!("manifests/{d}");
                let accepted = Some(accept.upstream_value());
                self.confirm(pull, repository, &tail, d, accepted).await?;
                hit();
                return Ok(m);
            }
        }
        if peer == Some(PeerRole::Holder) {
            return Err(ServeError::NotHeld(Content::Manifest));
        }
        METRICS
            .cache
            .inc(&[("kind", "manifest"), ("result", "miss")]);
        let reference = Reference::Digest(d.clone());
        // Asked by a peer as the owner: from the upstreams, never from
        // other peers.
        let peers = match (peer, &self.cluster) {
            (None, Some(c)) => c.plan(&snap.upstream, ns, d),
            _ => None,
        };
        let m = self
            .fetch_manifest(snap, Method::GET, ns, repository, &reference, accept, peers)
            .await?;
        self.keep(&m, ns).await;
        Ok(m)
    }

    async fn manifest_by_tag(
        &self,
        pull: &Pull<'_>,
        repository: &Repository,
        tag: &str,
        accept: &Accept,
    ) -> Result<Manifest, ServeError> {
        let (snap, ns, head) = (&*pull.snap, &pull.ns, pull.head);
        // A registry answers a tag by the client's Accept list: clients of
        // another class have their own record, so no client's list can
        // change what another gets.
        let class = accept.class();
        let known = {
            let (store, ns, repository, tag) = (
                self.store.clone(),
                ns.clone(),
                repository.clone(),
                tag.to_string(),
            );
            pool::run(move || store.tag(&ns, &repository, &tag, class))
                .await
                .and_then(|r| r)
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "unreadable tag record; asking upstream");
                    None
                })
        };
        let cached = match known {
            Some((d, confirmed)) => self
                .cached_manifest(pull, &d)
                .await
                .filter(|(m, seen)| accept.admits(&m.media_type) && *seen)
                .map(|(m, _)| (m, confirmed)),
            None => None,
        };
        if let Some((m, confirmed)) = &cached {
            let age = SystemTime::now()
                .duration_since(*confirmed)
                .unwrap_or_default();
            if age < snap.settings.cache.tag_ttl {
                METRICS.cache.inc(&[("kind", "tag"), ("result", "hit")]);
                return Ok(m.clone());
            }
        }
        // With content in hand a HEAD is enough to revalidate (and is not
        // counted against Docker Hub's pull limit); so is a client's HEAD.
        let method = if cached.is_some() || head {
            Method::HEAD
        } else {
            Method::GET
        };
        let reference = Reference::Tag(tag.to_string());
        let fetched = match self
            .fetch_manifest(snap, method, ns, repository, &reference, accept, None)
            .await
        {
            Ok(m) => m,
            // Failing, throttling us, or every fetch slot busy: the last
            // known answer keeps the pull working. A 404 for the tag is
            // believed.
            Err(e) if cached.is_some() && stale_allowed(&e) => {
                let (m, _) = cached.unwrap_or_else(|| unreachable!("checked is_some"));
                METRICS.cache.inc(&[("kind", "tag"), ("result", "stale")]);
                tracing::warn!(%ns, %repository, tag, digest = %m.digest, error = %e,
                    detail = e.detail().unwrap_or_default(),
                    "upstream unavailable; serving the last known manifest for this tag");
                return Ok(m);
            }
            Err(e) => return Err(e),
        };
        let revalidated = if cached.is_some() {
            "revalidated"
        } else {
            "miss"
        };
        METRICS
            .cache
            .inc(&[("kind", "tag"), ("result", revalidated)]);
        if !media::is_schema1(&fetched.media_type) {
            let (store, ns, repository, tag, d) = (
                self.store.clone(),
                ns.clone(),
                repository.clone(),
                tag.to_string(),
                fetched.digest.clone(),
            );
            let recorded =
                pool::run(move || store.put_tag(&ns, &repository, &tag, class, &d)).await;
            if let Err(e) = recorded.and_then(|r| r) {
                tracing::warn!(error = %e, "could not record tag");
            }
        }
        self.keep(&fetched, ns).await;
        if let Some((m, _)) = cached.filter(|(m, _)| m.digest == fetched.digest) {
            return Ok(m);
        }
        if fetched.body.is_some() || head {
            return Ok(fetched);
        }
        // The tag moved: the new content from the cache if this namespace
        // may see it there (its upstream just named the digest, which is
        // believed of a namespace the operator configured), else by digest.
        if let Some((m, seen)) = self.cached_manifest(pull, &fetched.digest).await {
            if seen {
                return Ok(m);
            }
            if snap.upstream.vouches_for(ns) {
                self.record_origin(&fetched.digest, ns).await;
                return Ok(m);
            }
        }
        let by_digest = Reference::Digest(fetched.digest.clone());
        let peers =
            (self.cluster.as_ref()).and_then(|c| c.plan(&snap.upstream, ns, &fetched.digest));
        let m = self
            .fetch_manifest(snap, Method::GET, ns, repository, &by_digest, accept, peers)
            .await?;
        self.keep(&m, ns).await;
        Ok(m)
    }

    /// The cached manifest `d`, and whether the request may see it (its
    /// origins), both read on the disk pool.
    async fn cached_manifest(&self, pull: &Pull<'_>, d: &Digest) -> Option<(Manifest, bool)> {
        let (store, dd) = (self.store.clone(), d.clone());
        let read = pool::run(move || (store.manifest(&dd), store.origins(&dd))).await;
        let (found, origins) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "cannot read the cache");
                return None;
            }
        };
        let m = match found {
            Ok(Some((media_type, body))) => Manifest {
                digest: d.clone(),
                media_type,
                length: body.len() as u64,
                body: Some(body),
            },
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "cached manifest unusable; fetching again");
                return None;
            }
        };
        let seen = match origins {
            Ok(o) => access::visible(&pull.snap.upstream, &o, &pull.ns, pull.peer.is_some()),
            Err(e) => {
                tracing::warn!(digest = %d, error = %e, "unreadable origins; content not served from the cache");
                false
            }
        };
        Some((m, seen))
    }

    /// Stores a fetched manifest, with `ns` as an origin, on the disk pool;
    /// schema 1 never (a registry's conversion for one old client, not the
    /// image the registry holds).
    async fn keep(&self, m: &Manifest, ns: &Namespace) {
        if media::is_schema1(&m.media_type) {
            return;
        }
        if let Some(body) = &m.body {
            let (store, d, media_type, body, ns) = (
                self.store.clone(),
                m.digest.clone(),
                m.media_type.clone(),
                body.clone(),
                ns.clone(),
            );
            let stored = pool::run(move || {
                store
                    .add_origin(&d, &ns)
                    .and_then(|()| store.put_manifest(&d, &media_type, &body))
            })
            .await;
            if let Err(e) = stored.and_then(|r| r) {
                tracing::warn!(digest = %m.digest, error = %e, "could not cache manifest");
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_manifest(
        &self,
        snap: &Snapshot,
        method: Method,
        ns: &Namespace,
        repository: &Repository,
        reference: &Reference,
        accept: &Accept,
        peers: Option<Arc<upstream::PeerPlan>>,
    ) -> Result<Manifest, ServeError> {
        let req = UpstreamRequest {
            method,
            namespace: ns.clone(),
            tail: format!("manifests/{reference}"),
            repository: Some(repository.clone()),
            query: Vec::new(),
            needs_resolve: matches!(reference, Reference::Tag(_)),
            accept: Some(accept.upstream_value()),
            range: None,
            peers,
        };
        let want = reference.digest();
        let _slot = self.limits.acquire(&snap.upstream, ns).await?;
        let started = std::time::Instant::now();
        let found = self
            .upstream
            .first_success(&snap.upstream, &req, |ep, resp| {
                self.take_manifest(snap, ep, resp, &req, want, accept)
            })
            .await
            .map(|(m, _)| m)
            .map_err(|exhausted| exhausted.into_error(Content::Manifest));
        let result = if found.is_ok() { "ok" } else { "error" };
        METRICS.upstream_duration.observe_since(
            &[
                ("ns", crate::metrics::ns_label(snap, ns.as_str())),
                ("kind", "manifest"),
                ("result", result),
            ],
            started,
        );
        found
    }

    /// Checks one endpoint's manifest response. For HEAD, the headers must
    /// name digest, type and length; when they do not, the manifest is
    /// fetched with GET from the same endpoint and measured.
    async fn take_manifest(
        &self,
        snap: &Snapshot,
        ep: Arc<Endpoint>,
        resp: Response<Incoming>,
        req: &UpstreamRequest,
        want: Option<&Digest>,
        accept: &Accept,
    ) -> Result<Manifest, AttemptError> {
        let check = |m: Manifest| match want {
            Some(w) if *w != m.digest => Err(AttemptError::Invalid(format!(
                "manifest digest mismatch: asked for {w}, got {}",
                m.digest
            ))),
            _ => Ok(m),
        };
        let idle = snap.upstream.settings.idle_timeout;
        if req.method != Method::HEAD {
            return check(read_manifest(resp, idle, accept).await?);
        }
        let h = resp.headers();
        let text = |name| h.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
        let digest = text(DOCKER_CONTENT_DIGEST).and_then(|v| v.parse::<Digest>().ok());
        let length = content_length(h);
        let media_type = text(CONTENT_TYPE.as_str())
            .map(media::essence)
            .filter(|t| media::is_manifest(t) || accept.names(t));
        if let (Some(digest), Some(length), Some(media_type)) = (digest, length, media_type) {
            return check(Manifest {
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
        let resp = self.upstream.attempt(&snap.upstream, &ep, &get).await?;
        check(read_manifest(resp, idle, accept).await?)
    }
}

/// Whether an error from the upstreams lets a tag be answered from its
/// last known digest: anything but "not found" (or "not allowed").
fn stale_allowed(e: &ServeError) -> bool {
    matches!(
        e,
        ServeError::Upstream {
            verdict: Verdict::Failed | Verdict::Throttled { .. },
            ..
        } | ServeError::Busy { .. }
    )
}

fn respond_manifest(m: Manifest, head: bool) -> Result<Response<ResponseBody>, ServeError> {
    let media_type = HeaderValue::try_from(m.media_type.as_str()).map_err(internal)?;
    let body = if head {
        Bytes::new()
    } else {
        m.body.unwrap_or_default()
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(API_VERSION.0, API_VERSION.1)
        .header(CONTENT_TYPE, media_type)
        .header(CONTENT_LENGTH, m.length)
        .header(DOCKER_CONTENT_DIGEST, m.digest.to_string())
        .body(full(body))
        .map_err(internal)
}

/// Reads a manifest response whole (bounded in size and time) and measures it.
async fn read_manifest(
    resp: Response<Incoming>,
    idle: Duration,
    accept: &Accept,
) -> Result<Manifest, AttemptError> {
    let header_type = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media::essence);
    let body =
        upstream::read_whole(resp.into_body(), MAX_MANIFEST_BYTES, idle, "manifest body").await?;
    let media_type = manifest_type(header_type, &body, accept)?;
    Ok(Manifest {
        digest: Digest::of(&body),
        media_type,
        length: body.len() as u64,
        body: Some(body),
    })
}

/// A manifest is what a registry answered only when it is a JSON object
/// whose type is a manifest or index type (or an artifact type this client
/// named), and the body's own `mediaType`, if any, agrees with the
/// header. Anything else (an HTML page, a secret from behind a redirect)
/// is neither served nor cached.
fn manifest_type(
    header_type: Option<String>,
    body: &[u8],
    accept: &Accept,
) -> Result<String, AttemptError> {
    let invalid = |why: String| Err(AttemptError::Invalid(why));
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) else {
        return invalid("manifest is not a JSON object".into());
    };
    let declared = fields
        .get("mediaType")
        .and_then(|v| v.as_str())
        .map(media::essence);
    let media_type = match (header_type, declared) {
        // A generic JSON type says nothing; the body does.
        (Some(h), d) if h == "application/json" || h == "text/plain" => match d {
            Some(d) => d,
            None if fields.get("schemaVersion").and_then(|v| v.as_u64()) == Some(1) => {
                media::DOCKER_SCHEMA1_SIGNED.to_string()
            }
            None => return invalid(format!("manifest served as {h} without a mediaType")),
        },
        // A registry (or a proxy in front of one) that labels a manifest
        // with another manifest type: the body's own type decides, as it
        // does for containerd (the digest is checked either way).
        (Some(h), Some(d)) if h != d && media::is_manifest(&h) && media::is_manifest(&d) => {
            tracing::debug!(header = %h, body = %d, "manifest labelled with another type; the body's own type is served");
            d
        }
        (Some(h), Some(d)) if h != d => {
            return invalid(format!("Content-Type {h} but the manifest says {d}"))
        }
        (Some(h), _) => h,
        (None, Some(d)) => d,
        (None, None) => return invalid("manifest has neither Content-Type nor mediaType".into()),
    };
    if !media::is_manifest(&media_type) && !accept.names(&media_type) {
        return invalid(format!("{media_type} is not a manifest type"));
    }
    if !media::has_manifest_shape(&media_type, &fields) {
        return invalid(format!(
            "served as {media_type}, but it is no such manifest"
        ));
    }
    Ok(media_type)
}
