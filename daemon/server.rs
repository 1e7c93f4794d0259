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

mod route;

pub use route::{parse, PullRequest, Route, Rules};

use crate::oci::{content_length, full, ResponseBody, ServeError, API_VERSION};

use crate::metrics::METRICS;
use crate::mirror::{List, Mirror, Pull};
use crate::snapshot::{Live, Snapshot};

/// How long in-flight requests may take to finish after shutdown begins.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server needs to answer requests.
pub struct App {
    pub mirror: Mirror,
    /// The configuration in force (replaced by a reload).
    pub live: Live,
    /// Set once shutdown begins: /readyz answers 503.
    pub draining: std::sync::atomic::AtomicBool,
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
            "/readyz" => {
                // Saturated: cached content is still served, but new
                // upstream fetches wait or are refused.
                return match self.mirror.limits.saturated() {
                    Some(why) => plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("saturated: {why}\n"),
                    ),
                    None => plain(StatusCode::OK, "text/plain", "ready\n".into()),
                };
            }
            "/metrics" => {
                let text = METRICS.render(self.mirror.flights.len());
                return plain(StatusCode::OK, "text/plain; version=0.0.4", text);
            }
            _ => {}
        }
        let snap = self.live.load();
        let (labels, parsed) = {
            let configured = |name: &str| snap.upstream.configures(name);
            let rules = Rules {
                default_ns: &snap.settings.default_namespace,
                configured: &configured,
                own_via: crate::upstream::via(),
            };
            let incoming = route::Incoming {
                method: req.method(),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
            };
            parse(incoming, &rules)
        };
        let head = req.method() == Method::HEAD;
        let resp = match parsed {
            Ok(pull) => self.dispatch(snap, pull, &req).await,
            Err(e) => Err(e),
        };
        let resp = resp.unwrap_or_else(|e| {
            let detail = e.detail().unwrap_or_default();
            if e.status().is_server_error() || matches!(e, ServeError::Loop) {
                tracing::warn!(error = %e, detail, "request failed");
            } else {
                tracing::debug!(error = %e, detail, "request refused");
            }
            e.into_response(head)
        });
        METRICS.requests.inc(&[
            ("ns", labels.ns.as_str()),
            ("kind", labels.kind),
            ("status", resp.status().as_str()),
        ]);
        resp
    }

    async fn dispatch(
        &self,
        snap: Arc<Snapshot>,
        request: PullRequest,
        req: &Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ServeError> {
        tracing::Span::current().record("ns", tracing::field::display(&request.ns));
        let pull = Pull {
            snap,
            ns: request.ns,
            path: req.uri().path(),
            query: req.uri().query(),
            head: request.head,
            headers: req.headers(),
            zero_copy: req.extensions().get::<Arc<crate::sendfile::Mappings>>(),
        };
        match request.route {
            Route::Base => {
                let body = Bytes::from_static(b"{}");
                Response::builder()
                    .status(StatusCode::OK)
                    .header(API_VERSION.0, API_VERSION.1)
                    .header(CONTENT_TYPE, "application/json")
                    .header(CONTENT_LENGTH, body.len())
                    .body(full(if pull.head { Bytes::new() } else { body }))
                    .map_err(ServeError::internal)
            }
            Route::Manifest(name, reference) => self.mirror.manifest(&pull, name, reference).await,
            Route::Blob(name, digest) => self.mirror.blob(&pull, name, digest).await,
            Route::Tags(name) => self.mirror.list(&pull, List::Tags(name)).await,
            Route::Referrers(name, digest) => {
                self.mirror.list(&pull, List::Referrers(name, digest)).await
            }
            Route::Catalog => self.mirror.list(&pull, List::Catalog).await,
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
        let mut resp = app.handle(req).await;
        // Nothing the mirror sends is to be sniffed into something else.
        resp.headers_mut().insert(
            http::header::X_CONTENT_TYPE_OPTIONS,
            http::HeaderValue::from_static("nosniff"),
        );
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
