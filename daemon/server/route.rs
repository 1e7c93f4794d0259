//! Parsing a request into what the pull API serves: the path into a
//! [`Route`], `?ns=` into a [`Namespace`], checked once and in the order a
//! client's mistakes are reported (path, loop, method, namespace).

use http::{HeaderMap, Method};

use crate::oci::ServeError;
use crate::reference::{Digest, Namespace, Reference, Repository};

/// A parsed request path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: API version check.
    Base,
    Manifest(Repository, Reference),
    Blob(Repository, Digest),
}

/// Parses `/v2/`, `/v2/<name>/manifests/<ref>` and `/v2/<name>/blobs/<digest>`.
pub fn route(path: &str) -> Result<Route, ServeError> {
    if path == "/v2/" || path == "/v2" {
        return Ok(Route::Base);
    }
    let unknown = || ServeError::UnknownRoute(path.to_string());
    let rest = path.strip_prefix("/v2/").ok_or_else(unknown)?;
    if rest.contains("/blobs/uploads") {
        return Err(unknown());
    }
    // A reference holds no '/', so the last marker is the real one even
    // when a repository path component is itself called "manifests".
    if let Some(i) = rest.rfind("/manifests/") {
        let name = rest[..i].parse()?;
        let reference = rest[i + "/manifests/".len()..].parse()?;
        return Ok(Route::Manifest(name, reference));
    }
    if let Some(i) = rest.rfind("/blobs/") {
        let name = rest[..i].parse()?;
        let digest = rest[i + "/blobs/".len()..].parse()?;
        return Ok(Route::Blob(name, digest));
    }
    Err(unknown())
}

/// The `ns` query parameter, if any.
fn namespace_param(query: Option<&str>) -> Result<Option<Namespace>, ServeError> {
    let Some(q) = query else { return Ok(None) };
    for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
        if k == "ns" {
            return Ok(Some(v.parse()?));
        }
    }
    Ok(None)
}

/// A pull API request that passed every check.
#[derive(Debug)]
pub struct PullRequest {
    pub route: Route,
    pub ns: Namespace,
    /// HEAD rather than GET.
    pub head: bool,
}

/// What the request log and metrics record, known even for a refused
/// request.
pub struct Labels {
    /// manifest, blob or other.
    pub kind: &'static str,
    /// The namespace, or the default one when none or an invalid one was given.
    pub ns: Namespace,
}

/// Parses and checks a request once. `own_via` is this daemon's `Via`: a
/// request carrying it went round a loop.
pub fn parse(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    default_ns: &Namespace,
    own_via: &str,
) -> (Labels, Result<PullRequest, ServeError>) {
    let route = route(path);
    let ns = namespace_param(query).map(|ns| ns.unwrap_or_else(|| default_ns.clone()));
    let labels = Labels {
        kind: match &route {
            Ok(Route::Manifest(..)) => "manifest",
            Ok(Route::Blob(..)) => "blob",
            _ => "other",
        },
        ns: ns.as_ref().ok().unwrap_or(default_ns).clone(),
    };
    let checked = (|| {
        let route = route?;
        let looped = headers.get_all(http::header::VIA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|hop| hop.trim() == own_via))
        });
        if looped {
            return Err(ServeError::Loop);
        }
        if method != Method::GET && method != Method::HEAD {
            return Err(ServeError::MethodNotAllowed(method.clone()));
        }
        Ok(PullRequest {
            route,
            ns: ns?,
            head: method == Method::HEAD,
        })
    })();
    (labels, checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn routes() {
        assert_eq!(route("/v2/").unwrap(), Route::Base);
        let Route::Manifest(n, r) = route("/v2/library/busybox/manifests/latest").unwrap() else {
            panic!()
        };
        assert_eq!(
            (n.as_str(), r.to_string().as_str()),
            ("library/busybox", "latest")
        );
        let Route::Manifest(n, _) = route("/v2/a/manifests/manifests/v1").unwrap() else {
            panic!()
        };
        assert_eq!(n.as_str(), "a/manifests");
        let Route::Blob(n, d) = route(&format!("/v2/x/y/blobs/{D}")).unwrap() else {
            panic!()
        };
        assert_eq!((n.as_str(), d.to_string()), ("x/y", D.to_string()));
    }

    #[test]
    fn bad_routes_map_to_oci_codes() {
        let code = |p: &str| route(p).unwrap_err().code();
        assert_eq!(code("/v2/Bad/manifests/latest"), "NAME_INVALID");
        assert_eq!(code("/v2/a/manifests/bad:tag"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/manifests/.x"), "TAG_INVALID");
        assert_eq!(code("/v2/a/blobs/sha256:zz"), "DIGEST_INVALID");
        assert_eq!(code("/v2/a/blobs/uploads/"), "UNSUPPORTED");
        assert_eq!(code("/v2/a/tags/list"), "UNSUPPORTED");
        assert_eq!(code("/other"), "UNSUPPORTED");
        assert_eq!(code("/v2/../etc/manifests/x"), "NAME_INVALID");
    }

    proptest::proptest! {
        /// Any path and query a client sends is routed or refused; no panic.
        #[test]
        fn routing_is_total(path in "/v2/\\PC{0,200}", query in "\\PC{0,100}") {
            let _ = route(&path);
            let _ = namespace_param(Some(&query));
        }

        /// Paths built from the URL alphabet, with the route markers mixed in.
        #[test]
        fn near_valid_paths(parts in proptest::collection::vec("(manifests|blobs|uploads|sha256:[0-9a-f]{0,64}|[a-z0-9._-]{0,12}|\\.\\.)", 0..8)) {
            let path = format!("/v2/{}", parts.join("/"));
            if let Ok(Route::Manifest(name, _) | Route::Blob(name, _)) = route(&path) {
                proptest::prop_assert!(!name.as_str().split('/').any(|c| c == ".."));
            }
        }
    }

    #[test]
    fn ns_param() {
        assert_eq!(namespace_param(None).unwrap(), None);
        assert_eq!(
            namespace_param(Some("a=1&ns=Quay.io"))
                .unwrap()
                .unwrap()
                .as_str(),
            "quay.io"
        );
        assert!(namespace_param(Some("ns=a/b")).is_err());
    }
}
