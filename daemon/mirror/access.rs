//! Who may see cached content: decided by where it came from (the
//! namespaces it was verified through, its origins), never by the
//! namespace a request names alone.
//!
//! - Content with at least one public origin is public: every client and
//!   every peer gets it, under any namespace.
//! - Content whose origins are all private (credentials or `private =
//!   true`) goes to local clients only under one of those namespaces
//!   (and `server` lets only allowed users use a private namespace at
//!   all); to peers only under one of them that says `share = true`.
//!
//! Anything else is a miss for the namespace asked: its own upstream must
//! confirm the digest before the cached copy is served under it
//! ([`Mirror::confirm`], a HEAD, for namespaces the operator configured),
//! and the namespace is then recorded as an origin.

use http::{HeaderValue, Method};

use super::{Mirror, Pull};
use crate::oci::{content_length, Content, ServeError, DOCKER_CONTENT_DIGEST};
use crate::reference::{Digest, Namespace, Repository};
use crate::upstream::{AttemptError, Config, UpstreamRequest};

/// Whether content that came through `origins` may be served for a
/// request naming `ns`, from a peer (`peer`) or a local client.
pub fn visible(cfg: &Config, origins: &[Namespace], ns: &Namespace, peer: bool) -> bool {
    if origins.iter().any(|o| !cfg.is_private(o)) {
        return true;
    }
    origins.contains(ns) && (!peer || cfg.shareable(ns))
}

impl Mirror {
    /// Records that `d` came through `ns` (off the async threads).
    pub(super) async fn record_origin(&self, d: &Digest, ns: &Namespace) {
        let (store, d, ns) = (self.store.clone(), d.clone(), ns.clone());
        let recorded = crate::cache::pool::run(move || store.add_origin(&d, &ns)).await;
        if let Err(e) = recorded.and_then(|r| r) {
            tracing::warn!(error = %e, "could not record where cached content came from");
        }
    }

    /// Asks the request's namespace (its own endpoints, never peers)
    /// whether it serves `tail` with a HEAD, and records it as an origin
    /// of `digest` when it does: cached content is then served under it.
    /// When it does not, the client gets what it said (404, or 503).
    pub(super) async fn confirm(
        &self,
        pull: &Pull<'_>,
        repository: &Repository,
        tail: &str,
        digest: &Digest,
        accept: Option<HeaderValue>,
    ) -> Result<(), ServeError> {
        let what = if tail.starts_with("blobs/") {
            Content::Blob
        } else {
            Content::Manifest
        };
        let req = own_head(pull, repository, tail, accept);
        let want = digest.to_string();
        self.upstream
            .first_success(&pull.snap.upstream, &req, |_, resp| {
                let named = resp
                    .headers()
                    .get(DOCKER_CONTENT_DIGEST)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let want = want.clone();
                async move {
                    match named {
                        Some(d) if d != want => {
                            Err(AttemptError::Invalid(format!("HEAD of {want} named {d}")))
                        }
                        _ => Ok(()),
                    }
                }
            })
            .await
            .map_err(|exhausted| exhausted.into_error(what))?;
        tracing::debug!(%digest, namespace = %pull.ns, "cached content confirmed by the namespace's upstream");
        self.record_origin(digest, &pull.ns).await;
        Ok(())
    }

    /// The upstream's answer to a HEAD of `tail` (a blob): its length.
    pub(super) async fn upstream_head(
        &self,
        pull: &Pull<'_>,
        repository: &Repository,
        tail: &str,
        accept: Option<HeaderValue>,
    ) -> Result<u64, ServeError> {
        let req = own_head(pull, repository, tail, accept);
        let (len, _) = self
            .upstream
            .first_success(&pull.snap.upstream, &req, |_, resp| async move {
                content_length(resp.headers())
                    .ok_or_else(|| AttemptError::Invalid("blob HEAD without Content-Length".into()))
            })
            .await
            .map_err(|exhausted| exhausted.into_error(Content::Blob))?;
        Ok(len)
    }
}

/// A HEAD of `tail` to the request's namespace's own endpoints (never
/// peers: their word adds no origin).
fn own_head(
    pull: &Pull<'_>,
    repository: &Repository,
    tail: &str,
    accept: Option<HeaderValue>,
) -> UpstreamRequest {
    UpstreamRequest {
        method: Method::HEAD,
        namespace: pull.ns.clone(),
        tail: tail.to_string(),
        repository: Some(repository.clone()),
        query: Vec::new(),
        needs_resolve: false,
        accept,
        range: None,
        peers: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hosts: &[(&str, &str)]) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        for (ns, text) in hosts {
            std::fs::create_dir_all(dir.path().join(ns)).unwrap();
            std::fs::write(dir.path().join(ns).join("hosts.toml"), text).unwrap();
        }
        let cfg = crate::upstream::Upstream::new()
            .configure(dir.path(), None, &Default::default(), 0)
            .unwrap();
        (dir, cfg)
    }

    #[test]
    fn origins_decide_what_a_namespace_sees() {
        let (_d, cfg) = config(&[
            (
                "private.test",
                "private = true\nserver = \"http://127.0.0.1:9\"\n",
            ),
            (
                "shared.test",
                "private = true\nshare = true\nserver = \"http://127.0.0.1:9\"\n",
            ),
            ("public.test", "server = \"http://127.0.0.1:9\"\n"),
        ]);
        let n = |s: &str| -> Namespace { s.parse().unwrap() };
        let (private, shared, public) = (n("private.test"), n("shared.test"), n("public.test"));
        let other = n("other.test");
        // Private only: under its own namespace, locally; never to peers.
        let p = [private.clone()];
        assert!(visible(&cfg, &p, &private, false));
        assert!(!visible(&cfg, &p, &public, false));
        assert!(!visible(&cfg, &p, &other, false));
        assert!(!visible(&cfg, &p, &private, true));
        assert!(!visible(&cfg, &p, &public, true));
        // Private with share = true: to peers under that namespace only.
        let s = [shared.clone()];
        assert!(visible(&cfg, &s, &shared, true));
        assert!(!visible(&cfg, &s, &public, true));
        assert!(!visible(&cfg, &s, &private, false));
        // One public origin makes it public, for everyone.
        let both = [private.clone(), other.clone()];
        for ns in [&private, &public, &other, &shared] {
            assert!(visible(&cfg, &both, ns, false));
            assert!(visible(&cfg, &both, ns, true));
        }
        // No origins known (a cache from before they were kept): nobody.
        assert!(!visible(&cfg, &[], &public, false));
    }
}
