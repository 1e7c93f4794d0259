//! Parsing a request into what the pull API serves: the path into a
//! [`Route`], the registry into a [`Namespace`], checked once and in the
//! order a client's mistakes are reported (path, loop, method, namespace).
//!
//! The registry comes from `?ns=` (containerd), else from the first path
//! component when it names a registry (containers/image mirrors with a
//! path prefix: `/v2/quay.io/org/app/...`), else it is the default one.
//! A first component names a registry when hosts.d configures it, or when
//! it looks like a host as in Docker's reference grammar: it holds a `.`
//! or a `:`, or is `localhost`. Repository names on Docker Hub (and in the
//! reference grammar) never do, so a repository of the default registry is
//! never taken for a prefix.

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
    /// `/v2/<name>/tags/list`.
    Tags(Repository),
    /// `/v2/<name>/referrers/<digest>` (OCI 1.1).
    Referrers(Repository, Digest),
    /// `/v2/_catalog`.
    Catalog,
}

/// A path split into the repository name (not yet parsed) and what it asks.
enum Target<'a> {
    Base,
    Catalog,
    Named(&'a str, Kind<'a>),
}

#[derive(Clone, Copy)]
enum Kind<'a> {
    Manifest(&'a str),
    Blob(&'a str),
    Tags,
    Referrers(&'a str),
}

fn split(path: &str) -> Result<Target<'_>, ServeError> {
    if path == "/v2/" || path == "/v2" {
        return Ok(Target::Base);
    }
    let unknown = || ServeError::UnknownRoute(path.to_string());
    let rest = path.strip_prefix("/v2/").ok_or_else(unknown)?;
    if rest == "_catalog" {
        return Ok(Target::Catalog);
    }
    if rest.contains("/blobs/uploads") {
        return Err(unknown());
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Target::Named(name, Kind::Tags));
    }
    // A reference or digest holds no '/', so the last marker is the real
    // one even when a repository component is itself called "manifests".
    let found = ["/manifests/", "/blobs/", "/referrers/"]
        .into_iter()
        .filter_map(|m| rest.rfind(m).map(|i| (i, m)))
        .max();
    let Some((i, marker)) = found else {
        return Err(unknown());
    };
    let (name, arg) = (&rest[..i], &rest[i + marker.len()..]);
    let kind = match marker {
        "/manifests/" => Kind::Manifest(arg),
        "/blobs/" => Kind::Blob(arg),
        _ => Kind::Referrers(arg),
    };
    Ok(Target::Named(name, kind))
}

fn named(repository: &str, kind: Kind<'_>) -> Result<Route, ServeError> {
    let repo: Repository = repository.parse()?;
    Ok(match kind {
        Kind::Manifest(r) => Route::Manifest(repo, r.parse()?),
        Kind::Blob(d) => Route::Blob(repo, d.parse()?),
        Kind::Tags => Route::Tags(repo),
        Kind::Referrers(d) => Route::Referrers(repo, d.parse()?),
    })
}

/// Parses a path whose registry is given (or is the default).
#[cfg(test)]
pub fn route(path: &str) -> Result<Route, ServeError> {
    match split(path)? {
        Target::Base => Ok(Route::Base),
        Target::Catalog => Ok(Route::Catalog),
        Target::Named(name, kind) => named(name, kind),
    }
}

/// The registry a path names with its first component, and the rest.
/// containers/image cannot put a `:` in a mirror's path, so `host_port`
/// stands for `host:port` (a host name never holds `_`).
fn prefix<'a>(name: &'a str, configured: &dyn Fn(&str) -> bool) -> Option<(String, &'a str)> {
    let (first, rest) = name.split_once('/')?;
    let (host, registry) = match first.rsplit_once('_') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            (h, format!("{h}:{p}"))
        }
        _ => (first, first.to_string()),
    };
    let hostlike = host.contains('.') || host == "localhost" || first.contains(':');
    (hostlike || configured(host) || configured(&registry)).then_some((registry, rest))
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

/// The route and the registry: `?ns=`, a path prefix, or the default.
fn resolve(
    path: &str,
    query: Option<&str>,
    default_ns: &Namespace,
    configured: &dyn Fn(&str) -> bool,
) -> (Result<Route, ServeError>, Result<Namespace, ServeError>) {
    let ns = namespace_param(query);
    let given_or_default = |ns: Result<Option<Namespace>, ServeError>| {
        ns.map(|n| n.unwrap_or_else(|| default_ns.clone()))
    };
    match split(path) {
        Err(e) => (Err(e), given_or_default(ns)),
        Ok(Target::Base) => (Ok(Route::Base), given_or_default(ns)),
        Ok(Target::Catalog) => (Ok(Route::Catalog), given_or_default(ns)),
        Ok(Target::Named(name, kind)) => {
            // Only a request without `?ns=` names its registry in the path.
            match prefix(name, configured).filter(|_| matches!(ns, Ok(None))) {
                Some((registry, rest)) => (
                    named(rest, kind),
                    registry.parse().map_err(ServeError::from),
                ),
                None => (named(name, kind), given_or_default(ns)),
            }
        }
    }
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

/// What a request carries, for [`parse`].
pub struct Incoming<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// How to read requests: the default registry, which registries hosts.d
/// configures, and this daemon's own `Via` (a request carrying it went
/// round a loop).
pub struct Rules<'a> {
    pub default_ns: &'a Namespace,
    pub configured: &'a dyn Fn(&str) -> bool,
    pub own_via: &'a str,
}

/// Parses and checks a request once.
pub fn parse(req: Incoming<'_>, rules: &Rules<'_>) -> (Labels, Result<PullRequest, ServeError>) {
    let (route, ns) = resolve(req.path, req.query, rules.default_ns, rules.configured);
    let labels = Labels {
        kind: match &route {
            Ok(Route::Manifest(..)) => "manifest",
            Ok(Route::Blob(..)) => "blob",
            _ => "other",
        },
        ns: ns.as_ref().ok().unwrap_or(rules.default_ns).clone(),
    };
    let checked = (|| {
        let route = route?;
        let looped = req.headers.get_all(http::header::VIA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|hop| hop.trim() == rules.own_via))
        });
        if looped {
            return Err(ServeError::Loop);
        }
        if req.method != Method::GET && req.method != Method::HEAD {
            return Err(ServeError::MethodNotAllowed(req.method.clone()));
        }
        Ok(PullRequest {
            route,
            ns: ns?,
            head: req.method == Method::HEAD,
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
        assert_eq!(code("/v2/a/tags"), "UNSUPPORTED");
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
    fn list_and_referrer_routes() {
        assert_eq!(route("/v2/_catalog").unwrap(), Route::Catalog);
        let Route::Tags(n) = route("/v2/a/b/tags/list").unwrap() else {
            panic!()
        };
        assert_eq!(n.as_str(), "a/b");
        let Route::Referrers(n, d) = route(&format!("/v2/a/referrers/{D}")).unwrap() else {
            panic!()
        };
        assert_eq!((n.as_str(), d.to_string()), ("a", D.to_string()));
        // The last marker decides.
        let Route::Manifest(n, _) = route("/v2/a/referrers/x/manifests/v1").unwrap() else {
            panic!()
        };
        assert_eq!(n.as_str(), "a/referrers/x");
    }

    #[test]
    fn registry_from_ns_prefix_or_default() {
        let default: Namespace = "docker.io".parse().unwrap();
        let configured = |s: &str| s == "myreg";
        let r = |path: &str, query: Option<&str>| {
            let (route, ns) = resolve(path, query, &default, &configured);
            let name = match route.unwrap() {
                Route::Manifest(n, _) | Route::Tags(n) => n.to_string(),
                other => format!("{other:?}"),
            };
            format!("{} {name}", ns.unwrap())
        };
        assert_eq!(
            r("/v2/library/busybox/manifests/1", None),
            "docker.io library/busybox"
        );
        assert_eq!(
            r("/v2/quay.io/org/app/manifests/1", None),
            "quay.io org/app"
        );
        assert_eq!(
            r("/v2/127.0.0.1:5000/app/tags/list", None),
            "127.0.0.1:5000 app"
        );
        assert_eq!(r("/v2/localhost/app/manifests/1", None), "localhost app");
        assert_eq!(r("/v2/myreg/team/app/manifests/1", None), "myreg team/app");
        // host_port: how containers/image mirrors name a registry with a port.
        assert_eq!(
            r("/v2/127.0.0.1_5000/app/tags/list", None),
            "127.0.0.1:5000 app"
        );
        assert_eq!(
            r("/v2/localhost_5000/app/manifests/1", None),
            "localhost:5000 app"
        );
        assert_eq!(r("/v2/myreg_443/app/manifests/1", None), "myreg:443 app");
        // ...but not for a repository of the default registry.
        assert_eq!(
            r("/v2/team_1/app/manifests/1", None),
            "docker.io team_1/app"
        );
        assert_eq!(
            r("/v2/docker.io/library/x/manifests/1", None),
            "docker.io library/x"
        );
        // ?ns= wins: the path is the repository as it stands.
        assert_eq!(
            r("/v2/quay.io/app/manifests/1", Some("ns=ghcr.io")),
            "ghcr.io quay.io/app"
        );
        // A host-like component alone is a repository name, not a prefix.
        assert_eq!(r("/v2/a.b/manifests/1", None), "docker.io a.b");
        // A host-like prefix that is no valid host is refused.
        let (_, ns) = resolve("/v2/a..b/app/manifests/1", None, &default, &configured);
        assert!(ns.is_err());
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
