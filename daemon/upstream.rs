//! The upstream side: for each namespace an ordered chain of endpoints
//! ([`routes`]: hosts.d mirrors in file order, then the server), and the
//! logic that tries them in turn — authenticating, following redirects, timing out —
//! and falls back to the next before any byte reaches the client.

pub mod auth;
pub mod client;
pub mod health;
pub mod routes;

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, LOCATION, RANGE, USER_AGENT as USER_AGENT_HEADER, WWW_AUTHENTICATE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use url::Url;

use crate::config::hosts;
use crate::config::{ConfigError, UpstreamSettings};
use crate::oci::{Content, ServeError, Verdict};
use crate::reference::{Namespace, Repository};
use auth::{Auth, Credentials};
use client::ClientPool;
use health::Health;
pub use routes::{Endpoint, Routes};

pub const USER_AGENT: &str = concat!("nodemirror/", env!("CARGO_PKG_VERSION"));

/// `Via` value naming this process: a request that comes back carrying it
/// went round a loop (hosts.d pointing at this very daemon).
pub fn via() -> &'static str {
    static VIA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VIA.get_or_init(|| {
        // Unique enough per process and start: pid and start time.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("1.1 nodemirror-{:x}-{:x}", std::process::id(), nanos)
    })
}

/// Redirect hops followed before giving up on an endpoint.
const MAX_REDIRECTS: usize = 5;

/// What the mirror asks of an upstream.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub method: Method,
    pub namespace: Namespace,
    pub repository: Repository,
    /// `manifests/<ref>` or `blobs/<digest>`.
    pub tail: String,
    /// What the endpoint must be able to do: resolve for tags, pull else.
    pub needs_resolve: bool,
    pub accept: Option<HeaderValue>,
    pub range: Option<HeaderValue>,
}

/// Why one endpoint could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("no response headers within {0:?}")]
    Timeout(Duration),
    #[error("not found (404)")]
    NotFound,
    #[error("access denied ({0})")]
    Denied(StatusCode),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("authentication: {0}")]
    Auth(auth::AuthError),
    #[error("redirect: {0}")]
    Redirect(String),
    #[error("invalid response: {0}")]
    Invalid(String),
}

impl From<auth::AuthError> for AttemptError {
    /// Refused credentials are an answer about access, like a 401 from the
    /// registry itself; anything else is a fault of the auth service.
    fn from(e: auth::AuthError) -> Self {
        match e {
            auth::AuthError::Refused { status, .. } => AttemptError::Denied(status),
            auth::AuthError::NoCredentials => AttemptError::Denied(StatusCode::UNAUTHORIZED),
            other => AttemptError::Auth(other),
        }
    }
}

impl AttemptError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AttemptError::Connect(_) => "connect",
            AttemptError::Timeout(_) => "timeout",
            AttemptError::NotFound => "not_found",
            AttemptError::Denied(_) => "denied",
            AttemptError::Status(s) if s.as_u16() == 429 => "rate_limited",
            AttemptError::Status(s) if s.is_server_error() => "server_error",
            AttemptError::Status(_) => "status",
            AttemptError::Auth(_) => "auth",
            AttemptError::Redirect(_) => "redirect",
            AttemptError::Invalid(_) => "invalid",
        }
    }

    /// Whether the endpoint itself is at fault and should be skipped for a
    /// while. A 404 or a refusal is an answer, not a failure.
    pub fn marks_unhealthy(&self) -> bool {
        !matches!(self, AttemptError::NotFound | AttemptError::Denied(_))
    }
}

/// Every endpoint of a chain was tried and none could serve.
#[derive(Debug)]
pub struct Exhausted {
    pub attempts: Vec<(String, AttemptError)>,
}

impl Exhausted {
    /// True when every endpoint answered that it does not have the content
    /// (or may not show it), rather than failing: the client gets a 404.
    pub fn all_not_found(&self) -> bool {
        self.attempts
            .iter()
            .all(|(_, e)| matches!(e, AttemptError::NotFound | AttemptError::Denied(_)))
    }
}

impl Exhausted {
    /// The error a client gets when no endpoint could serve `what`.
    pub fn into_error(self, what: Content) -> ServeError {
        let verdict = if self.all_not_found() {
            Verdict::NotFound
        } else {
            Verdict::Failed
        };
        ServeError::Upstream {
            what,
            verdict,
            detail: self.to_string().into(),
        }
    }
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.attempts.is_empty() {
            return f.write_str("no endpoint is configured for this request");
        }
        for (i, (ep, e)) in self.attempts.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{ep}: {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Exhausted {}

/// The upstream client of the daemon: routes, health and auth state.
pub struct Upstream {
    routes: RwLock<Arc<Routes>>,
    pool: std::sync::Mutex<ClientPool>,
    health: Health,
    auth: Auth,
    auth_file: RwLock<Option<std::path::PathBuf>>,
    settings: RwLock<UpstreamSettings>,
}

/// Renders an error with its sources, as hyper's errors hide the cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

fn load_credentials(auth_file: Option<&Path>) -> Result<Credentials, Vec<ConfigError>> {
    match auth_file {
        Some(p) => Credentials::load(p).map_err(|(line, message)| {
            vec![ConfigError {
                path: p.into(),
                line,
                message,
            }]
        }),
        None => Ok(Credentials::default()),
    }
}

impl Upstream {
    /// Loads hosts.d and the credentials file; errors name file and line.
    pub fn new(
        hosts_dir: &Path,
        auth_file: Option<&Path>,
        settings: UpstreamSettings,
    ) -> Result<Upstream, Vec<ConfigError>> {
        let credentials = load_credentials(auth_file)?;
        let mut pool = ClientPool::load();
        let routes = Routes::build(
            &hosts::load_dir(hosts_dir)?,
            &mut pool,
            settings.connect_timeout,
        )?;
        Ok(Upstream {
            routes: RwLock::new(Arc::new(routes)),
            pool: std::sync::Mutex::new(pool),
            health: Health::new(settings.backoff, settings.backoff_max),
            auth: Auth::new(credentials),
            auth_file: RwLock::new(auth_file.map(Path::to_path_buf)),
            settings: RwLock::new(settings),
        })
    }

    /// Re-reads hosts.d and the credentials file and takes new timeouts;
    /// on any error nothing changes and the configuration in force stays.
    pub fn reload(
        &self,
        hosts_dir: &Path,
        auth_file: Option<&Path>,
        settings: &UpstreamSettings,
    ) -> Result<(), Vec<ConfigError>> {
        let dir = hosts::load_dir(hosts_dir)?;
        let credentials = load_credentials(auth_file)?;
        let routes = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            Routes::build(&dir, &mut pool, settings.connect_timeout)?
        };
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
        self.auth.replace_credentials(credentials);
        *self.auth_file.write().unwrap_or_else(|p| p.into_inner()) =
            auth_file.map(Path::to_path_buf);
        self.health
            .set_limits(settings.backoff, settings.backoff_max);
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings.clone();
        Ok(())
    }

    /// The timeouts in force.
    pub fn settings(&self) -> UpstreamSettings {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The endpoints to try for `req`, capable ones only: healthy first in
    /// configured order, then those backing off as a last resort.
    pub fn plan(&self, req: &UpstreamRequest) -> Vec<Arc<Endpoint>> {
        let routes = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (mut ready, backing_off): (Vec<_>, Vec<_>) = routes
            .chain(&req.namespace)
            .into_iter()
            .filter(|ep| {
                if req.needs_resolve {
                    ep.capabilities.resolve
                } else {
                    ep.capabilities.pull
                }
            })
            .partition(|ep| !self.health.backing_off(ep.key()));
        ready.extend(backing_off);
        ready
    }

    /// Tries each endpoint of the plan until one answers with success and
    /// `accept` takes the response. `accept` may still refuse it (a digest
    /// mismatch, say), which counts as that endpoint failing.
    pub async fn first_success<T, F, Fut>(
        &self,
        req: &UpstreamRequest,
        mut accept: F,
    ) -> Result<(T, Arc<Endpoint>), Exhausted>
    where
        F: FnMut(Arc<Endpoint>, Response<Incoming>) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let mut attempts = Vec::new();
        let plan = self.plan(req);
        let last = plan.len().saturating_sub(1);
        for (i, ep) in plan.into_iter().enumerate() {
            let result = match self.attempt(&ep, req).await {
                Ok(resp) => accept(ep.clone(), resp).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => {
                    self.health.success(ep.key());
                    return Ok((v, ep));
                }
                Err(e) => {
                    let m = &crate::metrics::METRICS;
                    m.upstream_errors
                        .inc(&[("endpoint", ep.key()), ("reason", e.reason())]);
                    if i < last {
                        m.fallbacks.inc(&[("endpoint", ep.key())]);
                    }
                    if e.marks_unhealthy() {
                        let wait = self.health.failure(ep.key());
                        tracing::warn!(endpoint = ep.key(), origin = %ep.origin, error = %e,
                            backoff = ?wait, "endpoint failed; trying the next");
                    } else {
                        tracing::debug!(endpoint = ep.key(), error = %e, "endpoint has no such content");
                    }
                    attempts.push((ep.key().to_string(), e));
                }
            }
        }
        Err(Exhausted { attempts })
    }

    /// Marks an endpoint failed after its response was accepted, e.g. when
    /// its body turned out not to match the digest.
    pub fn report_failure(&self, ep: &Endpoint, why: &str) {
        crate::metrics::METRICS
            .upstream_errors
            .inc(&[("endpoint", ep.key()), ("reason", "transfer")]);
        let wait = self.health.failure(ep.key());
        tracing::warn!(endpoint = ep.key(), error = why, backoff = ?wait, "endpoint failed mid-transfer");
    }

    /// One request to one endpoint: authenticates on a challenge and
    /// follows redirects. Only a 2xx response is returned as success.
    pub async fn attempt(
        &self,
        ep: &Endpoint,
        req: &UpstreamRequest,
    ) -> Result<Response<Incoming>, AttemptError> {
        let url = ep.url_for(req);
        let auth_key = format!("{} {}", ep.key(), req.repository);
        let mut authorization = self.auth.cached(&auth_key);
        let mut answered_challenge = false;
        loop {
            let resp = self
                .send(ep, &req.method, &url, req, authorization.as_ref())
                .await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !answered_challenge {
                let Some(challenge) = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                else {
                    return Err(AttemptError::Denied(status));
                };
                self.auth.forget(&auth_key);
                let header = self
                    .auth
                    .answer(
                        &auth_key,
                        &ep.client,
                        &ep.base,
                        req.repository.as_str(),
                        challenge,
                        self.settings().first_byte_timeout,
                    )
                    .await?;
                authorization = Some(header);
                answered_challenge = true;
                continue;
            }
            if is_redirect(status) {
                return self.follow_redirects(ep, req, &url, resp).await;
            }
            return classify(resp);
        }
    }

    /// Follows `Location` hops (to blob storage, typically) without the
    /// registry's Authorization header, which must not leak elsewhere.
    async fn follow_redirects(
        &self,
        ep: &Endpoint,
        req: &UpstreamRequest,
        from: &Url,
        mut resp: Response<Incoming>,
    ) -> Result<Response<Incoming>, AttemptError> {
        let mut current = from.clone();
        for _ in 0..MAX_REDIRECTS {
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    AttemptError::Redirect(format!("{} without Location", resp.status()))
                })?;
            let next = current
                .join(location)
                .map_err(|e| AttemptError::Redirect(format!("bad Location {location:?}: {e}")))?;
            if !matches!(next.scheme(), "http" | "https") {
                return Err(AttemptError::Redirect(format!(
                    "unsupported Location {next}"
                )));
            }
            tracing::debug!(from = %current, to = %next, "following redirect");
            resp = self.send(ep, &req.method, &next, req, None).await?;
            current = next;
            let status = resp.status();
            if !is_redirect(status) {
                return classify(resp);
            }
        }
        Err(AttemptError::Redirect(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    async fn send(
        &self,
        ep: &Endpoint,
        method: &Method,
        url: &Url,
        req: &UpstreamRequest,
        authorization: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, AttemptError> {
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(url.as_str())
            .header(USER_AGENT_HEADER, USER_AGENT)
            .header(http::header::VIA, via());
        let same_host = url.host_str() == ep.base.host_str() && url.port() == ep.base.port();
        if same_host {
            for (name, value) in &ep.headers {
                builder = builder.header(name, value);
            }
        }
        if let Some(a) = &req.accept {
            builder = builder.header(ACCEPT, a);
        }
        if let Some(r) = &req.range {
            builder = builder.header(RANGE, r);
        }
        if let Some(a) = authorization {
            builder = builder.header(AUTHORIZATION, a);
        }
        let request = builder
            .body(Empty::<Bytes>::new())
            .map_err(|e| AttemptError::Invalid(format!("building request: {e}")))?;
        let timeout = self.settings().first_byte_timeout;
        match tokio::time::timeout(timeout, ep.client.request(request)).await {
            Err(_) => Err(AttemptError::Timeout(timeout)),
            Ok(Err(e)) => Err(AttemptError::Connect(error_chain(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

/// A 3xx pointing elsewhere (304 is an answer, not a redirect).
fn is_redirect(status: StatusCode) -> bool {
    status.is_redirection() && status != StatusCode::NOT_MODIFIED
}

fn classify(resp: Response<Incoming>) -> Result<Response<Incoming>, AttemptError> {
    let status = resp.status();
    match status {
        s if s.is_success() => Ok(resp),
        StatusCode::NOT_FOUND => Err(AttemptError::NotFound),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(AttemptError::Denied(status)),
        s => Err(AttemptError::Status(s)),
    }
}
