//! Upstream authentication: `WWW-Authenticate` challenges (Bearer token
//! service, or Basic), credentials from a docker `config.json`-format
//! file, and a cache of what worked, kept until the token expires
//! ([`tokens`]).

mod tokens;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, USER_AGENT};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use parking_lot::Mutex;
use url::Url;

use super::client::HttpClient;
pub use tokens::TokenKey;
use tokens::{Cached, TokenCache};

/// A username and password for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

impl Credential {
    fn basic_header(&self) -> Option<HeaderValue> {
        let raw = format!("{}:{}", self.username, self.password);
        let enc = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::try_from(format!("Basic {enc}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// Credentials by registry host, from `{"auths": {"host": {"auth": ...}}}`.
#[derive(Debug, Default)]
pub struct Credentials(HashMap<String, Credential>);

/// One `auths` entry of a docker config.json.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    /// Written by `docker login`; not used here.
    #[serde(default, rename = "email")]
    _email: Option<String>,
    #[serde(default, rename = "identitytoken")]
    _identity_token: Option<String>,
}

/// Reduces `https://index.docker.io/v1/`, `registry-1.docker.io` and the
/// like to the host a credential is for.
fn host_key(s: &str) -> String {
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

impl Credentials {
    /// Errors carry the line (0 when it is about the file as a whole).
    pub fn load(path: &Path) -> Result<Self, (usize, String)> {
        let text = crate::config::read_config_file(path).map_err(|e| (0, e))?;
        Self::parse_at(&text)
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_at(text).map_err(|(line, e)| format!("line {line}: {e}"))
    }

    /// A docker `config.json`: an object whose `auths` (if any) maps
    /// registries to objects with `auth` (base64 `user:password`) or
    /// `username` and `password`. Other keys docker writes are ignored.
    fn parse_at(text: &str) -> Result<Self, (usize, String)> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| (e.line(), format!("invalid docker config.json: {e}")))?;
        let Some(top) = value.as_object() else {
            return Err((
                0,
                "a docker config.json is a JSON object: {\"auths\": {\"registry\": {...}}}".into(),
            ));
        };
        let auths = match top.get("auths") {
            None => return Ok(Credentials::default()),
            Some(serde_json::Value::Object(m)) => m,
            Some(_) => {
                return Err((
                    line_of_key(text, "auths"),
                    "`auths` must be an object of registries".into(),
                ))
            }
        };
        let mut out = HashMap::new();
        for (key, entry) in auths {
            let at = line_of_key(text, key);
            let a: DockerAuth = serde_json::from_value(entry.clone())
                .map_err(|e| (at, format!("auths.{key}: {e}")))?;
            let cred = credential(key, a).map_err(|e| (at, e))?;
            out.insert(host_key(key), cred);
        }
        Ok(Credentials(out))
    }

    /// The credential for an endpoint URL's host, if any.
    pub fn for_url(&self, url: &Url) -> Option<&Credential> {
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            _ => return None,
        };
        self.0.get(&host_key(&host))
    }
}

/// The credential of one `auths` entry.
fn credential(key: &str, a: DockerAuth) -> Result<Credential, String> {
    match (a.auth, a.username, a.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| format!("auths.{key}.auth is not base64: {e}"))?;
            let raw =
                String::from_utf8(raw).map_err(|_| format!("auths.{key}.auth is not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| format!("auths.{key}.auth is not user:password"))?;
            Ok(Credential {
                username: u.into(),
                password: p.into(),
            })
        }
        (_, Some(username), Some(password)) => Ok(Credential { username, password }),
        _ => Err(format!(
            "auths.{key} has neither auth nor username/password"
        )),
    }
}

/// The line where the object key `key` first appears in a JSON text (1
/// when it cannot be found).
fn line_of_key(text: &str, key: &str) -> usize {
    let quoted = serde_json::to_string(key).unwrap_or_default();
    let mut from = 0;
    while let Some(i) = text[from..].find(&quoted) {
        let at = from + i;
        let after = text[at + quoted.len()..].trim_start();
        if after.starts_with(':') {
            return text[..at].matches('\n').count() + 1;
        }
        from = at + quoted.len();
    }
    1
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercase scheme: `bearer` or `basic`.
    pub scheme: String,
    pub params: HashMap<String, String>,
}

/// Parses the first challenge of a `WWW-Authenticate` value
/// (`Bearer realm="...",service="...",scope="..."`).
pub fn parse_challenge(value: &str) -> Option<Challenge> {
    let value = value.trim();
    let (scheme, mut rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let val;
        if let Some(quoted) = rest.strip_prefix('"') {
            // A quoted string, with backslash escapes.
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => out.push(c),
                }
            }
            val = out;
            rest = &quoted[end.unwrap_or(quoted.len())..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            val = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        if key.contains(' ') {
            // The start of a second challenge: stop at the first.
            break;
        }
        params.insert(key, val);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Why an upstream could not be authenticated against.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("unsupported authentication challenge {0:?}")]
    Unsupported(String),
    #[error("Basic authentication asked for, but no credentials for this host")]
    NoCredentials,
    #[error("token service {realm}: {why}")]
    Token { realm: String, why: String },
    #[error("token service {realm} refused access ({status})")]
    Refused { realm: String, status: StatusCode },
    #[error("token service not contacted: {0}")]
    NotPublic(String),
    #[error("credentials not sent to {realm}: a token service must be https (or plain http on the endpoint's own host, when the endpoint itself is plain http)")]
    Insecure { realm: String },
}

/// Largest token accepted; real ones are a few KiB.
pub const MAX_TOKEN_BYTES: usize = 16 << 10;

/// Largest token service answer read.
const MAX_TOKEN_ANSWER: usize = 64 << 10;

/// Tokens are used at most this long, whatever their service says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Authorization headers that worked.
#[derive(Default)]
pub struct Auth {
    cache: Mutex<TokenCache>,
}

/// How to reach a token service: the client, whether it must be at a
/// public address (it was named by an endpoint reached at one), and how
/// long it may take.
#[derive(Clone, Copy)]
pub struct TokenService<'a> {
    pub client: &'a HttpClient,
    pub public_only: bool,
    pub timeout: Duration,
}

/// Tokens live this long when the service does not say (the distribution
/// spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

impl Auth {
    /// A still-valid header for `key`, if one was obtained earlier.
    pub fn cached(&self, key: &TokenKey) -> Option<HeaderValue> {
        let mut cache = self.cache.lock();
        // Tokens of earlier configurations are never used again.
        let stale: Vec<TokenKey> = cache
            .entries
            .keys()
            .filter(|k| k.generation < key.generation)
            .cloned()
            .collect();
        for k in &stale {
            cache.remove(k);
        }
        match cache.entries.get(key) {
            Some(c) if c.expires.is_none_or(|t| t > Instant::now()) => Some(c.header.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn forget(&self, key: &TokenKey) {
        self.cache.lock().remove(key);
    }

    /// Answers `challenge` for a request to `endpoint` about the key's
    /// repository, caches the resulting header under `key` and returns it.
    pub async fn answer(
        &self,
        key: TokenKey,
        credentials: &Credentials,
        endpoint: &Url,
        challenge: &str,
        service: TokenService<'_>,
    ) -> Result<HeaderValue, AuthError> {
        let parsed =
            parse_challenge(challenge).ok_or_else(|| AuthError::Unsupported(challenge.into()))?;
        let credential = credentials.for_url(endpoint);
        // The scope a challenge omits: pull of the repository, or the catalog.
        let scope = match &key.repository {
            Some(r) => format!("repository:{r}:pull"),
            None => "registry:catalog:*".to_string(),
        };
        let (header, lifetime) = match parsed.scheme.as_str() {
            "basic" => {
                let c = credential.ok_or(AuthError::NoCredentials)?;
                (c.basic_header().ok_or(AuthError::NoCredentials)?, None)
            }
            "bearer" => {
                let (token, life) =
                    fetch_token(service, &parsed, credential, endpoint, &scope).await?;
                let mut v = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    AuthError::Token {
                        realm: parsed.params.get("realm").cloned().unwrap_or_default(),
                        why: "token is not a valid header value".into(),
                    }
                })?;
                v.set_sensitive(true);
                (v, Some(life))
            }
            _ => return Err(AuthError::Unsupported(challenge.into())),
        };
        // Renew a little before the service would refuse the token (the
        // lifetime is capped, so this cannot overflow; an instant that
        // could not be represented is not cached at all).
        let expires = match lifetime {
            Some(l) => match Instant::now().checked_add(l.min(MAX_TOKEN_LIFETIME) / 10 * 9) {
                Some(t) => Some(t),
                None => return Ok(header),
            },
            None => None,
        };
        self.cache.lock().insert(
            key,
            Cached {
                header: header.clone(),
                expires,
            },
        );
        Ok(header)
    }
}

async fn fetch_token(
    TokenService {
        client,
        public_only,
        timeout,
    }: TokenService<'_>,
    challenge: &Challenge,
    credential: Option<&Credential>,
    endpoint: &Url,
    default_scope: &str,
) -> Result<(String, Duration), AuthError> {
    let realm = challenge.params.get("realm").cloned().unwrap_or_default();
    let fail = |why: String| AuthError::Token {
        realm: realm.clone(),
        why,
    };
    let mut url = Url::parse(&realm).map_err(|e| fail(format!("invalid realm: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(fail("realm must be an http(s) URL".into()));
    }
    if public_only {
        if let Some(refusal) = super::admission::literal_refusal(&url) {
            return Err(AuthError::NotPublic(refusal.to_string()));
        }
    }
    if credential.is_some() && !credentials_may_go(endpoint, &url) {
        return Err(AuthError::Insecure { realm });
    }
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = challenge.params.get("service") {
            q.append_pair("service", service);
        }
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| default_scope.to_string());
        q.append_pair("scope", &scope);
    }
    let mut req = Request::get(url.as_str()).header(USER_AGENT, super::USER_AGENT);
    if let Some(h) = credential.and_then(|c| c.basic_header()) {
        req = req.header(AUTHORIZATION, h);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| match super::admission::refused(&e) {
                Some(why) => AuthError::NotPublic(why),
                None => fail(super::error_chain(&e)),
            })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_TOKEN_ANSWER)
            .collect()
            .await
            .map_err(|e| fail(format!("reading response: {e}")))?
            .to_bytes();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(AuthError::Refused {
                realm: realm.clone(),
                status,
            });
        }
        if status != StatusCode::OK {
            return Err(fail(format!("answered {status}")));
        }
        let t: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| fail(format!("invalid JSON: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("no token in response".into()))?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(fail(format!(
                "token of {} bytes refused (at most {MAX_TOKEN_BYTES})",
                token.len()
            )));
        }
        let life = t
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .min(MAX_TOKEN_LIFETIME);
        Ok((token, life))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| fail("timed out".into()))?
}

/// Whether credentials for `endpoint` may go to the token service at
/// `realm`: over https, or over plain http only to the host of an
/// endpoint that is itself configured as plain http.
fn credentials_may_go(endpoint: &Url, realm: &Url) -> bool {
    realm.scheme() == "https"
        || (endpoint.scheme() == "http"
            && realm.scheme() == "http"
            && realm.host_str() == endpoint.host_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_go_over_https_or_to_a_plain_endpoints_own_host() {
        let u = |s: &str| Url::parse(s).unwrap();
        let https_ep = u("https://reg.test/v2");
        let http_ep = u("http://127.0.0.1:5000/v2");
        assert!(credentials_may_go(&https_ep, &u("https://auth.test/token")));
        assert!(!credentials_may_go(&https_ep, &u("http://reg.test/token")));
        assert!(!credentials_may_go(&https_ep, &u("http://auth.test/token")));
        assert!(credentials_may_go(
            &http_ep,
            &u("http://127.0.0.1:5001/token")
        ));
        assert!(!credentials_may_go(
            &http_ep,
            &u("http://127.0.0.2:5000/token")
        ));
        assert!(credentials_may_go(&http_ep, &u("https://auth.test/token")));
    }

    #[test]
    fn bearer_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/busybox:pull");
    }

    #[test]
    fn challenge_quirks() {
        let c = parse_challenge(r#"basic realm="a \"q\", b""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "a \"q\", b");
        let c = parse_challenge("Bearer realm=http://x/token, service=svc").unwrap();
        assert_eq!(c.params["realm"], "http://x/token");
        assert_eq!(c.params["service"], "svc");
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn docker_config_credentials() {
        let creds = Credentials::parse(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                "127.0.0.1:5001": {"username": "u2", "password": "p:2"}
            }}"#,
        )
        .unwrap();
        let hub = creds
            .for_url(&Url::parse("https://registry-1.docker.io/v2").unwrap())
            .unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pass")
        );
        let local = creds
            .for_url(&Url::parse("http://127.0.0.1:5001/v2").unwrap())
            .unwrap();
        assert_eq!(local.password, "p:2");
        assert!(creds
            .for_url(&Url::parse("http://127.0.0.1:5002/v2").unwrap())
            .is_none());
        assert!(format!("{hub:?}").contains("redacted"));
    }

    #[test]
    fn bad_docker_config() {
        assert!(Credentials::parse(r#"{"auths": {"x": {"auth": "!!"}}}"#).is_err());
        assert!(Credentials::parse(r#"{"auths": {"x": {}}}"#).is_err());
        let e = Credentials::parse("{\n  \"auths\": [\n").unwrap_err();
        assert!(e.starts_with("line "), "{e}");
        // Shapes, with the line of the entry at fault.
        let e = Credentials::parse("[]").unwrap_err();
        assert!(
            e.starts_with("line 0: a docker config.json is a JSON object"),
            "{e}"
        );
        let e = Credentials::parse("{\n\"auths\": []\n}").unwrap_err();
        assert!(e.starts_with("line 2: `auths` must be an object"), "{e}");
        let text = "{\"auths\": {\n  \"a.test\": {\"auth\": \"dTpw\"},\n  \"b.test\": {\"auth\": \"!!\"}\n}}";
        let e = Credentials::parse(text).unwrap_err();
        assert!(
            e.starts_with("line 3: auths.b.test.auth is not base64"),
            "{e}"
        );
        let e = Credentials::parse("{\"auths\": {\n\"c.test\": 5}}").unwrap_err();
        assert!(e.starts_with("line 2: auths.c.test"), "{e}");
        let e =
            Credentials::parse("{\"auths\": {\n\"c.test\": {\"usernme\": \"u\"}}}").unwrap_err();
        assert!(e.contains("unknown field `usernme`"), "{e}");
        // What docker itself writes beside auths is fine.
        let ok = r#"{"auths": {"d.test": {"auth": "dTpw", "email": "x@y"}}, "credsStore": "desktop", "HttpHeaders": {}}"#;
        assert!(Credentials::parse(ok).is_ok());
    }
}
