//! The HTTP front: accepts connections, routes the distribution pull API
//! by path and `?ns=`, logs one line per request, and drains in-flight
//! requests on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::oci::{content_length, full, ResponseBody, ServeError, API_VERSION};

use crate::metrics::METRICS;
use crate::mirror::Mirror;
use crate::reference::{Namespace, Reference};

/// How long in-flight requests may take to finish after shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server needs to answer requests.
pub struct App {
    pub mirror: Mirror,
    /// The configuration in force (replaced by a reload).
    pub settings: Arc<crate::config::Live>,
    /// Set once shutdown begins: /readyz answers 503.
    pub draining: std::sync::atomic::AtomicBool,
}

/// A parsed request path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: API version check.
    Base,
    Manifest(crate::reference::Repository, Reference),
    Blob(crate::reference::Repository, crate::reference::Digest),
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

fn plain(status: StatusCode, content_type: &'static str, body: String) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .header(CONTENT_LENGTH, body.len())
        .body(full(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

impl App {
    pub fn settings(&self) -> Arc<crate::config::Settings> {
        self.settings.get()
    }

    fn default_namespace(&self) -> Namespace {
        self.settings().default_namespace.clone()
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        match req.uri().path() {
            "/healthz" => return plain(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" if self.draining.load(std::sync::atomic::Ordering::Relaxed) => {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            }
            "/readyz" => return plain(StatusCode::OK, "text/plain", "ready\n".into()),
            "/metrics" => {
                let text = METRICS.render(self.mirror.flights.len());
                return plain(StatusCode::OK, "text/plain; version=0.0.4", text);
            }
            _ => {}
        }
        let head = req.method() == Method::HEAD;
        let route = route(req.uri().path());
        let kind = match &route {
            Ok(Route::Manifest(..)) => "manifest",
            Ok(Route::Blob(..)) => "blob",
            _ => "other",
        };
        let ns = namespace_param(req.uri().query())
            .map(|ns| ns.unwrap_or_else(|| self.default_namespace()));
        // Requests with an invalid ns are counted under the default one.
        let ns_label = ns
            .as_ref()
            .ok()
            .cloned()
            .unwrap_or_else(|| self.default_namespace());
        let resp = match self.dispatch(route, ns, &req).await {
            Ok(resp) => resp,
            Err(e) => {
                if e.status().is_server_error() || matches!(e, ServeError::Loop) {
                    tracing::warn!(error = %e, "request failed");
                } else {
                    tracing::debug!(error = %e, "request refused");
                }
                e.into_response(head)
            }
        };
        let status = resp.status();
        METRICS.requests.inc(&[
            ("ns", ns_label.as_str()),
            ("kind", kind),
            ("status", status.as_str()),
        ]);
        resp
    }

    async fn dispatch(
        &self,
        route: Result<Route, ServeError>,
        ns: Result<Namespace, ServeError>,
        req: &Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ServeError> {
        let route = route?;
        let own = crate::upstream::via();
        if req.headers().get_all(http::header::VIA).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|hop| hop.trim() == own))
        }) {
            return Err(ServeError::Loop);
        }
        let method = req.method();
        if method != Method::GET && method != Method::HEAD {
            return Err(ServeError::MethodNotAllowed(method.clone()));
        }
        let ns = ns?;
        tracing::Span::current().record("ns", tracing::field::display(&ns));
        match route {
            Route::Base => {
                let body = Bytes::from_static(b"{}");
                Response::builder()
                    .status(StatusCode::OK)
                    .header(API_VERSION.0, API_VERSION.1)
                    .header(CONTENT_TYPE, "application/json")
                    .header(CONTENT_LENGTH, body.len())
                    .body(full(if method == Method::HEAD {
                        Bytes::new()
                    } else {
                        body
                    }))
                    .map_err(|e| ServeError::Internal(e.to_string()))
            }
            Route::Manifest(name, reference) => {
                self.mirror
                    .manifest(method, ns, name, reference, req.headers())
                    .await
            }
            Route::Blob(name, digest) => {
                let zero_copy = req.extensions().get::<Arc<crate::sendfile::Mappings>>();
                self.mirror
                    .blob(method, ns, name, digest, req.headers(), zero_copy)
                    .await
            }
        }
    }
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and
/// gives in-flight requests up to [`DRAIN_TIMEOUT`] to finish.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let stream = crate::sendfile::Stream::new(stream);
                let mappings = stream.mappings();
                let app = app.clone();
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let app = app.clone();
                    req.extensions_mut().insert(mappings.clone());
                    async move { Ok::<_, Infallible>(log_request(&app, req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    app.draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("drain timed out; closing remaining connections"),
    }
}

async fn log_request(
    app: &App,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), ns = tracing::field::Empty, %peer);
    async move {
        let resp = app.handle(req).await;
        tracing::info!(
            status = resp.status().as_u16(),
            length = content_length(resp.headers()),
            ms = start.elapsed().as_millis() as u64,
            "served"
        );
        resp
    }
    .instrument(span)
    .await
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
