//! `nodemirror doctor`: checks this node end to end, one line per check
//! with the fix: the daemon answers; containerd reads a `config_path`
//! whose hosts.toml files parse, for the containerd version here, and
//! name the daemon first; the containers/image drop-in (CRI-O, podman);
//! rke2/k3s `registries.yaml`; and a manifest `HEAD` through the daemon
//! sent as containerd sends it, to the host its hosts.toml names.
//!
//! containerd's configuration is read as containerd reads it: through
//! `containerd config dump` where a containerd is here (defaults, imports
//! and version migration included), else from the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::{ACCEPT, USER_AGENT};
use http::{Method, StatusCode};
use toml_edit::{DocumentMut, Item};

use super::containerd::{run_bounded, Version};
use super::crio;
use crate::reference::ImageRef;

/// What to check.
pub struct Options {
    /// The daemon, e.g. `http://127.0.0.1:5780`.
    pub server: String,
    /// containerd's config.toml.
    pub containerd_config: PathBuf,
    /// The `containerd` program (for its version and `config dump`).
    pub containerd: PathBuf,
    pub containerd_version: Option<Version>,
    /// containerd's hosts folder, instead of the configured `config_path`.
    pub certs_dir: Option<PathBuf>,
    /// containers/image's drop-in folder.
    pub crio_dir: PathBuf,
    /// rke2/k3s registries.yaml files to check where their folder exists.
    pub registries_yaml: Vec<PathBuf>,
    /// The image to ask for; default: containerd's sandbox (pause) image.
    pub image: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Works now; says what will break.
    Warn,
    Fail,
    /// Not on this node.
    Skip,
}

/// One check's line.
#[derive(Debug)]
pub struct Check {
    pub outcome: Outcome,
    pub name: String,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn new(outcome: Outcome, name: &str, detail: impl Into<String>) -> Check {
        Check {
            outcome,
            name: name.to_string(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = match self.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "skip",
        };
        write!(f, "{tag}  {}: {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " -- fix: {fix}")?;
        }
        Ok(())
    }
}

/// What containerd 1.6 sends when it resolves a tag.
const CONTAINERD_ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";

const LIMIT: Duration = Duration::from_secs(10);

/// Runs every check.
pub async fn run(opts: &Options) -> Vec<Check> {
    let mut checks = vec![daemon(&opts.server).await];
    let containerd = containerd(opts, &mut checks);
    manifest(opts, containerd.as_ref(), &mut checks).await;
    checks.push(crio_dropin(&opts.crio_dir, &opts.server));
    for path in &opts.registries_yaml {
        if let Some(c) = registries_yaml(path, &opts.server) {
            checks.push(c);
        }
    }
    checks
}

async fn daemon(server: &str) -> Check {
    let base = server.trim_end_matches('/');
    let name = "daemon";
    let down = |why: String| {
        Check::new(Outcome::Fail, name, format!("no answer at {base}: {why}"))
            .fix("systemctl start nodemirror; journalctl -u nodemirror (or pass --server)")
    };
    match crate::admin::call(Method::GET, &format!("{base}/healthz"), LIMIT).await {
        Ok((StatusCode::OK, _)) => {}
        Ok((status, _)) => return down(format!("/healthz answered {status}")),
        Err(e) => return down(e),
    }
    match crate::admin::call(Method::GET, &format!("{base}/readyz"), LIMIT).await {
        Ok((StatusCode::OK, _)) => Check::new(Outcome::Ok, name, format!("{base} answers")),
        Ok((status, body)) => Check::new(
            Outcome::Warn,
            name,
            format!(
                "{base} answers but is not ready ({status}: {})",
                String::from_utf8_lossy(&body).trim()
            ),
        )
        .fix("see /metrics and journalctl -u nodemirror"),
        Err(e) => down(e),
    }
}

/// containerd as the checks found it.
struct Containerd {
    version: Option<Version>,
    /// The effective config (from `config dump`, else the file).
    config: DocumentMut,
    certs_dir: Option<PathBuf>,
}

fn containerd(opts: &Options, checks: &mut Vec<Check>) -> Option<Containerd> {
    let detected = Version::detect(&opts.containerd).ok();
    let file = std::fs::read_to_string(&opts.containerd_config).ok();
    if detected.is_none() && file.is_none() {
        checks.push(Check::new(
            Outcome::Skip,
            "containerd",
            format!(
                "no `{}` and no {}",
                opts.containerd.display(),
                opts.containerd_config.display()
            ),
        ));
        return None;
    }
    let (config, source) = match detected {
        Some(_) => {
            let mut args = vec!["config", "dump"];
            let cfg = opts.containerd_config.to_string_lossy().into_owned();
            if file.is_some() {
                args = vec!["--config", &cfg, "config", "dump"];
            }
            match run_bounded(&opts.containerd, &args, LIMIT) {
                Ok(out) => (out, "containerd config dump"),
                Err(e) => {
                    checks.push(
                        Check::new(
                            Outcome::Fail,
                            "containerd config",
                            format!("containerd cannot load it: {e}"),
                        )
                        .fix(format!(
                            "containerd --config {} config dump",
                            opts.containerd_config.display()
                        )),
                    );
                    return None;
                }
            }
        }
        None => (file.clone().unwrap_or_default(), "the file"),
    };
    let config: DocumentMut = match config.parse() {
        Ok(d) => d,
        Err(e) => {
            checks.push(Check::new(
                Outcome::Fail,
                "containerd config",
                format!(
                    "{} is not TOML ({source}): {}",
                    opts.containerd_config.display(),
                    e.message().trim()
                ),
            ));
            return None;
        }
    };
    let version = opts.containerd_version.or(detected).or_else(|| {
        (config.get("version").and_then(Item::as_integer) == Some(3))
            .then_some(Version { major: 2, minor: 0 })
    });
    let said = version.map_or_else(
        || "containerd (version unknown)".into(),
        |v| format!("containerd {v}"),
    );
    let path = super::containerd::registry_config_path(&config);
    let install = "nodemirror containerd install; systemctl restart containerd";
    let mut certs_dir = opts.certs_dir.clone();
    let name = "containerd config_path";
    let check = match path.as_deref() {
        None => Check::new(
            Outcome::Fail,
            name,
            format!("{said} has no config_path ({source}): it reads no hosts.toml and pulls bypass the mirror"),
        )
        .fix(install),
        Some(p) if p.split(':').filter(|f| !f.is_empty()).count() > 1 => {
            let first = p.split(':').next().unwrap_or(p);
            certs_dir.get_or_insert_with(|| PathBuf::from(first));
            let breaks = version.is_none_or(|v| v >= Version { major: 2, minor: 1 });
            Check::new(
                if breaks { Outcome::Fail } else { Outcome::Warn },
                name,
                format!(
                    "{said} has config_path {p:?}: containerd 2.1 and later read it as one folder in \
                     transfer-service mode, so every hosts.toml is ignored{}",
                    if breaks { "" } else { " (after an upgrade)" }
                ),
            )
            .fix(install)
        }
        Some(p) => {
            certs_dir.get_or_insert_with(|| PathBuf::from(p));
            Check::new(Outcome::Ok, name, format!("{said} reads hosts.toml from {p}"))
        }
    };
    checks.push(check);
    if deprecated_mirrors(&config) && path.is_some() {
        checks.push(
            Check::new(
                Outcome::Fail,
                "containerd mirrors",
                "the config sets the deprecated registry.mirrors beside config_path, which the CRI plugin refuses",
            )
            .fix("move them to <certs>/<registry>/hosts.toml"),
        );
    }
    if let Some(dir) = &certs_dir {
        hosts_files(dir, version, &opts.server, checks);
    }
    Some(Containerd {
        version,
        config,
        certs_dir,
    })
}

fn registry_table(doc: &DocumentMut) -> Option<&Item> {
    let (plugin, _) = cri_plugins(doc);
    doc.get("plugins")?.get(plugin)?.get("registry")
}

/// The CRI images plugin's name, and where its sandbox image is.
fn cri_plugins(doc: &DocumentMut) -> (&'static str, [&'static str; 2]) {
    match doc.get("version").and_then(Item::as_integer) {
        Some(3) => ("io.containerd.cri.v1.images", ["pinned_images", "sandbox"]),
        _ => ("io.containerd.grpc.v1.cri", ["sandbox_image", ""]),
    }
}

fn deprecated_mirrors(doc: &DocumentMut) -> bool {
    registry_table(doc)
        .and_then(|r| r.get("mirrors"))
        .and_then(Item::as_table_like)
        .is_some_and(|t| !t.is_empty())
}

fn sandbox_image(doc: &DocumentMut) -> Option<String> {
    let (plugin, [a, b]) = cri_plugins(doc);
    let p = doc.get("plugins")?.get(plugin)?;
    let v = if b.is_empty() {
        p.get(a)?
    } else {
        p.get(a)?.get(b)?
    };
    v.as_str().filter(|s| !s.is_empty()).map(String::from)
}

/// One `[host]` of a hosts.toml as containerd reads it.
#[derive(Debug, Clone)]
struct Host {
    url: String,
    capabilities: Option<Vec<String>>,
    override_path: bool,
}

/// The hosts containerd of `version` reads from hosts.toml text, in the
/// order it tries them, or why it reads none.
fn read_hosts(text: &str, version: Option<Version>) -> Result<Vec<Host>, String> {
    let doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| format!("not valid TOML: {}", e.message().trim()))?;
    let one = version.is_some_and(|v| v.major < 2);
    // containerd 1.x's TOML parser refuses `]` inside a table header.
    if let Some(line) = text.lines().map(str::trim).find(|l| {
        l.starts_with('[')
            && l.trim_start_matches('[')
                .rsplit_once(']')
                .is_some_and(|(inner, _)| inner.trim_end_matches(']').contains(']'))
    }) {
        if one || version.is_none() {
            return Err(format!(
                "containerd 1.x cannot parse `{line}` (an IPv6 address in a table header) and ignores the whole file"
            ));
        }
    }
    let Some(hosts) = doc.get("host").and_then(Item::as_table) else {
        return Ok(Vec::new());
    };
    let mut found: Vec<(Host, bool, isize)> = Vec::new();
    for (url, item) in hosts.iter() {
        let Some(t) = item.as_table() else { continue };
        let caps = t.get("capabilities").and_then(Item::as_array).map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        });
        let host = Host {
            url: url.to_string(),
            capabilities: caps,
            override_path: t
                .get("override_path")
                .and_then(Item::as_bool)
                .unwrap_or(false),
        };
        // Dotted entries come first in the file (before any table).
        found.push((host, t.is_dotted(), t.position().unwrap_or(-1)));
    }
    if !one {
        // containerd 2.x orders hosts by their [host."..."] tables and
        // ignores any other spelling.
        if let Some((h, _, _)) = found.iter().find(|(_, dotted, _)| *dotted) {
            if version.is_some() {
                found.retain(|(_, dotted, _)| !dotted);
            } else {
                return Err(format!(
                    "{} is a dotted key, which containerd 2.x ignores (1.x reads it)",
                    h.url
                ));
            }
        }
    }
    found.sort_by_key(|(_, dotted, pos)| if *dotted { -1 } else { *pos });
    Ok(found.into_iter().map(|(h, _, _)| h).collect())
}

/// `scheme://host:port` of a URL, with localhost and 127.0.0.1 alike.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let u = url::Url::parse(url).ok()?;
    let host = match u.host_str()? {
        "localhost" => "127.0.0.1".to_string(),
        h => h.to_string(),
    };
    Some((u.scheme().to_string(), host, u.port_or_known_default()?))
}

fn same_origin(a: &str, b: &str) -> bool {
    origin(a).is_some_and(|o| Some(o) == origin(b))
}

/// The URL containerd asks for `/v2/...` under, from a host entry.
fn v2_base(h: &Host) -> String {
    let u = h.url.trim_end_matches('/');
    if h.override_path || u.ends_with("/v2") {
        u.to_string()
    } else {
        format!("{u}/v2")
    }
}

fn hosts_files(dir: &Path, version: Option<Version>, server: &str, checks: &mut Vec<Check>) {
    let mut folders: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) => {
            checks.push(
                Check::new(
                    Outcome::Fail,
                    "hosts.toml",
                    format!("{}: {e}", dir.display()),
                )
                .fix("nodemirror containerd install"),
            );
            return;
        }
    };
    folders.sort();
    let mut default_seen = false;
    for folder in folders {
        let file = folder.join("hosts.toml");
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let registry = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_default = registry == "_default";
        default_seen |= is_default;
        let whose = if is_default {
            "every registry without a folder of its own".to_string()
        } else {
            registry.clone()
        };
        let fix = if is_default {
            "nodemirror containerd install".to_string()
        } else {
            format!("nodemirror containerd install --registry {registry}")
        };
        let name = format!("hosts.toml {registry}");
        let check = match read_hosts(&text, version) {
            Err(why) => Check::new(
                Outcome::Fail,
                &name,
                format!("{}: {why}; pulls of {whose} bypass the mirror", file.display()),
            )
            .fix(fix),
            Ok(hosts) => match hosts.first() {
                Some(h) if same_origin(&h.url, server) => {
                    let caps = h.capabilities.clone().unwrap_or_default();
                    let full = h.capabilities.is_none()
                        || (caps.iter().any(|c| c == "pull") && caps.iter().any(|c| c == "resolve"));
                    if full {
                        Check::new(Outcome::Ok, &name, format!("{} tries the mirror first", file.display()))
                    } else {
                        Check::new(
                            Outcome::Fail,
                            &name,
                            format!(
                                "{}: the mirror's capabilities are {caps:?}; tags of {whose} are resolved elsewhere",
                                file.display()
                            ),
                        )
                        .fix("capabilities = [\"pull\", \"resolve\"]")
                    }
                }
                first => Check::new(
                    Outcome::Fail,
                    &name,
                    format!(
                        "{}: first host is {}, not the daemon at {server}: pulls of {whose} bypass the mirror",
                        file.display(),
                        first.map_or("none (the registry itself)", |h| h.url.as_str())
                    ),
                )
                .fix(fix),
            },
        };
        checks.push(check);
    }
    if !default_seen {
        checks.push(
            Check::new(
                Outcome::Fail,
                "hosts.toml _default",
                format!(
                    "no {}: registries without a folder of their own bypass the mirror",
                    dir.join("_default/hosts.toml").display()
                ),
            )
            .fix("nodemirror containerd install"),
        );
    }
}

/// The hosts.toml containerd uses for `registry` (`host:port` folders are
/// also looked up as `host_port_`), and what it reads there.
fn hosts_for(dir: &Path, registry: &str, version: Option<Version>) -> Option<Vec<Host>> {
    let mut candidates = Vec::new();
    if let Some((h, p)) = registry.rsplit_once(':').filter(|(h, _)| !h.is_empty()) {
        candidates.push(format!("{h}_{p}_"));
    }
    candidates.push(registry.to_string());
    candidates.push("_default".into());
    for c in candidates {
        if let Ok(text) = std::fs::read_to_string(dir.join(&c).join("hosts.toml")) {
            return read_hosts(&text, version).ok();
        }
    }
    None
}

/// HEADs the manifest through the daemon as containerd would: to the first
/// host its hosts.toml names for the registry, with containerd's Accept.
async fn manifest(opts: &Options, c: Option<&Containerd>, checks: &mut Vec<Check>) {
    let name = "manifest";
    let wanted = opts
        .image
        .clone()
        .or_else(|| c.and_then(|c| sandbox_image(&c.config)))
        .unwrap_or_else(|| "registry.k8s.io/pause:3.10".into());
    let image: ImageRef = match wanted.parse() {
        Ok(i) => i,
        Err(e) => {
            checks.push(Check::new(Outcome::Fail, name, format!("{wanted}: {e}")));
            return;
        }
    };
    let registry = image.namespace.as_str().to_string();
    let host = c
        .and_then(|c| Some((c.certs_dir.as_ref()?, c.version)))
        .and_then(|(dir, v)| hosts_for(dir, &registry, v))
        .and_then(|hosts| {
            hosts
                .into_iter()
                .find(|h| same_origin(&h.url, &opts.server))
        });
    let base = match &host {
        Some(h) => v2_base(h),
        None => format!("{}/v2", opts.server.trim_end_matches('/')),
    };
    let url = format!(
        "{base}/{}/manifests/{}?ns={}",
        image.repository,
        image.reference,
        url::form_urlencoded::byte_serialize(registry.as_bytes()).collect::<String>()
    );
    let agent = format!(
        "containerd/{}",
        c.and_then(|c| c.version)
            .map_or("1.6".into(), |v| v.to_string())
    );
    let headers = [(ACCEPT, CONTAINERD_ACCEPT.to_string()), (USER_AGENT, agent)];
    let check = match crate::admin::request(Method::HEAD, &url, &headers, LIMIT).await {
        Ok((StatusCode::OK, h, _)) => {
            let digest = h
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no digest");
            let kind = h
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no type");
            Check::new(
                Outcome::Ok,
                name,
                format!("HEAD {url}: 200, {digest}, {kind}"),
            )
        }
        Ok((status, _, _)) => {
            // HEAD has no body: the error's text comes with a GET.
            let said = crate::admin::request(Method::GET, &url, &headers, LIMIT)
                .await
                .ok()
                .and_then(|(_, _, b)| error_message(&b))
                .unwrap_or_default();
            let fix = match status.as_u16() {
                401 | 403 => "check the registry's credentials (auth.json) and, for a private registry, allowed_uids",
                404 => "check the image name and tag (--image); the registry said it has no such manifest",
                429 => "the registry is rate-limiting: wait, or add credentials",
                _ => "every endpoint of the registry failed: journalctl -u nodemirror",
            };
            Check::new(
                Outcome::Fail,
                name,
                format!("HEAD {url}: {status} {said}")
                    .trim_end()
                    .to_string(),
            )
            .fix(fix)
        }
        Err(e) => Check::new(Outcome::Fail, name, format!("HEAD {url}: {e}"))
            .fix("systemctl status nodemirror"),
    };
    checks.push(check);
}

/// The first message of an OCI error body.
fn error_message(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let e = v.get("errors")?.get(0)?;
    Some(format!(
        "{}: {}",
        e.get("code")?.as_str()?,
        e.get("message").and_then(|m| m.as_str()).unwrap_or("")
    ))
}

fn crio_dropin(dir: &Path, server: &str) -> Check {
    let name = "containers/image drop-in";
    let containers = dir.parent().unwrap_or(dir);
    if !containers.is_dir() {
        return Check::new(
            Outcome::Skip,
            name,
            format!("no {} (no CRI-O or podman here)", containers.display()),
        );
    }
    let ours = dir.join(crio::FILE_NAME);
    let Ok(text) = std::fs::read_to_string(&ours) else {
        return Check::new(
            Outcome::Fail,
            name,
            format!(
                "no {}: CRI-O, podman and skopeo pull without the mirror",
                ours.display()
            ),
        )
        .fix("nodemirror crio install; systemctl reload crio");
    };
    let prefixes = match registries_with_mirror(&text, server) {
        Ok(p) => p,
        Err(why) => {
            return Check::new(Outcome::Fail, name, format!("{}: {why}", ours.display()))
                .fix("nodemirror crio install")
        }
    };
    // Drop-ins read later replace entries with the same prefix.
    let mut later: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.extension().is_some_and(|e| e == "conf") && p.file_name() > ours.file_name()
                })
                .collect()
        })
        .unwrap_or_default();
    later.sort();
    for file in later {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let Ok(doc) = text.parse::<DocumentMut>() else {
            continue;
        };
        let theirs = doc
            .get("registry")
            .and_then(Item::as_array_of_tables)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.get("prefix").or(t.get("location")))
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if let Some(p) = theirs.iter().find(|p| prefixes.contains(p)) {
            return Check::new(
                Outcome::Fail,
                name,
                format!(
                    "{} is read after {} and replaces its entry for {p}",
                    file.display(),
                    ours.display()
                ),
            )
            .fix(format!("remove {p} from {}", file.display()));
        }
    }
    Check::new(
        Outcome::Ok,
        name,
        format!(
            "{} sends {} to the mirror",
            ours.display(),
            prefixes.join(", ")
        ),
    )
}

/// The prefixes of a drop-in whose first mirror is the daemon; an error
/// names one whose is not.
fn registries_with_mirror(text: &str, server: &str) -> Result<Vec<String>, String> {
    let doc: DocumentMut = text
        .parse()
        .map_err(|e: toml_edit::TomlError| format!("not valid TOML: {}", e.message().trim()))?;
    let (scheme, host, port) = origin(server).ok_or("the daemon URL has no host")?;
    let mut out = Vec::new();
    for r in doc
        .get("registry")
        .and_then(Item::as_array_of_tables)
        .into_iter()
        .flat_map(|a| a.iter())
    {
        let prefix = r
            .get("prefix")
            .or(r.get("location"))
            .and_then(Item::as_str)
            .unwrap_or("?")
            .to_string();
        let first = r
            .get("mirror")
            .and_then(Item::as_array_of_tables)
            .and_then(|m| m.iter().next())
            .and_then(|m| m.get("location"))
            .and_then(Item::as_str)
            .unwrap_or("");
        if !same_origin(
            &format!("{scheme}://{first}"),
            &format!("{scheme}://{host}:{port}"),
        ) {
            return Err(format!(
                "the first mirror of {prefix} is {first:?}, not the daemon at {server}"
            ));
        }
        out.push(prefix);
    }
    if out.is_empty() {
        return Err("it names no registry".into());
    }
    Ok(out)
}

fn registries_yaml(path: &Path, server: &str) -> Option<Check> {
    let dir = path.parent()?;
    if !dir.is_dir() {
        return None;
    }
    let name = format!("registries.yaml {}", dir.display());
    let fix = format!(
        "nodemirror registries-yaml --merge {} and restart rke2/k3s",
        path.display()
    );
    let Ok(text) = std::fs::read_to_string(path) else {
        return Some(
            Check::new(
                Outcome::Fail,
                &name,
                format!("no {}: rke2/k3s pull without the mirror", path.display()),
            )
            .fix(fix),
        );
    };
    let doc: serde_yaml_ng::Value = match serde_yaml_ng::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return Some(
                Check::new(Outcome::Fail, &name, format!("{}: {e}", path.display())).fix(fix),
            )
        }
    };
    let mirrors = doc.get("mirrors").and_then(|m| m.as_mapping());
    let first = |registry: &serde_yaml_ng::Value| {
        registry
            .get("endpoint")
            .and_then(|e| e.as_sequence())
            .and_then(|s| s.first())
            .and_then(|e| e.as_str())
            .map(String::from)
    };
    let mut bypass = Vec::new();
    let mut star = false;
    for (k, v) in mirrors.into_iter().flatten() {
        let k = k.as_str().unwrap_or("?");
        let ours = first(v).is_some_and(|e| same_origin(&e, server));
        if k == "*" {
            star = ours;
        } else if !ours {
            bypass.push(k.to_string());
        }
    }
    Some(if !star {
        Check::new(
            Outcome::Fail,
            &name,
            format!(
                "{}: the \"*\" mirror's first endpoint is not the daemon at {server}",
                path.display()
            ),
        )
        .fix(fix)
    } else if !bypass.is_empty() {
        Check::new(
            Outcome::Fail,
            &name,
            format!(
                "{}: {} have mirrors of their own without the daemon first, and bypass it",
                path.display(),
                bypass.join(", ")
            ),
        )
        .fix(format!("put {server} first in their endpoint lists"))
    } else {
        Check::new(
            Outcome::Ok,
            &name,
            format!("{} sends every registry to the mirror", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: Option<Version> = Some(Version { major: 1, minor: 6 });
    const V2: Option<Version> = Some(Version { major: 2, minor: 1 });

    #[test]
    fn hosts_are_read_as_each_version_reads_them() {
        let table = "server = \"http://127.0.0.1:9\"\n[host.\"http://[::1]:5780\"]\n  capabilities = [\"pull\", \"resolve\"]\n[host.\"https://b\"]\n";
        assert!(read_hosts(table, V1).unwrap_err().contains("cannot parse"));
        let h = read_hosts(table, V2).unwrap();
        assert_eq!(h[0].url, "http://[::1]:5780");
        assert_eq!(h[1].url, "https://b");

        let dotted = "host.\"http://[::1]:5780\".capabilities = [\"pull\", \"resolve\"]\nserver = \"x\"\n[host.\"https://b\"]\n";
        let h = read_hosts(dotted, V1).unwrap();
        assert_eq!(h[0].url, "http://[::1]:5780");
        let h = read_hosts(dotted, V2).unwrap();
        assert_eq!(h.len(), 1, "2.x ignores the dotted key");
        assert_eq!(h[0].url, "https://b");
        assert!(read_hosts(dotted, None).is_err());
        assert!(read_hosts("[host", V2).is_err());
    }

    #[test]
    fn origins_and_paths() {
        assert!(same_origin(
            "http://localhost:5780",
            "http://127.0.0.1:5780/"
        ));
        assert!(!same_origin(
            "http://127.0.0.1:5781",
            "http://127.0.0.1:5780"
        ));
        assert!(same_origin("http://[::1]:5780/v2", "http://[::1]:5780"));
        let h = |url: &str, o| Host {
            url: url.into(),
            capabilities: None,
            override_path: o,
        };
        assert_eq!(v2_base(&h("http://m:1", false)), "http://m:1/v2");
        assert_eq!(v2_base(&h("http://m:1/v2", false)), "http://m:1/v2");
        assert_eq!(v2_base(&h("http://m:1/x", true)), "http://m:1/x");
    }
}
