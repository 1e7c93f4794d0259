//! `hosts.d/<namespace>/hosts.toml` in containerd's own hosts.toml format.
//!
//! ```toml
//! server = "https://registry.example"        # tried last, without ?ns=
//! private = true                              # cluster mode: not shared
//! share = true                                #   ... or shared all the same
//! [host."http://mirror-a:5000"]               # tried in file order, with ?ns=
//!   capabilities = ["pull", "resolve"]
//!   ca = "ca.pem"                             # relative to this file's folder
//!   client = [["client.pem", "client.key"]]
//!   skip_verify = false
//!   override_path = false
//!   dial_timeout = "2s"
//!   parallel_fetches = 8                      # nodemirror's own: ranged fetch
//!   parallel_threshold = "16MiB"              # of big blobs over 8 connections
//!   proxy = "http://proxy.corp:3128"          # nodemirror's own: this endpoint's
//!   no_proxy = "corp.example,10.0.0.0/8"      # proxy (top level: every endpoint's)
//!   [host."http://mirror-a:5000".header]
//!     x-custom = ["value"]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use toml_edit::TableLike;
use url::Url;

use super::source::{span_of, visit_table, ConfigError, ConfigErrors, Field, Source};
use crate::reference::Namespace;

/// What an endpoint may be used for, as in containerd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch blobs and manifests by digest.
    pub pull: bool,
    /// Resolve tags to digests.
    pub resolve: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
    };
}

/// A client certificate and its key.
#[derive(Debug)]
pub struct ClientIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Connection settings of one endpoint (a `[host."..."]` table, or the
/// top-level keys for `server`).
#[derive(Debug, Default)]
pub struct HostSettings {
    pub capabilities: Option<Capabilities>,
    /// Extra roots trusted beside the system's.
    pub ca: Vec<CertificateDer<'static>>,
    pub client: Option<ClientIdentity>,
    pub skip_verify: bool,
    pub override_path: bool,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub dial_timeout: Option<Duration>,
    /// `[upstream] parallel_fetches` and `parallel_threshold` for this endpoint.
    pub parallel_fetches: Option<usize>,
    pub parallel_threshold: Option<u64>,
    /// `proxy = "http://…"`, `"socks5://…"` or `"none"`, and `no_proxy`:
    /// in place of config.toml's and the environment's. Top-level values
    /// apply to every endpoint of the file that sets none of its own.
    pub proxy: Option<String>,
    pub no_proxy: Option<String>,
}

/// One endpoint as configured: its API base URL (ending in `/v2` unless
/// `override_path`), and its settings.
#[derive(Debug)]
pub struct HostSpec {
    pub base: Url,
    pub settings: HostSettings,
    /// `file:line` the endpoint was declared at.
    pub origin: String,
}

/// One hosts.toml: mirrors in file order, then the server.
#[derive(Debug, Default)]
pub struct HostsFile {
    pub mirrors: Vec<HostSpec>,
    /// `server = ...` if set; the top-level settings apply to it either way.
    pub server: Option<Url>,
    pub server_settings: HostSettings,
    pub server_origin: String,
    /// Cluster mode: whether this namespace's content may go to peers.
    pub sharing: Sharing,
}

/// `private = true` keeps a namespace's content from the cluster's peers
/// (as credentials do); `share = true` shares it all the same.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sharing {
    pub private: bool,
    pub share: bool,
}

/// Everything under a hosts.d folder.
#[derive(Debug, Default)]
pub struct HostsDir {
    pub namespaces: BTreeMap<Namespace, HostsFile>,
    /// `_default/hosts.toml`: for namespaces without a folder of their own.
    pub default: Option<HostsFile>,
}

/// Loads every `<dir>/<namespace>/hosts.toml`. A missing folder is an empty
/// configuration: every namespace then goes to `https://<namespace>`.
pub fn load_dir(dir: &Path) -> Result<HostsDir, Vec<ConfigError>> {
    let mut out = HostsDir::default();
    let mut errors = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(vec![ConfigError {
                path: dir.to_path_buf(),
                line: 0,
                message: format!("cannot read hosts directory: {e}"),
            }])
        }
    };
    let mut names: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let file = dir.join(&name).join("hosts.toml");
        if !file.exists() {
            continue;
        }
        let parsed = match parse_file(&file) {
            Ok(f) => f,
            Err(mut e) => {
                errors.append(&mut e);
                continue;
            }
        };
        if name == "_default" {
            out.default = Some(parsed);
            continue;
        }
        match name.parse::<Namespace>() {
            Ok(ns) => {
                out.namespaces.insert(ns, parsed);
            }
            Err(e) => errors.push(ConfigError {
                path: file,
                line: 0,
                message: format!("folder name is not a registry host: {e}"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Parses one hosts.toml file.
pub fn parse_file(path: &Path) -> Result<HostsFile, Vec<ConfigError>> {
    let src = Source::read(path).map_err(|e| vec![e])?;
    parse_source(&src)
}

pub fn parse_source(src: &Source) -> Result<HostsFile, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let root = src.doc.as_table();
    let dir = src.path.parent().unwrap_or(Path::new("."));
    let mut file = HostsFile {
        server_origin: src.origin(None),
        ..Default::default()
    };

    // Top level: the server and its settings.
    let mut top = HostSettings::default();
    let mut server_field = None;
    visit_table(src, root, &mut errors, |f| match f.key {
        "server" => {
            f.str()?;
            server_field = Some(f);
            Ok(())
        }
        "host" => Ok(()),
        "private" => {
            file.sharing.private = f.bool()?;
            Ok(())
        }
        "share" => {
            file.sharing.share = f.bool()?;
            Ok(())
        }
        _ => visit_host_key(&mut top, &f, dir),
    });
    // The server's path rule follows the top-level override_path, which may
    // come after `server` in the file.
    if let Some(f) = server_field {
        file.server_origin = src.origin(f.span.clone());
        match endpoint_url(&f, f.str().unwrap_or_default(), top.override_path) {
            Ok(url) => file.server = Some(url),
            Err(e) => errors.push(e),
        }
    }
    file.server_settings = top;

    // [host."URL"] tables, in file order.
    if let Some(item) = root.get("host") {
        match item.as_table_like() {
            None => errors.push(src.error(span_of(root, "host"), "`host` must be a table")),
            Some(hosts) => {
                for (name, item) in hosts.iter() {
                    let span = span_of(hosts, name);
                    let Some(table) = item.as_table_like() else {
                        errors.push(src.error(span, format!("host {name:?} must be a table")));
                        continue;
                    };
                    let mut s = HostSettings {
                        proxy: file.server_settings.proxy.clone(),
                        no_proxy: file.server_settings.no_proxy.clone(),
                        ..HostSettings::default()
                    };
                    visit_table(src, table, &mut errors, |f| visit_host_key(&mut s, &f, dir));
                    let field = Field {
                        src,
                        key: "host",
                        item,
                        span: span.clone(),
                    };
                    match endpoint_url(&field, name, s.override_path) {
                        Ok(base) => file.mirrors.push(HostSpec {
                            base,
                            settings: s,
                            origin: src.origin(span),
                        }),
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(file)
    } else {
        Err(errors)
    }
}

/// containerd's endpoint URL rules: scheme defaults to https, and the API
/// path gets `/v2` appended unless it ends in `/v2` or `override_path`.
fn endpoint_url(f: &Field<'_>, raw: &str, override_path: bool) -> Result<Url, ConfigError> {
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("https://{raw}")
    };
    let bad = |why: &str| {
        f.src.error(
            f.span.clone(),
            format!("invalid endpoint URL {raw:?}: {why}"),
        )
    };
    let mut url = Url::parse(&with_scheme).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("scheme must be http or https"));
    }
    if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("expected scheme://host[:port][/path]"));
    }
    let path = url.path().trim_end_matches('/').to_string();
    let path = if override_path || path.ends_with("/v2") {
        path
    } else {
        format!("{path}/v2")
    };
    url.set_path(&path);
    Ok(url)
}

/// Reads one key of a `[host."..."]` table (or of the top level, for
/// `server`) into `s`.
fn visit_host_key(s: &mut HostSettings, f: &Field<'_>, dir: &Path) -> Result<(), ConfigErrors> {
    match f.key {
        "capabilities" => {
            let mut caps = Capabilities {
                pull: false,
                resolve: false,
            };
            for c in f.strings()? {
                match c {
                    "pull" => caps.pull = true,
                    "resolve" => caps.resolve = true,
                    "push" => {}
                    other => {
                        return Err(f
                            .src
                            .error(
                                f.span.clone(),
                                format!("unknown capability {other:?} (pull, resolve, push)"),
                            )
                            .into())
                    }
                }
            }
            s.capabilities = Some(caps);
        }
        "ca" => {
            for p in f.strings()? {
                let path = dir.join(p);
                s.ca.extend(read_certs(f, &path)?);
            }
        }
        "client" => {
            let (cert, key) = client_paths(f, dir)?;
            let chain = read_certs(f, &cert)?;
            let key_file = key.clone().unwrap_or_else(|| cert.clone());
            let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| {
                f.src.error(
                    f.span.clone(),
                    format!("cannot read private key {}: {e}", key_file.display()),
                )
            })?;
            s.client = Some(ClientIdentity { chain, key });
        }
        "skip_verify" => s.skip_verify = f.bool()?,
        "override_path" => s.override_path = f.bool()?,
        "dial_timeout" => s.dial_timeout = Some(f.duration_from(super::MIN_TIMEOUT)?),
        "parallel_fetches" => {
            s.parallel_fetches = Some(f.count(1, crate::config::MAX_PARALLEL_FETCHES)?)
        }
        "parallel_threshold" => s.parallel_threshold = Some(f.size()?),
        "proxy" => {
            let raw = f.str()?;
            crate::upstream::proxy::check_url(raw)
                .map_err(|e| f.src.error(f.span.clone(), format!("`proxy`: {e}")))?;
            s.proxy = Some(raw.to_string());
        }
        "no_proxy" => s.no_proxy = Some(f.str()?.to_string()),
        "header" => {
            let table = f.item.as_table_like().ok_or_else(|| {
                f.src
                    .error(f.span.clone(), "`header` must be a table of name = value")
            })?;
            let mut errs = Vec::new();
            visit_headers(f.src, table, &mut s.headers, &mut errs);
            if !errs.is_empty() {
                return Err(ConfigErrors(errs));
            }
        }
        _ => return Err(f.unknown()),
    }
    Ok(())
}

fn visit_headers(
    src: &Source,
    table: &dyn TableLike,
    out: &mut Vec<(HeaderName, HeaderValue)>,
    errors: &mut Vec<ConfigError>,
) {
    for (name, item) in table.iter() {
        let f = Field {
            src,
            key: name,
            item,
            span: span_of(table, name),
        };
        let result = (|| {
            let hn = HeaderName::try_from(name).map_err(|_| {
                f.src
                    .error(f.span.clone(), format!("invalid header name {name:?}"))
            })?;
            for v in f.strings()? {
                let hv = HeaderValue::try_from(v).map_err(|_| {
                    f.src
                        .error(f.span.clone(), format!("invalid value for header {name:?}"))
                })?;
                out.push((hn.clone(), hv));
            }
            Ok(())
        })();
        if let Err(e) = result {
            errors.push(e);
        }
    }
}

/// `client` is `"both.pem"`, `["cert.pem", "key.pem"]` or
/// `[["cert.pem", "key.pem"]]` (containerd accepts all three).
fn client_paths(f: &Field<'_>, dir: &Path) -> Result<(PathBuf, Option<PathBuf>), ConfigError> {
    let want = "a path, [cert, key], or [[cert, key]]";
    let err = || {
        f.src
            .error(f.span.clone(), format!("`client` must be {want}"))
    };
    let v = f.item.as_value().ok_or_else(err)?;
    if let Some(s) = v.as_str() {
        return Ok((dir.join(s), None));
    }
    let arr = v.as_array().ok_or_else(err)?;
    let pair = match arr.get(0) {
        Some(inner) if inner.is_array() => {
            if arr.len() > 1 {
                return Err(f.src.error(
                    f.span.clone(),
                    "only one client certificate per host is supported",
                ));
            }
            inner.as_array().ok_or_else(err)?
        }
        _ => arr,
    };
    let parts: Vec<&str> = pair.iter().filter_map(|v| v.as_str()).collect();
    match parts.as_slice() {
        [cert] if pair.len() == 1 => Ok((dir.join(cert), None)),
        [cert, key] if pair.len() == 2 => Ok((dir.join(cert), Some(dir.join(key)))),
        _ => Err(err()),
    }
}

fn read_certs(f: &Field<'_>, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    pem_certs(path).map_err(|why| {
        f.src.error(
            f.span.clone(),
            format!("cannot read certificates from {}: {why}", path.display()),
        )
    })
}

/// Every certificate in a PEM file, at least one; else why not.
pub(crate) fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<HostsFile, Vec<ConfigError>> {
        let src = Source::parse(Path::new("/h/docker.io/hosts.toml"), text.into()).unwrap();
        parse_source(&src)
    }

    #[test]
    fn a_top_level_proxy_applies_to_every_endpoint_that_sets_none() {
        let f = parse(
            "proxy = \"http://p:3128\"\nno_proxy = \"10.0.0.0/8\"\nserver = \"https://r\"\n\
             [host.\"https://a\"]\n[host.\"https://b\"]\n  proxy = \"none\"\n",
        )
        .unwrap();
        assert_eq!(f.server_settings.proxy.as_deref(), Some("http://p:3128"));
        assert_eq!(
            f.mirrors[0].settings.proxy.as_deref(),
            Some("http://p:3128")
        );
        assert_eq!(
            f.mirrors[0].settings.no_proxy.as_deref(),
            Some("10.0.0.0/8")
        );
        assert_eq!(f.mirrors[1].settings.proxy.as_deref(), Some("none"));
        let e = parse("server = \"https://r\"\n[host.\"https://a\"]\n  proxy = \"ftp://p\"\n")
            .unwrap_err();
        assert!(
            e[0].to_string()
                .starts_with("/h/docker.io/hosts.toml:3: `proxy`"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn containerd_format() {
        let f = parse(
            r#"
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:5001"]
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:5001".header]
    x-one = "1"
    x-two = ["a", "b"]

[host."mirror.example/base"]
  capabilities = ["pull"]
  dial_timeout = "2s"

[host."https://other.example/custom/path"]
  override_path = true
"#,
        )
        .unwrap();
        assert_eq!(
            file_urls(&f),
            [
                "http://127.0.0.1:5001/v2",
                "https://mirror.example/base/v2",
                "https://other.example/custom/path"
            ]
        );
        assert_eq!(
            f.server.unwrap().as_str(),
            "https://registry-1.docker.io/v2"
        );
        assert_eq!(f.mirrors[0].settings.headers.len(), 3);
        assert_eq!(
            f.mirrors[1].settings.capabilities,
            Some(Capabilities {
                pull: true,
                resolve: false
            })
        );
        assert_eq!(
            f.mirrors[1].settings.dial_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(f.mirrors[0].origin, "/h/docker.io/hosts.toml:4");
    }

    fn file_urls(f: &HostsFile) -> Vec<String> {
        f.mirrors.iter().map(|m| m.base.to_string()).collect()
    }

    #[test]
    fn errors_name_file_and_line() {
        let errs = parse(
            "server = \"https://x\"\n\n[host.\"http://a\"]\n  capabilites = [\"pull\"]\n  skip_verify = \"yes\"\n",
        )
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("/h/docker.io/hosts.toml:4: unknown key `capabilites`"),
            "{text:?}"
        );
        assert!(
            text[1].starts_with("/h/docker.io/hosts.toml:5: `skip_verify` must be true or false"),
            "{text:?}"
        );
    }

    proptest::proptest! {
        /// Any text, TOML or not, gives hosts or errors with a line number
        /// inside the file; never a panic.
        #[test]
        fn arbitrary_files_never_panic(text in "\\PC{0,400}") {
            let lines = text.lines().count().max(1);
            match Source::parse(Path::new("h.toml"), text.clone()) {
                Err(e) => proptest::prop_assert!(e.line <= lines + 1),
                Ok(src) => {
                    if let Err(errors) = parse_source(&src) {
                        for e in errors {
                            proptest::prop_assert!(e.line <= lines + 1);
                        }
                    }
                }
            }
        }

        /// Structured near-miss files: known and unknown keys, odd values.
        #[test]
        fn near_miss_files_never_panic(
            url in "(https?://)?[a-z0-9.:-]{0,20}(/[a-z0-9]{0,5}){0,2}",
            key in "(capabilities|ca|client|skip_verify|override_path|header|dial_timeout|[a-z_]{1,12})",
            value in "(true|false|1|\"[a-z]{0,6}\"|\\[\"pull\", \"resolve\"\\]|\\[\\[\"a\", \"b\"\\]\\]|\\{ x = \"y\" \\})",
        ) {
            let text = format!("server = \"{url}\"\n[host.\"{url}\"]\n{key} = {value}\n");
            if let Ok(src) = Source::parse(Path::new("h.toml"), text) {
                let _ = parse_source(&src);
            }
        }
    }

    #[test]
    fn every_bad_header_is_reported() {
        let errs = parse(
            "[host.\"http://a\"]\n  [host.\"http://a\".header]\n    \"bad name\" = \"x\"\n    ok = \"y\"\n    other = 5\n",
        )
        .unwrap_err();
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 5], "{errs:?}");
    }

    #[test]
    fn bad_urls_and_capabilities() {
        let e = parse("server = \"ftp://x\"\n").unwrap_err();
        assert!(e[0].message.contains("scheme"), "{e:?}");
        let e = parse("[host.\"http://a\"]\ncapabilities = [\"pul\"]\n").unwrap_err();
        assert_eq!(e[0].line, 2);
        let e = parse("[host.\"http://a\"]\nca = \"/nonexistent/ca.pem\"\n").unwrap_err();
        assert!(e[0].message.contains("/nonexistent/ca.pem"), "{e:?}");
    }
}
