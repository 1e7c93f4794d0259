//! Endpoint chains by namespace: mirrors from hosts.d in file order, then
//! the server; `_default` for namespaces without a folder, and the
//! implicit `https://<namespace>` (docker.io → registry-1.docker.io).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use url::Url;

use super::client::{ClientPool, HttpClient};
use super::UpstreamRequest;
use crate::config::hosts::{self, Capabilities, HostSettings, HostsDir};
use crate::config::ConfigError;
use crate::reference::Namespace;

/// One place a namespace's content can be fetched from.
#[derive(Debug)]
pub struct Endpoint {
    /// API base, e.g. `https://registry-1.docker.io/v2`.
    pub base: Url,
    /// Mirrors get `?ns=<namespace>`; the server does not.
    pub mirror: bool,
    pub capabilities: Capabilities,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// For the endpoint's own requests.
    pub client: HttpClient,
    /// The same TLS settings, connecting to public addresses only: for
    /// redirects and token services named by a public endpoint.
    pub public_client: HttpClient,
    /// Named by the request's namespace alone (no hosts.d folder, no
    /// `_default` server): admitted by policy.
    pub implicit: bool,
    /// Its own requests go to public addresses only (`client` is
    /// `public_client`): implicit, unless the policy is `any`.
    pub public_only: bool,
    /// Where it was configured (`file:line`, or `implicit`).
    pub origin: String,
    /// Overrides of `[upstream] parallel_fetches` and `parallel_threshold`.
    pub parallel_fetches: Option<usize>,
    pub parallel_threshold: Option<u64>,
}

impl Endpoint {
    /// Whether this is one of the cluster's peers.
    pub fn is_peer(&self) -> bool {
        self.origin.starts_with("cluster peer")
    }

    /// Identifies the endpoint in logs, health state and the auth cache.
    pub fn key(&self) -> &str {
        self.base.as_str()
    }

    /// The endpoint in metric labels: its key when configured (hosts.d,
    /// cluster peers), `other` for a registry named by a request alone,
    /// so that requests cannot grow the metrics without bound.
    pub fn label(&self) -> &str {
        if self.implicit {
            "other"
        } else {
            self.key()
        }
    }

    /// The client to use: `public_client` when the target must be public.
    pub(super) fn client_for(&self, public_only: bool) -> &HttpClient {
        if public_only {
            &self.public_client
        } else {
            &self.client
        }
    }

    pub(super) fn url_for(&self, req: &UpstreamRequest) -> Url {
        let mut url = self.base.clone();
        let base = url.path().trim_end_matches('/').to_string();
        let path = match &req.repository {
            Some(repo) => format!("{base}/{repo}/{}", req.tail),
            None => format!("{base}/{}", req.tail),
        };
        url.set_path(&path);
        if !req.query.is_empty() || self.mirror {
            let mut q = url.query_pairs_mut();
            for (k, v) in &req.query {
                q.append_pair(k, v);
            }
            if self.mirror {
                q.append_pair("ns", req.namespace.as_str());
            }
        }
        url
    }
}

/// Endpoint chains by namespace, built from one hosts.d snapshot.
pub struct Routes {
    namespaces: HashMap<Namespace, Vec<Arc<Endpoint>>>,
    /// `_default` mirrors, for namespaces without a folder.
    default_mirrors: Vec<Arc<Endpoint>>,
    /// `_default`'s `server`, if it names one.
    default_server: Option<Url>,
    /// Clients for servers of namespaces without a folder.
    default_client: HttpClient,
    default_public_client: HttpClient,
    /// Whether implicit servers may be at any address.
    implicit_any: bool,
    default_capabilities: Capabilities,
    /// Cluster mode: what may go to peers, by namespace and for the rest.
    sharing: HashMap<Namespace, hosts::Sharing>,
    default_sharing: hosts::Sharing,
}

impl Routes {
    pub fn build(
        dir: &HostsDir,
        pool: &mut ClientPool,
        connect_timeout: Duration,
        implicit_any: bool,
    ) -> Result<Routes, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut namespaces = HashMap::new();
        let mut sharing = HashMap::new();
        for (ns, file) in &dir.namespaces {
            sharing.insert(ns.clone(), file.sharing);
            let mut chain = endpoints(file, pool, connect_timeout, &mut errors);
            let server = file.server.clone().unwrap_or_else(|| implicit_server(ns));
            if let Some(ep) = endpoint(
                server,
                false,
                &file.server_settings,
                file.server_origin.clone(),
                (pool, connect_timeout),
                &mut errors,
            ) {
                chain.push(ep);
            }
            namespaces.insert(ns.clone(), chain);
        }
        let empty = hosts::HostsFile::default();
        let default = dir.default.as_ref().unwrap_or(&empty);
        let default_mirrors = endpoints(default, pool, connect_timeout, &mut errors);
        let client = |pool: &mut ClientPool, public_only| {
            pool.client(&default.server_settings, connect_timeout, public_only)
                .map_err(|e| vec![config_error(&default.server_origin, e)])
        };
        let default_client = client(pool, false)?;
        let default_public_client = client(pool, true)?;
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Routes {
            namespaces,
            default_mirrors,
            default_server: default.server.clone(),
            default_client,
            default_public_client,
            implicit_any,
            default_capabilities: default
                .server_settings
                .capabilities
                .unwrap_or(Capabilities::ALL),
            sharing,
            default_sharing: default.sharing,
        })
    }

    /// `private` and `share` of the namespace's hosts.toml (`_default`'s
    /// for namespaces without a folder).
    pub fn sharing(&self, ns: &Namespace) -> hosts::Sharing {
        self.sharing
            .get(ns)
            .copied()
            .unwrap_or(self.default_sharing)
    }

    /// Whether hosts.d has a folder for the namespace `name`.
    pub fn configures(&self, name: &str) -> bool {
        name.parse::<Namespace>()
            .is_ok_and(|ns| self.namespaces.contains_key(&ns))
    }

    /// The endpoints for `ns`, in the order to try them.
    pub fn chain(&self, ns: &Namespace) -> Vec<Arc<Endpoint>> {
        if let Some(chain) = self.namespaces.get(ns) {
            return chain.clone();
        }
        let mut chain = self.default_mirrors.clone();
        let (base, implicit) = match &self.default_server {
            Some(server) => (server.clone(), false),
            None => (implicit_server(ns), true),
        };
        let public_only = implicit && !self.implicit_any;
        let client = if public_only {
            &self.default_public_client
        } else {
            &self.default_client
        };
        chain.push(Arc::new(Endpoint {
            base,
            mirror: false,
            capabilities: self.default_capabilities,
            headers: Vec::new(),
            client: client.clone(),
            public_client: self.default_public_client.clone(),
            implicit,
            public_only,
            origin: if implicit {
                "implicit"
            } else {
                "_default server"
            }
            .into(),
            parallel_fetches: None,
            parallel_threshold: None,
        }));
        chain
    }
}

fn implicit_server(ns: &Namespace) -> Url {
    // default_server() is "https://" + a validated host[:port].
    let raw = format!("{}/v2", ns.default_server());
    Url::parse(&raw).unwrap_or_else(|_| unreachable!("validated namespace makes a valid URL"))
}

fn config_error(origin: &str, message: String) -> ConfigError {
    let (path, line) = origin.rsplit_once(':').unwrap_or((origin, "0"));
    ConfigError {
        path: path.into(),
        line: line.parse().unwrap_or(0),
        message,
    }
}

fn endpoints(
    file: &hosts::HostsFile,
    pool: &mut ClientPool,
    connect_timeout: Duration,
    errors: &mut Vec<ConfigError>,
) -> Vec<Arc<Endpoint>> {
    file.mirrors
        .iter()
        .filter_map(|m| {
            endpoint(
                m.base.clone(),
                true,
                &m.settings,
                m.origin.clone(),
                (&mut *pool, connect_timeout),
                errors,
            )
        })
        .collect()
}

fn endpoint(
    base: Url,
    mirror: bool,
    settings: &HostSettings,
    origin: String,
    (pool, connect_timeout): (&mut ClientPool, Duration),
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<Endpoint>> {
    let clients = pool
        .client(settings, connect_timeout, false)
        .and_then(|c| pool.client(settings, connect_timeout, true).map(|p| (c, p)));
    match clients {
        Ok((client, public_client)) => Some(Arc::new(Endpoint {
            base,
            mirror,
            capabilities: settings.capabilities.unwrap_or(Capabilities::ALL),
            headers: settings.headers.clone(),
            client,
            public_client,
            implicit: false,
            public_only: false,
            origin,
            parallel_fetches: settings.parallel_fetches,
            parallel_threshold: settings.parallel_threshold,
        })),
        Err(e) => {
            errors.push(config_error(&origin, e));
            None
        }
    }
}

#[cfg(test)]
impl Endpoint {
    /// A plain endpoint at `base`, for unit tests.
    pub fn for_tests(base: &str) -> Arc<Endpoint> {
        let mut pool = ClientPool::load();
        let settings = HostSettings::default();
        let client = pool
            .client(&settings, Duration::from_secs(1), false)
            .expect("a client");
        Arc::new(Endpoint {
            base: base.parse().expect("a URL"),
            mirror: false,
            capabilities: Capabilities::ALL,
            headers: Vec::new(),
            public_client: client.clone(),
            client,
            implicit: false,
            public_only: false,
            origin: "test".into(),
            parallel_fetches: None,
            parallel_threshold: None,
        })
    }
}
