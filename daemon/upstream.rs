//! The upstream side: for each namespace an ordered chain of endpoints
//! ([`routes`]: hosts.d mirrors in file order, then the server), and the
//! logic that tries them in turn — authenticating, following redirects, timing out —
//! and falls back to the next before any byte reaches the client.

pub mod admission;
pub mod auth;
pub mod client;
pub mod health;
pub mod proxy;
pub mod routes;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, LOCATION, USER_AGENT as USER_AGENT_HEADER, WWW_AUTHENTICATE,
};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use parking_lot::Mutex;
use url::Url;

use crate::config::hosts;
use crate::config::{ConfigError, ImplicitPolicy, UpstreamSettings};
use crate::oci::{Content, ServeError, Verdict};
use crate::reference::{Namespace, Repository};
use auth::{Auth, Credentials, TokenKey, TokenService};
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

/// On a peer's answer: the member that serves it, when the peer asked
/// sent this node on to it (`cluster::relay`), and that member's key in
/// the health state (its peer endpoints' base, which the probe marks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    pub member: std::net::SocketAddr,
    pub key: String,
}

impl Relayed {
    /// The member a peer's `Location` names.
    fn at(url: &Url) -> Option<Relayed> {
        let ip = url.host_str()?.trim_matches(['[', ']']).parse().ok()?;
        let member = std::net::SocketAddr::new(ip, url.port()?);
        Some(Relayed {
            member,
            key: url.join("/v2").ok()?.to_string(),
        })
    }
}

/// Redirect hops followed before giving up on an endpoint.
const MAX_REDIRECTS: usize = 5;

/// What the mirror asks of an upstream.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub method: Method,
    pub namespace: Namespace,
    /// `None` for registry-wide requests (`_catalog`).
    pub repository: Option<Repository>,
    /// `manifests/<ref>`, `blobs/<digest>`, `tags/list`, `referrers/<digest>`, `_catalog`.
    pub tail: String,
    /// Query parameters passed on (`n`, `last`, `artifactType`).
    pub query: Vec<(String, String)>,
    /// What the endpoint must be able to do: resolve for tags, pull else.
    pub needs_resolve: bool,
    pub accept: Option<HeaderValue>,
    /// `Range`: part of a blob (a resumed or parallel fetch).
    pub range: Option<ByteRange>,
    /// Cluster mode: peers asked before and after the namespace's chain.
    pub peers: Option<Arc<PeerPlan>>,
}

/// The cluster's peers for one request: the digest's owner before the
/// upstreams, other nodes that may hold it after them.
#[derive(Debug, Default)]
pub struct PeerPlan {
    pub first: Vec<Arc<Endpoint>>,
    pub last: Vec<Arc<Endpoint>>,
}

/// Bytes `start..end` of a blob (`end: None`: to its end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl ByteRange {
    /// The `Range` header's value (its end is inclusive).
    pub fn header(&self) -> String {
        match self.end {
            Some(end) => format!("bytes={}-{}", self.start, end.saturating_sub(1)),
            None => format!("bytes={}-", self.start),
        }
    }
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
    /// 401 or 403 to a request that carried credentials: the registry
    /// refused them (wrong, expired, or without access to this content).
    #[error("the registry refused the credentials ({0})")]
    CredentialsRefused(StatusCode),
    #[error("answered {0}")]
    Status(StatusCode),
    /// 429: not to be asked again for `retry_after`.
    #[error("rate limited (429); retry after {}s", retry_after.as_secs())]
    Throttled {
        retry_after: Duration,
        /// The registry's error body, passed on when every endpoint is
        /// throttled.
        body: Option<Bytes>,
    },
    #[error("authentication: {0}")]
    Auth(auth::AuthError),
    #[error("redirect: {0}")]
    Redirect(String),
    #[error("invalid response: {0}")]
    Invalid(String),
    /// A range was asked for and the whole content came (allowed by HTTP:
    /// an answer, not a failure).
    #[error("answered a range with the whole content")]
    Unranged,
    /// Not contacted: the admission policy or a non-public address.
    #[error("refused: {0}")]
    Refused(String),
}

impl From<auth::AuthError> for AttemptError {
    /// Refused credentials are an answer about access, like a 401 from the
    /// registry itself; anything else is a fault of the auth service.
    fn from(e: auth::AuthError) -> Self {
        match e {
            auth::AuthError::Refused { status, .. } => AttemptError::Denied(status),
            auth::AuthError::NoCredentials => AttemptError::Denied(StatusCode::UNAUTHORIZED),
            auth::AuthError::NotPublic(why) => AttemptError::Refused(why),
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
            AttemptError::CredentialsRefused(_) => "credentials_refused",
            AttemptError::Throttled { .. } => "rate_limited",
            AttemptError::Status(s) if s.is_server_error() => "server_error",
            AttemptError::Status(_) => "status",
            AttemptError::Auth(_) => "auth",
            AttemptError::Redirect(_) => "redirect",
            AttemptError::Invalid(_) => "invalid",
            AttemptError::Unranged => "unranged",
            AttemptError::Refused(_) => "refused",
        }
    }

    /// Whether the endpoint itself is at fault and should be skipped for a
    /// while. A 404 or a refusal is an answer, not a failure; a 429 has
    /// its own wait (throttle state).
    pub fn marks_unhealthy(&self) -> bool {
        !matches!(
            self,
            AttemptError::NotFound
                | AttemptError::Denied(_)
                | AttemptError::CredentialsRefused(_)
                | AttemptError::Throttled { .. }
                | AttemptError::Refused(_)
                | AttemptError::Unranged
        )
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
        self.attempts.iter().all(|(_, e)| {
            matches!(
                e,
                AttemptError::NotFound | AttemptError::Denied(_) | AttemptError::Refused(_)
            )
        })
    }

    /// True when no endpoint was contacted because the policy refused them.
    fn all_refused(&self) -> bool {
        !self.attempts.is_empty()
            && self
                .attempts
                .iter()
                .all(|(_, e)| matches!(e, AttemptError::Refused(_)))
    }

    /// The error a client gets when no endpoint could serve `what`: 404
    /// when every endpoint said so, 429 when every endpoint is throttled
    /// (with the soonest `Retry-After` and that endpoint's error body),
    /// else 503.
    pub fn into_error(self, what: Content) -> ServeError {
        let throttled = self
            .attempts
            .iter()
            .map(|(_, e)| match e {
                AttemptError::Throttled { retry_after, body } => Some((*retry_after, body)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .filter(|t| !t.is_empty())
            .and_then(|t| t.into_iter().min_by_key(|(wait, _)| *wait));
        let refused_credentials = self
            .attempts
            .iter()
            .any(|(_, e)| matches!(e, AttemptError::CredentialsRefused(_)));
        let answers_only = self.attempts.iter().all(|(_, e)| {
            matches!(
                e,
                AttemptError::NotFound
                    | AttemptError::Denied(_)
                    | AttemptError::Refused(_)
                    | AttemptError::CredentialsRefused(_)
            )
        });
        let (verdict, upstream_body) = match throttled {
            Some((retry_after, body)) => (Verdict::Throttled { retry_after }, body.clone()),
            None if self.all_refused() => (Verdict::Refused, None),
            // Refused credentials are no "not found": the client is told.
            None if refused_credentials && answers_only => (Verdict::CredentialsRefused, None),
            None if self.all_not_found() => (Verdict::NotFound, None),
            None => (Verdict::Failed, None),
        };
        ServeError::Upstream {
            what,
            verdict,
            detail: self.to_string().into(),
            upstream_body,
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

/// The upstream client of the daemon: what outlives a reload (endpoint
/// health, cached tokens, shared TLS clients). What a reload replaces is
/// in [`Config`], which every call takes.
pub struct Upstream {
    /// Clients are shared across reloads, so connections stay pooled.
    pool: Mutex<ClientPool>,
    pub health: Health,
    auth: Auth,
}

/// The upstream configuration of one snapshot: routes, credentials and
/// timeouts, read together by a request from its start to its end.
pub struct Config {
    routes: Routes,
    credentials: Credentials,
    pub settings: UpstreamSettings,
    /// Distinguishes snapshots: tokens obtained under one are not used
    /// under the next (the credentials may have changed).
    generation: u64,
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

impl Config {
    /// Whether hosts.d has a folder named `name`.
    pub fn configures(&self, name: &str) -> bool {
        self.routes.configures(name)
    }

    /// Whether the namespace is private: its hosts.toml says `private =
    /// true` or one of its endpoints has credentials. Its content goes
    /// only to the local users allowed by `[server]`, and only under a
    /// namespace it came through.
    pub fn is_private(&self, ns: &Namespace) -> bool {
        self.routes.sharing(ns).private
            || self.routes.chain(ns).iter().any(|ep| {
                !ep.is_peer() && self.credentials.configured_for(ns, &ep.base, !ep.mirror)
            })
    }

    /// Cluster mode: whether the namespace's content may go to peers: it
    /// is public, or its hosts.toml says `share = true`.
    pub fn shareable(&self, ns: &Namespace) -> bool {
        self.routes.sharing(ns).share || !self.is_private(ns)
    }

    /// Whether every endpoint of the namespace was configured by the
    /// operator (hosts.d): then a registry's word that it has a digest (a
    /// HEAD) is believed. Not for a registry named by a request alone,
    /// which anyone may run.
    pub fn vouches_for(&self, ns: &Namespace) -> bool {
        !self.routes.chain(ns).iter().any(|ep| ep.implicit)
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Upstream {
        Upstream {
            pool: Mutex::new(ClientPool::load()),
            health: Health::default(),
            auth: Auth::default(),
        }
    }

    /// Reads hosts.d and the credentials file into a configuration;
    /// errors name file and line.
    pub fn configure(
        &self,
        hosts_dir: &Path,
        auth_file: Option<&Path>,
        settings: &UpstreamSettings,
        generation: u64,
    ) -> Result<Config, Vec<ConfigError>> {
        let dir = hosts::load_dir(hosts_dir)?;
        let credentials = load_credentials(auth_file)?;
        let implicit_any = settings.implicit_namespaces == ImplicitPolicy::Any;
        let proxy = proxy::ProxyChoice::from_env()
            .overridden(settings.proxy.as_deref(), settings.no_proxy.as_deref());
        proxy.check().map_err(|e| {
            vec![ConfigError {
                path: "HTTPS_PROXY/HTTP_PROXY/ALL_PROXY in the environment".into(),
                line: 0,
                message: e,
            }]
        })?;
        let mut pool = self.pool.lock();
        pool.set_proxy(proxy);
        let routes = Routes::build(&dir, &mut pool, settings.connect_timeout, implicit_any)?;
        Ok(Config {
            routes,
            credentials,
            settings: settings.clone(),
            generation,
        })
    }

    /// The endpoints to try for `req`, capable ones only: healthy first in
    /// configured order, then those backing off as a last resort.
    pub fn plan(&self, cfg: &Config, req: &UpstreamRequest) -> Vec<Arc<Endpoint>> {
        let chain = cfg.routes.chain(&req.namespace);
        let chain = match &req.peers {
            Some(p) => p
                .first
                .iter()
                .cloned()
                .chain(chain)
                .chain(p.last.iter().cloned())
                .collect(),
            None => chain,
        };
        let (mut ready, backing_off): (Vec<_>, Vec<_>) = chain
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
        cfg: &Config,
        req: &UpstreamRequest,
        mut accept: F,
    ) -> Result<(T, Arc<Endpoint>), Exhausted>
    where
        F: FnMut(Arc<Endpoint>, Response<Incoming>) -> Fut,
        Fut: Future<Output = Result<T, AttemptError>>,
    {
        let mut attempts = Vec::new();
        let plan = self.plan(cfg, req);
        let last = plan.len().saturating_sub(1);
        for (i, ep) in plan.into_iter().enumerate() {
            // A throttled endpoint is not asked again before its
            // Retry-After: its state answers for it.
            if let Some((retry_after, body)) = self.health.throttled(ep.key()) {
                tracing::debug!(
                    endpoint = ep.key(),
                    ?retry_after,
                    "endpoint throttled; not asked"
                );
                attempts.push((
                    ep.key().to_string(),
                    AttemptError::Throttled { retry_after, body },
                ));
                continue;
            }
            if let Some(why) = admit(cfg, &ep, &req.namespace) {
                tracing::warn!(endpoint = ep.key(), namespace = %req.namespace, reason = %why,
                    "not contacted: namespace without a hosts.d folder refused by policy");
                attempts.push((ep.key().to_string(), AttemptError::Refused(why)));
                continue;
            }
            let result = match self.attempt(cfg, &ep, req).await {
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
                        .inc(&[("endpoint", ep.label()), ("reason", e.reason())]);
                    if i < last {
                        m.fallbacks.inc(&[("endpoint", ep.label())]);
                    }
                    if let AttemptError::Throttled { retry_after, body } = &e {
                        let wait = self.health.throttle(ep.key(), *retry_after, body.clone());
                        tracing::warn!(endpoint = ep.key(), retry_after = ?wait,
                            "endpoint rate limited us (429); trying the next");
                    } else if let AttemptError::CredentialsRefused(status) = &e {
                        m.credentials_refused.inc(&[("endpoint", ep.label())]);
                        tracing::warn!(registry = %req.namespace, endpoint = ep.key(),
                            status = status.as_u16(),
                            "the upstream registry refused the credentials in the credentials file");
                    } else if e.marks_unhealthy() {
                        let wait = self.health.failure(ep.key(), &cfg.settings);
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
    pub fn report_failure(&self, cfg: &Config, ep: &Endpoint, why: &str) {
        crate::metrics::METRICS
            .upstream_errors
            .inc(&[("endpoint", ep.label()), ("reason", "transfer")]);
        let wait = self.health.failure(ep.key(), &cfg.settings);
        tracing::warn!(endpoint = ep.key(), error = why, backoff = ?wait, "endpoint failed mid-transfer");
    }

    /// One request to one endpoint: authenticates on a challenge and
    /// follows redirects. Only a 2xx response is returned as success.
    pub async fn attempt(
        &self,
        cfg: &Config,
        ep: &Endpoint,
        req: &UpstreamRequest,
    ) -> Result<Response<Incoming>, AttemptError> {
        let url = ep.url_for(req);
        let auth_key = TokenKey {
            generation: cfg.generation,
            endpoint: ep.key().to_string(),
            repository: req.repository.clone(),
        };
        let mut authorization = self.auth.cached(&auth_key);
        // Peers are members of the cluster: they get no registry's
        // credentials.
        let source = (!ep.is_peer())
            .then(|| cfg.credentials.source(&req.namespace, &ep.base, !ep.mirror))
            .flatten();
        // Whether what is sent carries credentials: a 401 or 403 then means
        // the registry refused them.
        let mut with_credentials = authorization.is_some() && source.is_some();
        let mut answered_challenge = false;
        loop {
            let resp = self
                .send(cfg, ep, &url, req, authorization.as_ref(), ep.public_only)
                .await?;
            // Redirects and token services named by an endpoint reached at
            // a public address must be public too.
            let onward_public = !reached_privately(&resp);
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
                let credential = self.auth.credential(cfg.generation, source.clone()).await?;
                with_credentials = credential.is_some();
                let (header, life) = self
                    .auth
                    .answer(
                        auth_key.clone(),
                        credential.as_ref(),
                        &ep.base,
                        challenge,
                        TokenService {
                            client: ep.client_for(onward_public),
                            public_only: onward_public,
                            timeout: cfg.settings.first_byte_timeout,
                        },
                    )
                    .await
                    .map_err(|e| match e {
                        auth::AuthError::Refused { status, .. } if with_credentials => {
                            AttemptError::CredentialsRefused(status)
                        }
                        e => e.into(),
                    })?;
                if let Some(life) = life {
                    self.auth.helper_yielded(cfg.generation, &source, life);
                }
                authorization = Some(header);
                answered_challenge = true;
                continue;
            }
            if is_redirect(status) {
                return self
                    .follow_redirects(cfg, ep, req, &url, resp, onward_public)
                    .await;
            }
            return match classify(resp, cfg).await {
                Err(AttemptError::Denied(status)) if with_credentials => {
                    Err(AttemptError::CredentialsRefused(status))
                }
                other => other,
            };
        }
    }

    /// Follows `Location` hops (to blob storage, typically) without the
    /// registry's Authorization header, which must not leak elsewhere.
    async fn follow_redirects(
        &self,
        cfg: &Config,
        ep: &Endpoint,
        req: &UpstreamRequest,
        from: &Url,
        mut resp: Response<Incoming>,
        public_only: bool,
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
            if current.scheme() == "https" && next.scheme() == "http" {
                return Err(AttemptError::Redirect(format!(
                    "refused a redirect from https to plain http ({next})"
                )));
            }
            // A peer sending this node on to another member (a relay of
            // the cluster's tree): one the probe found down is passed over
            // at once, rather than a connect that hangs; the answer of
            // another says whose stream it is.
            let relay = ep.is_peer().then(|| Relayed::at(&next)).flatten();
            if relay
                .as_ref()
                .is_some_and(|r| self.health.backing_off(&r.key))
            {
                return Err(AttemptError::Connect(format!(
                    "sent on to {next}, which does not answer its probe"
                )));
            }
            tracing::debug!(from = %current, to = %next, "following redirect");
            resp = self.send(cfg, ep, &next, req, None, public_only).await?;
            current = next;
            let status = resp.status();
            if !is_redirect(status) {
                if let Some(r) = relay {
                    resp.extensions_mut().insert(r);
                }
                return classify(resp, cfg).await;
            }
        }
        Err(AttemptError::Redirect(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    async fn send(
        &self,
        cfg: &Config,
        ep: &Endpoint,
        url: &Url,
        req: &UpstreamRequest,
        authorization: Option<&HeaderValue>,
        public_only: bool,
    ) -> Result<Response<Incoming>, AttemptError> {
        if public_only {
            if let Some(refusal) = admission::literal_refusal(url) {
                return Err(AttemptError::Refused(refusal.to_string()));
            }
        }
        let client = ep.client_for(public_only);
        let mut builder = Request::builder()
            .method(req.method.clone())
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
        if let Some(a) = authorization {
            builder = builder.header(AUTHORIZATION, a);
        }
        if let Some(range) = req.range {
            builder = builder.header(http::header::RANGE, range.header());
        }
        let request = builder
            .body(Empty::<Bytes>::new())
            .map_err(|e| AttemptError::Invalid(format!("building request: {e}")))?;
        let timeout = cfg.settings.first_byte_timeout;
        match tokio::time::timeout(timeout, client.request(request)).await {
            Err(_) => Err(AttemptError::Timeout(timeout)),
            Ok(Err(e)) => Err(match admission::refused(&e) {
                Some(why) => AttemptError::Refused(why),
                None => AttemptError::Connect(error_chain(&e)),
            }),
            Ok(Ok(resp)) => Ok(resp),
        }
    }
}

/// Why the policy refuses `ep` for `ns`, if it does: only endpoints named
/// by the namespace alone are subject to it.
fn admit(cfg: &Config, ep: &Endpoint, ns: &Namespace) -> Option<String> {
    if !ep.implicit {
        return None;
    }
    let s = &cfg.settings;
    if s.implicit_namespaces == ImplicitPolicy::Off {
        return Some(format!(
            "{ns} has no hosts.d folder and implicit_namespaces = \"off\""
        ));
    }
    if !s.allowed_namespaces.is_empty() && !s.allowed_namespaces.contains(ns) {
        return Some(format!("{ns} is not in allowed_namespaces"));
    }
    None
}

/// Whether `resp` came over a connection to a non-public address (an
/// endpoint configured at such an address: it may send us to others).
fn reached_privately(resp: &Response<Incoming>) -> bool {
    resp.extensions()
        .get::<hyper_util::client::legacy::connect::HttpInfo>()
        .is_some_and(|i| !admission::is_public(i.remote_addr().ip()))
}

/// A 3xx pointing elsewhere (304 is an answer, not a redirect).
fn is_redirect(status: StatusCode) -> bool {
    status.is_redirection() && status != StatusCode::NOT_MODIFIED
}

async fn classify(
    resp: Response<Incoming>,
    cfg: &Config,
) -> Result<Response<Incoming>, AttemptError> {
    let status = resp.status();
    match status {
        s if s.is_success() => Ok(resp),
        StatusCode::NOT_FOUND => Err(AttemptError::NotFound),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(AttemptError::Denied(status)),
        StatusCode::TOO_MANY_REQUESTS => Err(throttled(resp, &cfg.settings).await),
        s => Err(AttemptError::Status(s)),
    }
}

/// Reads a response body whole: at most `limit` bytes, all of it within
/// `within`. `what` names it in the error.
pub async fn read_whole(
    body: Incoming,
    limit: usize,
    within: Duration,
    what: &str,
) -> Result<Bytes, AttemptError> {
    let read = http_body_util::Limited::new(body, limit).collect();
    tokio::time::timeout(within, read)
        .await
        .map_err(|_| AttemptError::Invalid(format!("{what} not received within {within:?}")))?
        .map(|c| c.to_bytes())
        .map_err(|e| AttemptError::Invalid(format!("{what}: {e}")))
}

/// Largest 429 error body kept to pass on.
const MAX_THROTTLE_BODY: usize = 4 << 10;

/// A 429: how long to wait (its `Retry-After`, seconds or a date; else the
/// back-off base; at most the back-off maximum, whatever a registry says)
/// and its error body when small and JSON.
async fn throttled(resp: Response<Incoming>, settings: &UpstreamSettings) -> AttemptError {
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
        .unwrap_or(settings.backoff)
        .min(settings.backoff_max);
    let body = read_whole(
        resp.into_body(),
        MAX_THROTTLE_BODY,
        Duration::from_secs(2),
        "429 body",
    )
    .await
    .ok()
    .filter(|b| serde_json::from_slice::<serde_json::Value>(b).is_ok());
    AttemptError::Throttled { retry_after, body }
}

/// `Retry-After`: delay seconds, or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}
