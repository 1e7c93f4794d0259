//! The integration-test harness: an in-process daemon on 127.0.0.1:0 with a
//! temporary hosts.d and cache, an HTTP client, fake registries, and
//! launchers for the real components (the nodemirror binary, Debian's
//! docker-registry, containerd).

pub mod fake;
pub mod image;
pub mod real;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use nodemirror::config::cluster::ClusterSettings;
use nodemirror::config::{CacheSettings, MinFree, ServerSettings, Settings, UpstreamSettings};
use sha2::Digest as _;
use tempfile::TempDir;
use tokio::sync::oneshot;

pub fn sha256(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// `len` bytes of seeded noise (xorshift): gzip cannot shrink them.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let input = b.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// A response as the test client saw it. `body` is an error when the
/// transfer was cut short.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Result<Bytes, String>,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn bytes(&self) -> &Bytes {
        self.body.as_ref().expect("body was cut short")
    }

    /// The OCI error code of a JSON error body.
    pub fn error_code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(self.bytes()).expect("JSON error body");
        v["errors"][0]["code"].as_str().unwrap_or("").to_string()
    }
}

pub async fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    try_request(method, url, headers)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Like [`request`], but a connection failure is an `Err`.
pub async fn try_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let work = async {
        let resp = client
            .request(b.body(Empty::new()).unwrap())
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(60), work)
        .await
        .expect("request took over 60s")
}

/// A plain-HTTP client; its pool keeps connections alive between requests.
pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GETs `url` on `client` (with a `Range` header if given), streaming: the
/// status, and the body's length and digest, or the error that cut it.
/// `stop_after` drops the connection after that many bytes.
pub async fn stream_on(
    client: &HttpClient,
    url: &str,
    range: Option<&str>,
    stop_after: Option<u64>,
) -> (StatusCode, Result<(u64, String), String>) {
    let mut req = Request::get(url);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = match client.request(req.body(Empty::new()).unwrap()).await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, Err(e.to_string())),
    };
    let status = resp.status();
    let mut body = resp.into_body();
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
            Err(_) => return (status, Err("stalled".into())),
            Ok(None) => break,
            Ok(Some(Err(e))) => return (status, Err(e.to_string())),
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    n += d.len() as u64;
                    h.update(&d);
                }
            }
        }
        if stop_after.is_some_and(|s| n >= s) {
            return (status, Err("stopped by the client".into()));
        }
    }
    (
        status,
        Ok((n, format!("sha256:{}", hex::encode(h.finalize())))),
    )
}

pub async fn get(url: &str) -> Reply {
    request(Method::GET, url, &[]).await
}

/// True once `url` answers 200.
pub async fn answers_ok(url: &str) -> bool {
    let attempt = try_request(Method::GET, url, &[]);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(r)) if r.status == StatusCode::OK
    )
}

/// Polls `check` until it holds or `limit` passes.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `blobs/sha256/<2 hex>/<hex>` under a cache directory.
pub fn blob_path(cache: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// A request made by another local user with curl (`runuser -u USER`):
/// the status and the body (empty for HEAD).
pub fn curl_as(user: &str, method: &str, url: &str) -> (u16, Vec<u8>) {
    const MARK: &[u8] = b"\n--status:";
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", user, "--", "curl", "-s", "--max-time", "60"]);
    if method == "HEAD" {
        cmd.arg("--head").args(["-o", "/dev/null"]);
    } else {
        cmd.args(["-X", method]);
    }
    let out = cmd
        .args(["-w", "\n--status:%{http_code}", url])
        .output()
        .expect("runuser and curl");
    let at = out
        .stdout
        .windows(MARK.len())
        .rposition(|w| w == MARK)
        .unwrap_or_else(|| panic!("curl as {user}: {}", String::from_utf8_lossy(&out.stderr)));
    let status = String::from_utf8_lossy(&out.stdout[at + MARK.len()..])
        .trim()
        .parse()
        .unwrap();
    let mut body = out.stdout[..at].to_vec();
    if method == "HEAD" {
        body.clear();
    }
    (status, body)
}

/// Records in a cache that `digest` came through the namespace `ns`, as
/// the daemon does when it stores content (for tests that put files into
/// a cache by hand).
pub fn write_origin(cache: &Path, digest: &str, ns: &str) {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let dir = cache.join("origins/sha256").join(&hex[..2]);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(hex), format!("{ns}\n")).unwrap();
}

/// Runs the nodemirror tool (`cache ...`, `pin ...`) on `cache`, beside a
/// daemon listening on `listen`, with no configuration file: its exit code
/// and what it printed.
pub fn tool(listen: &str, cache: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args(args)
        .args(["--config", "/dev/null", "--listen", listen, "--cache-dir"])
        .arg(cache)
        .output()
        .unwrap();
    (out.status.code(), output_text(&out))
}

/// What a program printed, standard output then standard error.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Files in a cache's tmp/ folder.
pub fn temp_files(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("tmp")).map_or(0, |d| d.count())
}

/// Polls a plain condition until it holds or `limit` passes.
pub async fn wait_until(what: &str, limit: Duration, check: impl Fn() -> bool) {
    wait_for(what, limit, || {
        let ok = check();
        async move { ok }
    })
    .await;
}

/// A loopback port that was free a moment ago, for external processes.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Upstream settings short enough for tests to see fallbacks quickly.
pub fn quick_upstream() -> UpstreamSettings {
    UpstreamSettings {
        connect_timeout: Duration::from_secs(1),
        first_byte_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        backoff: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        ..UpstreamSettings::default()
    }
}

/// Cache settings for tests: no eviction, tags trusted for an hour.
pub fn test_cache() -> CacheSettings {
    CacheSettings {
        max_size: None,
        min_free: MinFree::Bytes(0),
        tag_ttl: Duration::from_secs(3600),
        gc_interval: Duration::from_secs(3600),
        verify_rate: 0,
        max_blob_size: 64 << 30,
    }
}

/// Writes `<dir>/<ns>/hosts.toml` for each entry.
pub fn write_hosts(dir: &Path, hosts: &[(&str, String)]) {
    for (ns, text) in hosts {
        let d = dir.join(ns);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), text).unwrap();
    }
}

/// The daemon, in-process, on 127.0.0.1:0.
pub struct Daemon {
    pub addr: SocketAddr,
    pub cache_dir: PathBuf,
    /// hosts.d, cache and auth file; removed on drop.
    _dir: TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
pub struct DaemonBuilder {
    hosts: Vec<(String, String)>,
    auth: Option<String>,
    cache: Option<CacheSettings>,
    cache_dir: Option<PathBuf>,
    upstream: Option<UpstreamSettings>,
    cluster: Option<ClusterSettings>,
    server: Option<ServerSettings>,
}

impl DaemonBuilder {
    /// Adds `hosts.d/<ns>/hosts.toml` with `text`.
    pub fn hosts(mut self, ns: &str, text: impl Into<String>) -> Self {
        self.hosts.push((ns.into(), text.into()));
        self
    }

    /// An auth file in docker config.json format.
    pub fn auth(mut self, json: impl Into<String>) -> Self {
        self.auth = Some(json.into());
        self
    }

    /// Cache settings; by default tags never expire within a test and
    /// nothing is evicted.
    pub fn cache(mut self, c: CacheSettings) -> Self {
        self.cache = Some(c);
        self
    }

    /// Upstream settings other than [`quick_upstream`].
    pub fn upstream(mut self, u: UpstreamSettings) -> Self {
        self.upstream = Some(u);
        self
    }

    /// Who may pull private namespaces (default: root only).
    pub fn server(mut self, s: ServerSettings) -> Self {
        self.server = Some(s);
        self
    }

    /// Cluster mode with these settings.
    pub fn cluster(mut self, c: ClusterSettings) -> Self {
        self.cluster = Some(c);
        self
    }

    /// Uses an existing cache directory (to test restarts).
    pub fn cache_dir(mut self, dir: &Path) -> Self {
        self.cache_dir = Some(dir.to_path_buf());
        self
    }

    pub async fn start(self) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let hosts_dir = dir.path().join("hosts.d");
        std::fs::create_dir_all(&hosts_dir).unwrap();
        let hosts: Vec<(&str, String)> = self
            .hosts
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        write_hosts(&hosts_dir, &hosts);
        let auth_file = self.auth.map(|json| {
            let p = dir.path().join("auth.json");
            std::fs::write(&p, json).unwrap();
            p
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cache_dir = self.cache_dir.unwrap_or_else(|| dir.path().join("cache"));
        let settings = Settings {
            listen: addr,
            cache_dir: cache_dir.clone(),
            hosts_dir,
            default_namespace: "docker.io".parse().unwrap(),
            auth_file,
            upstream: self.upstream.unwrap_or_else(quick_upstream),
            cache: self.cache.unwrap_or_else(test_cache),
            // Root, and whoever runs the tests: the test client is a
            // local user allowed to pull private namespaces.
            server: self.server.unwrap_or_else(|| ServerSettings {
                allowed_uids: vec![0, nix::unistd::getuid().as_raw()],
                allowed_gids: Vec::new(),
                ..Default::default()
            }),
            cluster: self.cluster,
            origin: None,
        };
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            nodemirror::run(settings, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("daemon failed to start");
        });
        let d = Daemon {
            addr,
            cache_dir,
            _dir: dir,
            shutdown: Some(tx),
            task: Some(task),
        };
        let url = d.url("/v2/");
        wait_for("daemon to answer /v2/", Duration::from_secs(10), || {
            answers_ok(&url)
        })
        .await;
        d
    }
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Where the blob with `digest` lives once cached.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.cache_dir, digest)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A TCP front for `upstream` that sends at most `rate` bytes per second on
/// each connection towards the client (as CDNs and object storage cap each
/// stream); requests pass unchanged, `Range` included. Stops with the task.
pub async fn capped_front(
    upstream: SocketAddr,
    rate: u64,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    front(upstream, rate, Default::default()).await
}

/// A TCP front for `upstream` that counts the bytes it sends towards the
/// client: what the upstream wrote.
pub async fn counted_front(
    upstream: SocketAddr,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (addr, task) = front(upstream, u64::MAX, counted.clone()).await;
    (addr, counted, task)
}

async fn front(
    upstream: SocketAddr,
    rate: u64,
    counted: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                    let _ = sw.shutdown().await;
                });
                let mut buf = vec![0u8; 16 << 10];
                let start = std::time::Instant::now();
                let mut sent = 0u64;
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n as u64;
                    counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                let _ = cw.shutdown().await;
                up.abort();
            });
        }
    });
    (addr, task)
}

/// A DNS server on loopback UDP that answers A queries for any name with
/// the addresses set (AAAA and others: no records). TTL 1 s.
pub struct Dns {
    pub addr: SocketAddr,
    answers: std::sync::Arc<parking_lot::Mutex<Vec<std::net::Ipv4Addr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    pub async fn start() -> Dns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answers: std::sync::Arc<parking_lot::Mutex<Vec<std::net::Ipv4Addr>>> =
            std::sync::Arc::default();
        let shared = answers.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let reply = dns_reply(&buf[..n], &shared.lock());
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Dns {
            addr,
            answers,
            task,
        }
    }

    pub fn set(&self, ips: &[std::net::Ipv4Addr]) {
        *self.answers.lock() = ips.to_vec();
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The answer to one query: the question echoed, then an A record per
/// address if it asked for A.
fn dns_reply(q: &[u8], ips: &[std::net::Ipv4Addr]) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += 1 + *q.get(i)? as usize;
    }
    let question_end = i + 5;
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let answers: &[std::net::Ipv4Addr] = if qtype == 1 { ips } else { &[] };
    let mut r = Vec::new();
    r.extend_from_slice(&q[..2]);
    r.extend_from_slice(&[0x85, 0x80, 0, 1]);
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(q.get(12..question_end)?);
    for ip in answers {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}
