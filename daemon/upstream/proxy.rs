//! Upstream connections through a proxy: `http://` proxies with CONNECT
//! (and Basic credentials), `socks5://` (names resolved here) and
//! `socks5h://` (names resolved by the proxy), as curl and Go clients
//! read `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY`; or as
//! set by `[upstream] proxy` / `no_proxy` in config.toml and `proxy` /
//! `no_proxy` in a namespace's hosts.toml.
//!
//! Every upstream request of an endpoint goes the same way: the registry,
//! its token service and the storage it redirects to, each judged by
//! `NO_PROXY` on its own host. Cluster peers never use a proxy. Both
//! `http://` and `https://` registries are reached through a CONNECT
//! tunnel, so TLS stays end to end and the proxy sees only host and port.
//!
//! The admission rules ([`super::admission`]) apply to the registry, not
//! to the proxy (which is usually on a private address): a host that must
//! be public is resolved here, every address checked, and the proxy is
//! asked to connect to the checked address itself, so that neither the
//! proxy's resolver nor a second answer can lead it somewhere else.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;
use url::Url;

use super::admission::{is_public, NotPublic, Resolver};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Checks a proxy URL as written in a setting: `http://`, `socks5://` or
/// `socks5h://`, a host, an optional port and credentials, nothing else.
/// An empty string or `none` means "no proxy".
pub fn check_url(raw: &str) -> Result<(), String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.eq_ignore_ascii_case("none") {
        return Ok(());
    }
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("invalid proxy URL: {e}"))?;
    match url.scheme() {
        "http" | "socks5" | "socks5h" => {}
        "https" => {
            return Err(
                "TLS to the proxy (https://) is not supported: use http:// (CONNECT keeps \
                 the registry's TLS end to end) or socks5://"
                    .into(),
            )
        }
        other => {
            return Err(format!(
                "proxy scheme {other:?} is not supported (http, socks5, socks5h)"
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("the proxy URL names no host".into());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("a proxy URL is scheme://[user:password@]host[:port] and nothing else".into());
    }
    Ok(())
}

/// Which proxy an endpoint's connections use, before `NO_PROXY`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ProxyChoice {
    /// For `http://` targets; empty: none.
    pub http: String,
    /// For `https://` targets; empty: none.
    pub https: String,
    /// `NO_PROXY` entries: domains (with their subdomains), IP addresses,
    /// CIDR ranges, `*`.
    pub no_proxy: String,
}

impl ProxyChoice {
    /// The environment's choice, read as curl does: `HTTPS_PROXY`,
    /// `HTTP_PROXY` and `ALL_PROXY` (either case) and `NO_PROXY`.
    pub fn from_env() -> ProxyChoice {
        let first = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
                .map(|v| proxy_or_none(&v))
                .unwrap_or_default()
        };
        let all = first(&["ALL_PROXY", "all_proxy"]);
        let or_all = |v: String| if v.is_empty() { all.clone() } else { v };
        ProxyChoice {
            http: or_all(first(&["HTTP_PROXY", "http_proxy"])),
            https: or_all(first(&["HTTPS_PROXY", "https_proxy"])),
            no_proxy: first(&["NO_PROXY", "no_proxy"]),
        }
    }

    /// This choice with `proxy` (one URL for both schemes, or `none`) and
    /// `no_proxy` put in place of its own where they are set.
    pub fn overridden(&self, proxy: Option<&str>, no_proxy: Option<&str>) -> ProxyChoice {
        let mut c = self.clone();
        if let Some(p) = proxy {
            c.http = proxy_or_none(p);
            c.https = c.http.clone();
        }
        if let Some(n) = no_proxy {
            c.no_proxy = n.to_string();
        }
        c
    }

    pub fn is_direct(&self) -> bool {
        self.http.is_empty() && self.https.is_empty()
    }

    /// Checks both URLs (the environment's may be wrong too).
    pub fn check(&self) -> Result<(), String> {
        check_url(&self.http)?;
        check_url(&self.https)
    }

    fn matcher(&self) -> Matcher {
        Matcher::builder()
            .http(self.http.clone())
            .https(self.https.clone())
            .no(self.no_proxy.clone())
            .build()
    }
}

/// A proxy setting as the choice keeps it: trimmed, `none` (any case) as
/// no proxy (empty).
fn proxy_or_none(v: &str) -> String {
    let v = v.trim();
    if v.eq_ignore_ascii_case("none") {
        String::new()
    } else {
        v.to_string()
    }
}

/// The connector under TLS: straight to the target, or through the proxy
/// the choice names for it.
#[derive(Clone)]
pub struct Dialer {
    direct: HttpConnector<Resolver>,
    /// Reaches the proxy itself (any address: the proxy is configured).
    to_proxy: HttpConnector<Resolver>,
    proxy: Option<Arc<Matcher>>,
    public_only: bool,
    dial: Duration,
}

impl Dialer {
    pub fn new(choice: &ProxyChoice, dial: Duration, public_only: bool) -> Dialer {
        let connector = |public_only| {
            let mut c = HttpConnector::new_with_resolver(Resolver { public_only });
            c.enforce_http(false);
            c.set_connect_timeout(Some(dial));
            c.set_nodelay(true);
            c
        };
        Dialer {
            direct: connector(public_only),
            to_proxy: connector(false),
            proxy: (!choice.is_direct()).then(|| Arc::new(choice.matcher())),
            public_only,
            dial,
        }
    }
}

/// Why a connection through the proxy failed, naming the proxy without
/// its credentials.
#[derive(Debug)]
struct ProxyError {
    proxy: String,
    target: String,
    why: String,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "through proxy {} to {}: {}",
            self.proxy, self.target, self.why
        )
    }
}

impl StdError for ProxyError {}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, BoxError>> + Send>>;

impl Service<Uri> for Dialer {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let Some(intercept) = self.proxy.as_ref().and_then(|m| m.intercept(&dst)) else {
            let fut = self.direct.call(dst);
            return Box::pin(async move { fut.await.map_err(BoxError::from) });
        };
        let proxy_uri = intercept.uri().clone();
        let shown = format!(
            "{}://{}",
            proxy_uri.scheme_str().unwrap_or("http"),
            proxy_uri.authority().map(|a| a.as_str()).unwrap_or("")
        );
        let basic = intercept.basic_auth().cloned();
        let raw = intercept
            .raw_auth()
            .map(|(u, p)| (u.to_string(), p.to_string()));
        let to_proxy = self.to_proxy.clone();
        let public_only = self.public_only;
        let dial = self.dial;
        Box::pin(async move {
            let host = dst.host().unwrap_or_default().to_string();
            let port = dst.port_u16().unwrap_or(match dst.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            let fail = |why: String| -> BoxError {
                Box::new(ProxyError {
                    proxy: shown.clone(),
                    target: format!("{host}:{port}"),
                    why,
                })
            };
            // What the proxy is asked to connect to.
            let target_host = if public_only {
                checked_address(&host).await?.to_string()
            } else {
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            };
            let target = target_uri(&target_host, port).map_err(|e| fail(e.to_string()))?;
            let scheme = proxy_uri.scheme_str().unwrap_or("http").to_string();
            let connecting = async {
                match scheme.as_str() {
                    "socks5" | "socks5h" => {
                        let mut socks =
                            SocksV5::new(proxy_uri, to_proxy).local_dns(scheme == "socks5");
                        if let Some((u, p)) = raw {
                            socks = socks.with_auth(u, p);
                        }
                        socks.call(target).await.map_err(|e| fail(why(&e)))
                    }
                    _ => {
                        let mut tunnel = Tunnel::new(proxy_uri, to_proxy);
                        if let Some(auth) = basic {
                            tunnel = tunnel.with_auth(auth);
                        }
                        tunnel.call(target).await.map_err(|e| fail(why(&e)))
                    }
                }
            };
            // The dial timeout covers reaching the proxy and its answer.
            match tokio::time::timeout(dial, connecting).await {
                Ok(r) => r,
                Err(_) => Err(fail(format!("no tunnel within {dial:?}"))),
            }
        })
    }
}

/// The address to ask the proxy for when the target must be public: the
/// literal itself, or the first address of a name all of whose
/// addresses are public.
async fn checked_address(host: &str) -> Result<IpAddr, BoxError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        if !is_public(ip) {
            return Err(Box::new(NotPublic {
                host: host.to_string(),
                addr: ip,
            }));
        }
        return Ok(ip);
    }
    let name: Name = bare
        .parse()
        .map_err(|_| format!("{host:?} is not a host name"))?;
    let mut addrs = Resolver { public_only: true }.call(name).await?;
    addrs
        .next()
        .map(|a| a.ip())
        .ok_or_else(|| format!("{host} has no address").into())
}

fn target_uri(host: &str, port: u16) -> Result<Uri, http::Error> {
    let authority = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
}

/// What went wrong setting up a tunnel, from the connector's error.
fn why(e: &(dyn StdError + 'static)) -> String {
    let text = super::error_chain(e);
    if text.contains("authorization required") {
        format!("{text} (407): set user:password in the proxy URL, or check them")
    } else if text.contains("tunnel error: unsuccessful") {
        format!("{text}: the proxy refused the CONNECT")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_checked_with_reasons() {
        for ok in [
            "",
            "none",
            "http://127.0.0.1:3128",
            "proxy.corp:8080",
            "http://user:p%40ss@proxy.corp:8080/",
            "socks5://127.0.0.1:1080",
            "socks5h://u:p@[::1]:1080",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}: {:?}", check_url(ok));
        }
        for (bad, why) in [
            ("https://proxy:3128", "not supported"),
            ("ftp://proxy", "not supported"),
            ("http://proxy:3128/path", "nothing else"),
            ("http://", "invalid proxy URL"),
            ("http://proxy:99999", "invalid proxy URL"),
        ] {
            let e = check_url(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn no_proxy_follows_curl_domains_addresses_and_ranges() {
        let c = ProxyChoice {
            http: "http://127.0.0.1:3128".into(),
            https: "http://127.0.0.1:3128".into(),
            no_proxy: "corp.example, 10.0.0.0/8, 192.168.1.7, .internal".into(),
        };
        let m = c.matcher();
        let proxied = |u: &str| m.intercept(&u.parse().unwrap()).is_some();
        assert!(proxied("https://registry-1.docker.io/v2/"));
        assert!(proxied("http://10x.example/v2/"));
        assert!(!proxied("https://corp.example/v2/"));
        assert!(!proxied("https://registry.corp.example/v2/"));
        assert!(proxied("https://notcorp.example/v2/"));
        assert!(!proxied("https://10.1.2.3:5000/v2/"));
        assert!(!proxied("https://192.168.1.7/v2/"));
        assert!(proxied("https://192.168.1.8/v2/"));
        assert!(!proxied("https://a.b.internal/v2/"));
    }

    #[test]
    fn settings_override_the_environment_and_none_means_direct() {
        let env = ProxyChoice {
            http: "http://env:1".into(),
            https: "http://env:2".into(),
            no_proxy: "a.example".into(),
        };
        assert_eq!(env.overridden(None, None), env);
        let set = env.overridden(Some("socks5://s:1080"), Some("b.example"));
        assert_eq!(set.http, "socks5://s:1080");
        assert_eq!(set.https, "socks5://s:1080");
        assert_eq!(set.no_proxy, "b.example");
        assert!(env.overridden(Some("none"), None).is_direct());
        let m = env.overridden(Some("none"), None).matcher();
        assert!(m
            .intercept(&"https://x.example/".parse().unwrap())
            .is_none());
    }

    #[tokio::test]
    async fn a_host_that_must_be_public_is_checked_here_not_at_the_proxy() {
        for host in ["127.0.0.1", "[::1]", "169.254.169.254", "localhost"] {
            let e = checked_address(host).await.unwrap_err();
            assert!(
                super::super::admission::refused(&*e).is_some(),
                "{host}: {e}"
            );
        }
        assert_eq!(
            checked_address("1.1.1.1").await.unwrap(),
            "1.1.1.1".parse::<IpAddr>().unwrap()
        );
    }
}
