//! A small in-process registry for fault injection: serves manifests and
//! blobs from memory, and on demand answers with an error status, hangs,
//! lies about content, demands Bearer or Basic auth, redirects blobs to a
//! storage host, or stalls mid-body. Every request it sees is recorded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::Mutex;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::image::Image;

/// How the fake registry misbehaves. The default is a correct registry.
#[derive(Default, Clone)]
pub struct Behaviour {
    /// Answer every registry request with this status.
    pub status: Option<StatusCode>,
    /// With `status`, send this `Retry-After`.
    pub retry_after: Option<String>,
    /// Never answer.
    pub hang: bool,
    /// Serve content with one byte changed.
    pub lie: bool,
    /// Demand a Bearer token from `/token`; `Some(creds)` there demands
    /// Basic credentials at the token endpoint too.
    pub bearer: Option<Option<(String, String)>>,
    /// Demand these Basic credentials.
    pub basic: Option<(String, String)>,
    /// The token service's answer, instead of a sane one (the Bearer
    /// token it demands is still `fake-token`).
    pub token_body: Option<String>,
    /// The realm a Bearer challenge names, instead of this fake's `/token`.
    pub realm: Option<String>,
    /// Redirect blob requests to `<base>/storage/<digest>`.
    pub redirect_blobs: Option<String>,
    /// Leave out Docker-Content-Digest on manifest HEAD responses.
    pub no_head_digest: bool,
    /// Send this many body bytes, then stall forever.
    pub stall_after: Option<usize>,
    /// Pause this long between chunks of a generated blob.
    pub chunk_delay: Option<std::time::Duration>,
    /// End blob bodies after this many bytes (the connection breaks: the
    /// declared length is not reached) ...
    pub truncate_after: Option<usize>,
    /// ... for this many responses (all when `None`) ...
    pub truncate_times: Option<usize>,
    /// ... to requests for a bounded range (`bytes=A-B`) only.
    pub truncate_pieces_only: bool,
    /// Answer ranged requests with the whole content (200), while still
    /// saying `Accept-Ranges: bytes`.
    pub ignore_range: bool,
    /// Leave out `Accept-Ranges: bytes` on blobs.
    pub no_accept_ranges: bool,
    /// Send each blob answer at most this many bytes per second (a
    /// per-connection cap, as CDNs and object storage have).
    pub rate: Option<u64>,
    /// Send generated blobs without a length (chunked).
    pub no_length: bool,
    /// Wait this long before answering a blob request (a registry far
    /// away, or slow to look a blob up).
    pub answer_delay: Option<std::time::Duration>,
}

/// A request the fake saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    /// When it came in.
    pub at: std::time::Instant,
}

#[derive(Clone)]
enum Content {
    Bytes {
        media_type: String,
        body: Bytes,
    },
    /// `chunk` repeated `count` times, generated on the fly.
    Repeated {
        chunk: Bytes,
        count: usize,
    },
}

impl Content {
    fn len(&self) -> usize {
        match self {
            Content::Bytes { body, .. } => body.len(),
            Content::Repeated { chunk, count } => chunk.len() * count,
        }
    }
}

#[derive(Default)]
struct Shared {
    behaviour: Mutex<Behaviour>,
    /// Keyed by the path after `/v2/`, e.g. `lib/app/manifests/v1`.
    content: Mutex<HashMap<String, Content>>,
    seen: Mutex<Vec<Seen>>,
    truncated: std::sync::atomic::AtomicUsize,
    /// Blob body bytes handed to the connections, by path.
    blob_bytes: Mutex<HashMap<String, Arc<std::sync::atomic::AtomicU64>>>,
}

pub struct Fake {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type FakeBody = BoxBody<Bytes, Infallible>;

impl Fake {
    pub async fn start(behaviour: Behaviour) -> Fake {
        Self::start_at("127.0.0.1", behaviour).await
    }

    /// Listens on a free port of another loopback address (127.0.0.5).
    pub async fn start_at(ip: &str, behaviour: Behaviour) -> Fake {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        Self::serve(listener, behaviour, None)
    }

    /// Serves over TLS with `acceptor`.
    pub async fn start_tls(behaviour: Behaviour, acceptor: tokio_rustls::TlsAcceptor) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, behaviour, Some(acceptor))
    }

    fn serve(
        listener: TcpListener,
        behaviour: Behaviour,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Fake {
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        *shared.behaviour.lock() = behaviour;
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(handle(&s, addr, req).await) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Fake { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A registry that sends every blob answer at `rate` bytes a second.
    pub async fn trickling(rate: u64) -> Fake {
        Fake::start(Behaviour {
            rate: Some(rate),
            ..Behaviour::default()
        })
        .await
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.shared.behaviour.lock());
    }

    pub fn put_blob(&self, repo: &str, body: &[u8]) -> String {
        let digest = super::sha256(body);
        self.put(
            format!("{repo}/blobs/{digest}"),
            Content::Bytes {
                media_type: "application/octet-stream".into(),
                body: Bytes::copy_from_slice(body),
            },
        );
        digest
    }

    /// A blob of `chunk` repeated `count` times, never held whole in memory.
    pub fn put_repeated_blob(&self, repo: &str, digest: &str, chunk: Bytes, count: usize) {
        self.put(
            format!("{repo}/blobs/{digest}"),
            Content::Repeated { chunk, count },
        );
    }

    pub fn put_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        body: &[u8],
    ) -> String {
        let digest = super::sha256(body);
        let content = Content::Bytes {
            media_type: media_type.into(),
            body: Bytes::copy_from_slice(body),
        };
        if let Some(tag) = tag {
            self.put(format!("{repo}/manifests/{tag}"), content.clone());
        }
        self.put(format!("{repo}/manifests/{digest}"), content);
        digest
    }

    pub fn push_image(&self, repo: &str, tag: &str, image: &Image) {
        for blob in image.blobs() {
            self.put_blob(repo, blob);
        }
        self.put_manifest(repo, Some(tag), &image.media_type, &image.manifest);
    }

    /// Serves `body` as `media_type` at `/v2/<path>` (a referrers list, say).
    pub fn put_at(&self, path: &str, media_type: &str, body: &[u8]) {
        self.put(
            path.to_string(),
            Content::Bytes {
                media_type: media_type.into(),
                body: Bytes::copy_from_slice(body),
            },
        );
    }

    fn put(&self, key: String, content: Content) {
        self.shared.content.lock().insert(key, content);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().clone()
    }

    /// Blob body bytes this fake has sent (what the daemon's fetches cost
    /// the upstream).
    pub fn blob_bytes(&self) -> u64 {
        self.blob_bytes_of("")
    }

    /// The same for blob paths that contain `needle` (a digest).
    pub fn blob_bytes_of(&self, needle: &str) -> u64 {
        let map = self.shared.blob_bytes.lock();
        map.iter()
            .filter(|(k, _)| k.contains(needle))
            .map(|(_, n)| n.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Requests whose path (without query) contains `needle`.
    pub fn hits(&self, needle: &str) -> usize {
        self.seen()
            .iter()
            .filter(|s| s.uri.split('?').next().unwrap_or("").contains(needle))
            .count()
    }
}

fn status(code: StatusCode, headers: &[(&str, String)]) -> Response<FakeBody> {
    let body = format!(r#"{{"errors":[{{"code":"FAKE","message":"{code}"}}]}}"#);
    let mut b = Response::builder().status(code);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Full::new(Bytes::from(body)).boxed()).unwrap()
}

async fn handle(s: &Shared, addr: SocketAddr, req: Request<Incoming>) -> Response<FakeBody> {
    s.seen.lock().push(Seen {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
        at: std::time::Instant::now(),
    });
    let b = s.behaviour.lock().clone();
    let path = req.uri().path().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let basic = |(u, p): &(String, String)| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };

    if path == "/token" {
        if let Some(Some(creds)) = &b.bearer {
            if auth != basic(creds) {
                return status(StatusCode::UNAUTHORIZED, &[]);
            }
        }
        let body = b
            .token_body
            .clone()
            .unwrap_or_else(|| r#"{"token":"fake-token","expires_in":300}"#.to_string());
        return Response::new(Full::new(Bytes::from(body)).boxed());
    }
    if b.hang {
        std::future::pending::<()>().await;
    }
    if let Some(code) = b.status {
        let headers: Vec<(&str, String)> = b
            .retry_after
            .iter()
            .map(|r| ("retry-after", r.clone()))
            .collect();
        return status(code, &headers);
    }
    let key = if let Some(digest) = path.strip_prefix("/storage/") {
        let found = s
            .content
            .lock()
            .keys()
            .find(|k| k.ends_with(&format!("/blobs/{digest}")))
            .cloned();
        match found {
            Some(k) => k,
            None => return status(StatusCode::NOT_FOUND, &[]),
        }
    } else {
        let Some(rest) = path.strip_prefix("/v2/") else {
            return status(StatusCode::NOT_FOUND, &[]);
        };
        if let Some(Some(_)) | Some(None) = &b.bearer {
            if auth != "Bearer fake-token" {
                let repo = rest.split("/manifests/").next().unwrap_or("");
                let repo = repo.split("/blobs/").next().unwrap_or("");
                let realm = b
                    .realm
                    .clone()
                    .unwrap_or_else(|| format!("http://{addr}/token"));
                let challenge = format!(
                    r#"Bearer realm="{realm}",service="fake",scope="repository:{repo}:pull""#
                );
                return status(StatusCode::UNAUTHORIZED, &[("www-authenticate", challenge)]);
            }
        }
        if let Some(creds) = &b.basic {
            if auth != basic(creds) {
                let challenge = r#"Basic realm="fake""#.to_string();
                return status(StatusCode::UNAUTHORIZED, &[("www-authenticate", challenge)]);
            }
        }
        if let (Some(base), Some(i)) = (&b.redirect_blobs, rest.find("/blobs/")) {
            let digest = &rest[i + "/blobs/".len()..];
            let location = format!("{base}/storage/{digest}");
            return status(StatusCode::TEMPORARY_REDIRECT, &[("location", location)]);
        }
        rest.to_string()
    };
    let Some(content) = s.content.lock().get(&key).cloned() else {
        return status(StatusCode::NOT_FOUND, &[]);
    };
    if let Some(d) = b.answer_delay.filter(|_| key.contains("/blobs/")) {
        tokio::time::sleep(d).await;
    }
    let digest = key.rsplit('/').next().unwrap_or("").to_string();
    let digest = if digest.starts_with("sha256:") {
        digest
    } else if let Content::Bytes { body, .. } = &content {
        super::sha256(body)
    } else {
        String::new()
    };
    let media_type = match &content {
        Content::Bytes { media_type, .. } => media_type.clone(),
        Content::Repeated { .. } => "application/octet-stream".into(),
    };
    let total = content.len();
    // Generated blobs are sent whole.
    let ranged = !b.ignore_range && matches!(content, Content::Bytes { .. });
    let range = parse_range(req.headers(), total).filter(|_| ranged);
    let (code, start, end) = match range {
        Some((a, z)) => (StatusCode::PARTIAL_CONTENT, a, z),
        None => (StatusCode::OK, 0, total),
    };
    let mut r = Response::builder()
        .status(code)
        .header("content-type", media_type);
    let chunked = b.no_length && matches!(content, Content::Repeated { .. });
    if !chunked {
        r = r.header("content-length", end - start);
    }
    if code == StatusCode::PARTIAL_CONTENT {
        r = r.header(
            "content-range",
            format!("bytes {start}-{}/{total}", end - 1),
        );
    }
    if key.contains("/blobs/") && matches!(content, Content::Bytes { .. }) && !b.no_accept_ranges {
        r = r.header("accept-ranges", "bytes");
    }
    let head = req.method() == Method::HEAD;
    if !(head && b.no_head_digest && key.contains("/manifests/")) {
        r = r.header("docker-content-digest", digest);
    }
    if head {
        return r.body(Full::new(Bytes::new()).boxed()).unwrap();
    }
    let body: FakeBody = match content {
        Content::Bytes { body, .. } => {
            let mut v = body[start..end].to_vec();
            if b.lie && !v.is_empty() {
                v[0] ^= 0xff;
            }
            let bounded = req
                .headers()
                .get("range")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| !v.ends_with('-'));
            let truncate = b.truncate_after.filter(|_| {
                key.contains("/blobs/")
                    && (bounded || !b.truncate_pieces_only)
                    && b.truncate_times.is_none_or(|n| {
                        s.truncated
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                            < n
                    })
            });
            match (b.stall_after, truncate) {
                (Some(n), _) => Stall(Some(Bytes::from(v[..n.min(v.len())].to_vec()))).boxed(),
                (None, truncate) if b.rate.is_some() && key.contains("/blobs/") => {
                    let limit = truncate.unwrap_or(v.len()).min(v.len());
                    Paced {
                        data: Bytes::from(v).slice(..limit),
                        short: limit < end - start,
                        per_chunk: std::time::Duration::from_secs_f64(
                            PACED_CHUNK as f64 / b.rate.unwrap_or(1) as f64,
                        ),
                        sleep: None,
                    }
                    .boxed()
                }
                (None, Some(n)) => Truncated(
                    Some(Bytes::from(v[..n.min(v.len())].to_vec())),
                    Box::pin(tokio::time::sleep(std::time::Duration::from_millis(100))),
                )
                .boxed(),
                (None, None) => Full::new(Bytes::from(v)).boxed(),
            }
        }
        // Whole blobs only (they do not say Accept-Ranges).
        Content::Repeated { chunk, count } => Repeat {
            chunk,
            left: count,
            delay: b.chunk_delay,
            sleep: None,
            sized: !b.no_length,
        }
        .boxed(),
    };
    let body = if key.contains("/blobs/") {
        Counted {
            inner: body,
            sent: s.blob_bytes.lock().entry(key.clone()).or_default().clone(),
        }
        .boxed()
    } else {
        body
    };
    r.body(body).unwrap()
}

/// A body that counts the bytes it hands out.
struct Counted {
    inner: FakeBody,
    sent: Arc<std::sync::atomic::AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.sent
                    .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        polled
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn parse_range(h: &HeaderMap, total: usize) -> Option<(usize, usize)> {
    let v = h.get("range")?.to_str().ok()?.strip_prefix("bytes=")?;
    let (a, z) = v.split_once('-')?;
    let a: usize = a.parse().ok()?;
    // As RFC 9110 says: a last byte past the end means the end.
    let z = if z.is_empty() {
        total
    } else {
        (z.parse::<usize>().ok()? + 1).min(total)
    };
    (a < z).then_some((a, z))
}

/// Sends one chunk, then nothing ever again.
struct Stall(Option<Bytes>);

impl Body for Stall {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
            None => Poll::Pending,
        }
    }
}

/// Sends one chunk, pauses (so it goes out), then ends short of the
/// declared length: the connection breaks mid-body.
struct Truncated(Option<Bytes>, Pin<Box<tokio::time::Sleep>>);

impl Body for Truncated {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(b) = self.0.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        std::future::Future::poll(self.1.as_mut(), cx).map(|_| None)
    }
}

/// A pause of `d` before a body's next chunk, kept in `slot` across polls:
/// ready once it has passed, and then cleared for the next chunk.
fn pause(
    slot: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    d: std::time::Duration,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = slot.get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
    if std::future::Future::poll(sleep.as_mut(), cx).is_pending() {
        return Poll::Pending;
    }
    *slot = None;
    Poll::Ready(())
}

/// Bytes a [`Paced`] body sends at a time.
const PACED_CHUNK: usize = 32 << 10;

/// `data` in chunks with a pause before each (a rate cap); ending short
/// of the declared length when `short` (the connection breaks).
struct Paced {
    data: Bytes,
    short: bool,
    per_chunk: std::time::Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Paced {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.data.is_empty() && !self.short {
            return Poll::Ready(None);
        }
        let d = self.per_chunk;
        if pause(&mut self.sleep, d, cx).is_pending() {
            return Poll::Pending;
        }
        if self.data.is_empty() {
            return Poll::Ready(None); // short: the paused end breaks it
        }
        let n = PACED_CHUNK.min(self.data.len());
        let chunk = self.data.split_to(n);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

/// `chunk` repeated `left` times, optionally with a pause before each.
struct Repeat {
    chunk: Bytes,
    left: usize,
    delay: Option<std::time::Duration>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Tells its length (else it goes out chunked).
    sized: bool,
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if let Some(d) = self.delay {
            if pause(&mut self.sleep, d, cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact((self.chunk.len() * self.left) as u64)
        } else {
            SizeHint::default()
        }
    }
}
