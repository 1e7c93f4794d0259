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

mod bounds;
mod caller;
mod route;

pub use bounds::Connections;
use bounds::{Admit, SendTimeout};
pub use caller::Caller;
pub use route::{parse, PullRequest, Route, Rules};

use crate::oci::{content_length, full, ResponseBody, ServeError, API_VERSION};

use crate::cluster::relay::Relay;
use crate::cluster::{Cluster, PeerRole, PEER_HEADER};
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
    /// Client connections open, and the peer port's.
    pub connections: Connections,
    pub peer_connections: Connections,
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
                // upstream fetches wait or are refused; or new
                // connections get a quick 503.
                let saturated =
                    (self.connections.saturated()).or_else(|| self.mirror.limits.saturated());
                return match saturated {
                    Some(why) => plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("saturated: {why}\n"),
                    ),
                    None => plain(StatusCode::OK, "text/plain", "ready\n".into()),
                };
            }
            "/metrics" => {
                let text = METRICS.render(&self.scrape().await);
                return plain(StatusCode::OK, "text/plain; version=0.0.4", text);
            }
            _ => {}
        }
        match req.uri().path() {
            "/cluster/status" => return self.cluster_status(),
            "/cache/gc" => return crate::admin::gc(self, req).await,
            "/cache/import" => return crate::archive::serve_import(self, req).await,
            "/cluster/preheat" => return crate::admin::preheat(self, req).await,
            _ => {}
        }
        let arrived = std::time::Instant::now();
        let snap = self.live.load();
        let (labels, parsed) = parse_request(&snap, &req, crate::upstream::via());
        let head = req.method() == Method::HEAD;
        let resp = match parsed {
            Ok(pull) => match self.may_use(&snap, &pull, &req).await {
                Ok(()) => self.dispatch(snap.clone(), pull, &req, None).await,
                Err(e) => Err(e),
            },
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
        // Namespaces named by requests alone are counted together, so no
        // caller can grow the metrics without bound.
        let ns = crate::metrics::ns_label(&snap, labels.ns.as_str());
        METRICS.requests.inc(&[
            ("ns", ns),
            ("kind", labels.kind),
            ("status", resp.status().as_str()),
        ]);
        let timing = [
            ("ns", ns),
            ("kind", labels.kind),
            ("status_class", crate::metrics::status_class(resp.status())),
        ];
        METRICS.first_byte.observe_since(&timing, arrived);
        let done = METRICS.request_duration.with(&timing);
        resp.map(|body| crate::metrics::timed(body, arrived, done))
    }

    /// A private namespace (credentials or `private = true`) is served only
    /// to local clients that `[server]` allows, identified by the owner of
    /// their socket.
    async fn may_use(
        &self,
        snap: &Snapshot,
        pull: &PullRequest,
        req: &Request<Incoming>,
    ) -> Result<(), ServeError> {
        if matches!(pull.route, Route::Base) || !snap.upstream.is_private(&pull.ns) {
            return Ok(());
        }
        let caller = req.extensions().get::<Arc<Caller>>();
        let allowed = match caller {
            Some(c) => c.allowed(&snap.settings.server).await,
            None => false,
        };
        if allowed {
            return Ok(());
        }
        let uid = match caller {
            Some(c) => c.uid().await,
            None => None,
        };
        tracing::info!(namespace = %pull.ns, ?uid,
            "private namespace refused to a user not in [server] allowed_uids/allowed_gids");
        Err(ServeError::Private(pull.ns.to_string()))
    }

    async fn dispatch(
        &self,
        snap: Arc<Snapshot>,
        request: PullRequest,
        req: &Request<Incoming>,
        peer: Option<PeerRole>,
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
            peer,
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

/// The request parsed once, with its metric labels.
/// `own_via` detects loops; the peer port passes one that never matches
/// (peers' requests never go on to peers, and in-process test clusters
/// share one `Via`).
fn parse_request(
    snap: &Snapshot,
    req: &Request<Incoming>,
    own_via: &str,
) -> (route::Labels, Result<PullRequest, ServeError>) {
    let configured = |name: &str| snap.upstream.configures(name);
    let rules = Rules {
        default_ns: &snap.settings.default_namespace,
        configured: &configured,
        own_via,
    };
    let incoming = route::Incoming {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    parse(incoming, &rules)
}

impl App {
    /// A request on the cluster's peer port: blobs and manifests by digest
    /// of shared namespaces, asked as owner or holder; nothing else.
    pub async fn handle_peer(
        &self,
        req: Request<Incoming>,
        from: Option<std::net::SocketAddr>,
    ) -> Response<ResponseBody> {
        let role = PeerRole::from_header(req.headers().get(PEER_HEADER));
        let path = req.uri().path().to_string();
        let snap = self.live.load();
        let (_, parsed) = parse_request(&snap, &req, "\0");
        let head = req.method() == Method::HEAD;
        let resp = match parsed {
            Ok(pull) => {
                let digest_only = matches!(
                    &pull.route,
                    Route::Blob(..) | Route::Manifest(_, crate::reference::Reference::Digest(_))
                );
                if !digest_only {
                    Err(ServeError::NotShared(
                        "peers are answered blobs and manifests by digest only".into(),
                    ))
                } else if !snap.upstream.shareable(&pull.ns) {
                    Err(ServeError::NotShared(format!(
                        "namespace {} is private (credentials or `private = true`)",
                        pull.ns
                    )))
                } else {
                    match self.relay(&pull.route, &req, from, head) {
                        Some(Relay::SendOn(to)) => Ok(send_on(&req, to)),
                        Some(Relay::Serve(guard)) => self
                            .dispatch(snap.clone(), pull, &req, Some(role))
                            .await
                            .map(|resp| {
                                resp.map(|body| {
                                    crate::oci::boxed(crate::cluster::relay::Guarded {
                                        body,
                                        guard,
                                    })
                                })
                            }),
                        None => self.dispatch(snap.clone(), pull, &req, Some(role)).await,
                    }
                }
            }
            Err(e) => Err(e),
        };
        let resp = resp.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "peer request refused");
            e.into_response(head)
        });
        let len = content_length(resp.headers());
        if resp.status().is_success() && !head {
            if let Some(len) = len {
                METRICS.peer_bytes.add(&[("direction", "sent")], len);
            }
        }
        tracing::info!(peer = ?from, role = ?role, path, status = resp.status().as_u16(),
            length = len.unwrap_or(0), "peer request served");
        let role = match role {
            PeerRole::Owner => "owner",
            PeerRole::Holder => "holder",
        };
        METRICS
            .peer_requests
            .inc(&[("role", role), ("status", resp.status().as_str())]);
        resp
    }

    /// Whether a peer's GET of a blob is served here or sent on to a peer
    /// receiving it from here ([`crate::cluster::relay`]); `None`: not a
    /// request the tree applies to.
    fn relay(
        &self,
        route: &Route,
        req: &Request<Incoming>,
        from: Option<std::net::SocketAddr>,
        head: bool,
    ) -> Option<Relay> {
        let (Route::Blob(_, digest), Some(from), Some(cluster)) =
            (route, from, self.mirror.cluster.as_ref())
        else {
            return None;
        };
        if head
            || req
                .headers()
                .contains_key(crate::cluster::relay::NO_RELAY_HEADER)
        {
            return None;
        }
        Some(cluster.relays.decide(digest, from))
    }

    /// `/cluster/status`: the members as this node sees them, each one's
    /// health, and this node's share of the digests.
    /// What the gauges say now; the filesystem is asked off the async
    /// workers.
    async fn scrape(&self) -> crate::metrics::Scrape {
        let snap = self.live.load();
        let root = self.mirror.store.root().to_path_buf();
        let cache = snap.settings.cache.clone();
        let disk = tokio::task::spawn_blocking(move || {
            let s = nix::sys::statvfs::statvfs(&root).ok()?;
            let frag = s.fragment_size() as u64;
            let size = (s.blocks() as u64).saturating_mul(frag);
            let free = (s.blocks_available() as u64).saturating_mul(frag);
            let min_free = crate::cache::Limits::from_settings(&cache, &root)
                .map(|l| l.min_free)
                .unwrap_or(0);
            Some((free, size, min_free))
        })
        .await
        .ok()
        .flatten();
        let store = &self.mirror.store;
        let peers = self.mirror.cluster.as_ref().map(|c| {
            let others: Vec<_> = c
                .members()
                .iter()
                .copied()
                .filter(|m| *m != c.me())
                .collect();
            let down = others
                .iter()
                .filter(|m| {
                    let key = crate::cluster::peer_base(**m);
                    self.mirror.upstream.health.backing_off_for(&key).is_some()
                })
                .count();
            (others.len() - down, down)
        });
        crate::metrics::Scrape {
            in_flight: self.mirror.flights.len(),
            slots: self.mirror.limits.slots(),
            peers,
            max_size: snap.settings.cache.max_size.unwrap_or(0),
            min_free: disk.map_or(0, |d| d.2),
            fs: disk.map(|d| (d.0, d.1)),
            stored: store.counted().then(|| store.stored_bytes()),
        }
    }

    fn cluster_status(&self) -> Response<ResponseBody> {
        let Some(c) = &self.mirror.cluster else {
            return plain(
                StatusCode::NOT_FOUND,
                "application/json",
                "{\"cluster\":false}\n".into(),
            );
        };
        let members: Vec<_> = c
            .members()
            .iter()
            .map(|m| {
                let key = crate::cluster::peer_base(*m);
                let health = if *m == c.me() {
                    "self".to_string()
                } else {
                    match self.mirror.upstream.health.backing_off_for(&key) {
                        Some(left) => format!("failing (retried in {}s)", left.as_secs().max(1)),
                        None => "ok".into(),
                    }
                };
                serde_json::json!({ "address": m.to_string(), "health": health })
            })
            .collect();
        let body = serde_json::json!({
            "cluster": true,
            "self": c.me().to_string(),
            "listen": c.listen.to_string(),
            "members": members,
            "ownership_share": (c.ownership_share() * 1000.0).round() / 1000.0,
        });
        plain(StatusCode::OK, "application/json", format!("{body:#}\n"))
    }
}

/// A `307` to the same path on member `to`'s peer port.
fn send_on(req: &Request<Incoming>, to: std::net::SocketAddr) -> Response<ResponseBody> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    tracing::debug!(%to, path, "sending a peer on to a node receiving the blob from here");
    Response::builder()
        .status(StatusCode::TEMPORARY_REDIRECT)
        .header(http::header::LOCATION, format!("https://{to}{path}"))
        .header(CONTENT_LENGTH, 0)
        .body(full(Bytes::new()))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Serves the cluster's peer port: mutual TLS against the cluster's CA,
/// and a client certificate that names a current member's address; then
/// [`App::handle_peer`] for each request.
pub async fn serve_peers(listener: TcpListener, app: Arc<App>, cluster: Arc<Cluster>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = app.live.load().settings.server.clone();
        // Peers get no quick answers past the cap: they fall back to the
        // upstream on a refused connection as on any failure.
        let Admit::Serve(permit) = app.peer_connections.admit(server.max_connections) else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = SendTimeout::new(stream, server.send_timeout);
        let (app, cluster) = (app.clone(), cluster.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let acceptor = tokio_rustls::TlsAcceptor::from(cluster.server_config());
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                .await
            {
                Ok(Ok(tls)) => tls,
                // Connected and closed without a byte: a TCP check (the
                // Kubernetes marker's readiness probe), not a peer.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(%peer, "peer port: closed before a TLS handshake");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "peer TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let Some(cert) = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned())
            else {
                return;
            };
            if !cluster.names_member(&cert) {
                tracing::warn!(%peer, "peer certificate names no current member; connection closed");
                return;
            }
            // Membership is checked again for every request: a member
            // removed by a reload or by DNS loses its open connections'
            // access at once.
            let cert = Arc::new(cert);
            let service = service_fn(move |req: Request<Incoming>| {
                let (app, cluster, cert) = (app.clone(), cluster.clone(), cert.clone());
                async move {
                    if !cluster.names_member(&cert) {
                        tracing::warn!(%peer, "peer is no longer a member; its request refused and its connection closed");
                        let mut resp = ServeError::NotShared(
                            "this client is no longer a member of the cluster".into(),
                        )
                        .into_response(req.method() == Method::HEAD);
                        resp.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                        return Ok::<_, Infallible>(resp);
                    }
                    let from = cluster.member_named(&cert);
                    Ok::<_, Infallible>(app.handle_peer(req, from).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "peer connection ended with an error");
            }
        });
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
                let server = app.live.load().settings.server.clone();
                let permit = match app.connections.admit(server.max_connections) {
                    Admit::Serve(p) => p,
                    Admit::Overflow(p) => {
                        tokio::spawn(overflow(stream, app.clone(), p));
                        continue;
                    }
                    Admit::Wait => {
                        if let Some(p) = app.connections.overflow().await {
                            tokio::spawn(overflow(stream, app.clone(), p));
                        }
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let local = stream.local_addr().unwrap_or(peer);
                let caller = Arc::new(Caller::new(peer, local));
                let stream = crate::sendfile::Stream::new(stream);
                let mappings = stream.mappings();
                let stream = SendTimeout::new(stream, server.send_timeout);
                let app = app.clone();
                let service = service_fn(move |mut req: Request<Incoming>| {
                    let app = app.clone();
                    req.extensions_mut().insert(mappings.clone());
                    req.extensions_mut().insert(caller.clone());
                    async move { Ok::<_, Infallible>(log_request(&app, req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(stream), service);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _permit = permit;
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

/// How long a connection past the cap may take to send its request.
const OVERFLOW_READ: Duration = Duration::from_secs(2);

/// A connection past `max_connections`: `/healthz` and `/readyz` are
/// answered as usual, anything else gets `503` with `Retry-After`; then
/// it is closed.
async fn overflow(
    stream: tokio::net::TcpStream,
    app: Arc<App>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _permit = permit;
    let service = service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        async move {
            let resp = match req.uri().path() {
                "/healthz" | "/readyz" => app.handle(req).await,
                _ => {
                    let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"too many connections to the mirror; retry later"}]}"#;
                    Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .header(CONTENT_TYPE, "application/json")
                        .header(CONTENT_LENGTH, body.len())
                        .header(http::header::RETRY_AFTER, "1")
                        .body(full(Bytes::from_static(body.as_bytes())))
                        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
                }
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(OVERFLOW_READ)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(OVERFLOW_READ * 2, conn).await;
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
