//! Upstream authentication: `WWW-Authenticate` challenges (Bearer token
//! service, or Basic), credentials from a docker `config.json`-format
//! file, and a cache of what worked, kept until the token expires
//! ([`tokens`]).

mod credentials;
mod tokens;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, USER_AGENT};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use parking_lot::Mutex;
use url::Url;

use super::client::HttpClient;
pub use credentials::{Credential, Credentials, Source};
pub use tokens::TokenKey;
use tokens::{Cached, TokenCache};

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
    #[error("credential helper: {0}")]
    Helper(String),
}

/// Largest token accepted; real ones are a few KiB.
pub const MAX_TOKEN_BYTES: usize = 16 << 10;

/// Largest token service answer read.
const MAX_TOKEN_ANSWER: usize = 64 << 10;

/// Tokens are used at most this long, whatever their service says.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Authorization headers that worked, and what credential helpers said.
#[derive(Default)]
pub struct Auth {
    cache: Mutex<TokenCache>,
    helpers: Mutex<HashMap<HelperKey, (Instant, Option<Credential>)>>,
}

/// A helper's answer is good for this configuration, helper and server.
type HelperKey = (u64, String, String);

/// A helper's answer is kept at least this long, and as long as the
/// tokens it yields live.
const HELPER_KEEP: Duration = Duration::from_secs(300);

/// Helper answers kept at most.
const HELPERS_KEPT: usize = 256;

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

    /// The credential `source` names: as written, or what its helper
    /// answers (kept a while: [`HELPER_KEEP`]), under configuration
    /// `generation`.
    pub async fn credential(
        &self,
        generation: u64,
        source: Option<Source>,
    ) -> Result<Option<Credential>, AuthError> {
        let (helper, server) = match source {
            None => return Ok(None),
            Some(Source::Static(c)) => return Ok(Some(c)),
            Some(Source::Helper { helper, server }) => (helper, server),
        };
        let key = (generation, helper.clone(), server.clone());
        if let Some((until, c)) = self.helpers.lock().get(&key) {
            if *until > Instant::now() {
                return Ok(c.clone());
            }
        }
        let answer = credentials::run_helper(&helper, &server)
            .await
            .map_err(AuthError::Helper)?;
        let mut kept = self.helpers.lock();
        if kept.len() >= HELPERS_KEPT {
            let now = Instant::now();
            kept.retain(|k, (until, _)| *until > now && k.0 >= generation);
            if kept.len() >= HELPERS_KEPT {
                kept.clear();
            }
        }
        kept.insert(key, (Instant::now() + HELPER_KEEP, answer.clone()));
        Ok(answer)
    }

    /// Keeps a helper's answer as long as a token it yielded lives.
    pub fn helper_yielded(&self, generation: u64, source: &Option<Source>, life: Duration) {
        if let Some(Source::Helper { helper, server }) = source {
            let key = (generation, helper.clone(), server.clone());
            if let Some((until, _)) = self.helpers.lock().get_mut(&key) {
                if let Some(later) = Instant::now().checked_add(life.min(MAX_TOKEN_LIFETIME)) {
                    *until = (*until).max(later);
                }
            }
        }
    }

    /// Answers `challenge` for a request to `endpoint` about the key's
    /// repository with `credential` (if any), caches the resulting header
    /// under `key` and returns it, with the token's life.
    pub async fn answer(
        &self,
        key: TokenKey,
        credential: Option<&Credential>,
        endpoint: &Url,
        challenge: &str,
        service: TokenService<'_>,
    ) -> Result<(HeaderValue, Option<Duration>), AuthError> {
        let parsed =
            parse_challenge(challenge).ok_or_else(|| AuthError::Unsupported(challenge.into()))?;
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
                None => return Ok((header, lifetime)),
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
        Ok((header, lifetime))
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
}
