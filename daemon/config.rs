//! Daemon configuration: `/etc/nodemirror/config.toml` overlaid by
//! command-line flags (flags win), validated into [`Settings`]; and the
//! upstream routes under `hosts.d` ([`hosts`]).

pub mod cluster;
pub(crate) mod hosts;
mod source;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use source::{parse_duration, parse_size, read_config_file, ConfigError, ConfigErrors};
use source::{visit_table, Source};

use crate::reference::Namespace;

/// Where the daemon looks for its configuration when not told.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/nodemirror/config.toml";
/// Default listen address: loopback, away from a local registry on 5000.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5780";
pub const DEFAULT_HOSTS_DIR: &str = "/etc/nodemirror/hosts.d";
pub const DEFAULT_AUTH_FILE: &str = "/etc/nodemirror/auth.json";

/// How namespaces without a hosts.d folder (reached at `https://<ns>`)
/// are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImplicitPolicy {
    /// Contacted only when every address they resolve to is public (default).
    Public,
    /// Contacted at any address (opt-in: a lab without hosts.d).
    Any,
    /// Refused: only namespaces in hosts.d (or `_default`'s server) are served.
    Off,
}

/// The shortest timeout a setting may have: zero would cut everything.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// How long a client following another namespace's fetch watches it
/// fall behind `takeover_rate` (or not start) before it starts its own.
pub const TAKEOVER_WINDOW: Duration = Duration::from_secs(3);

/// The most connections one blob is fetched over.
pub const MAX_PARALLEL_FETCHES: usize = 32;

/// Timeouts, back-off and admission for upstream endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// TCP (and TLS) connect.
    pub connect_timeout: Duration,
    /// From sending a request to the response headers.
    pub first_byte_timeout: Duration,
    /// Longest silence while a response body streams.
    pub idle_timeout: Duration,
    /// How long a failed endpoint is skipped; doubles per consecutive
    /// failure up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// Upstream fetches under way at once, in all and per namespace;
    /// requests beyond wait up to `fetch_wait`, then get 503.
    pub max_fetches: usize,
    pub max_fetches_per_namespace: usize,
    pub fetch_wait: Duration,
    /// Bytes per second below which a blob fetch is cut (measured over
    /// `idle_timeout`; at once, over a few seconds, when nobody reads it).
    pub min_rate: u64,
    /// The longest a blob fetch may take.
    pub fetch_deadline: Duration,
    /// Connections a blob of at least `parallel_threshold` bytes is
    /// fetched over, in ranges, from an endpoint that honours `Range`
    /// (1: one stream). hosts.toml may set both per endpoint.
    pub parallel_fetches: usize,
    pub parallel_threshold: u64,
    /// A client following another namespace's fetch of the same blob
    /// starts its own namespace's fetch when that one brings less than
    /// this many bytes per second over [`TAKEOVER_WINDOW`].
    pub takeover_rate: u64,
    /// After a range read of a blob that is not cached: fetch the rest of
    /// the blob at once (true, `range_rest = "background"`), so it is
    /// verified and cached, or only the ranges readers ask for
    /// (`"on-demand"`), which are never cached.
    pub range_rest_background: bool,
    /// Namespaces without a hosts.d folder.
    pub implicit_namespaces: ImplicitPolicy,
    /// When not empty, the only namespaces without a hosts.d folder served.
    pub allowed_namespaces: Vec<Namespace>,
    /// The proxy for upstream connections and its exceptions, in place of
    /// the environment's `HTTPS_PROXY`/`HTTP_PROXY` and `NO_PROXY`
    /// (`"none"`: no proxy whatever the environment says).
    pub proxy: Option<String>,
    pub no_proxy: Option<String>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_timeout: Duration::from_secs(3),
            first_byte_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            backoff: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            max_fetches: 128,
            max_fetches_per_namespace: 32,
            fetch_wait: Duration::from_secs(5),
            min_rate: 16 << 10,
            fetch_deadline: Duration::from_secs(3600),
            parallel_fetches: 6,
            parallel_threshold: 32 << 20,
            takeover_rate: 1 << 20,
            range_rest_background: true,
            implicit_namespaces: ImplicitPolicy::Public,
            allowed_namespaces: Vec::new(),
            proxy: None,
            no_proxy: None,
        }
    }
}

/// The free-disk floor: bytes, or a share of the cache's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinFree {
    Bytes(u64),
    Percent(u8),
}

/// Cache behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    /// Blobs take at most this much; least recently used go first.
    pub max_size: Option<u64>,
    /// Evict while the filesystem has less free than this.
    pub min_free: MinFree,
    /// How long a tag's digest is trusted before a HEAD revalidates it.
    pub tag_ttl: Duration,
    /// How often the background collection runs.
    pub gc_interval: Duration,
    /// Bytes per second of cached blobs re-hashed in the background (a
    /// damaged one is quarantined and fetched again); 0: never.
    pub verify_rate: u64,
    /// The largest blob cached: a bigger one (announced, or as it
    /// arrives) is not fetched.
    pub max_blob_size: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_size: None,
            min_free: MinFree::Percent(10),
            tag_ttl: Duration::from_secs(60),
            gc_interval: Duration::from_secs(300),
            verify_rate: 16 << 20,
            max_blob_size: 64 << 30,
        }
    }
}

/// Who may pull content of private namespaces (those with credentials
/// or `private = true`): local clients whose user, or one of whose
/// groups, is listed. Identified by the owner of the connecting socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// `listen` may be an address beyond loopback (other hosts then reach
    /// the daemon); without it such an address is a configuration error.
    pub listen_beyond_loopback: bool,
    /// Client connections served at once (the peer port has as many);
    /// past it a connection gets a quick 503 and is closed.
    pub max_connections: usize,
    /// A connection whose client reads nothing for this long is closed.
    pub send_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            allowed_uids: vec![0],
            allowed_gids: Vec::new(),
            listen_beyond_loopback: false,
            max_connections: 1024,
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// The validated daemon configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub cache_dir: PathBuf,
    pub hosts_dir: PathBuf,
    /// Namespace of requests that carry no `?ns=`.
    pub default_namespace: Namespace,
    /// A docker `config.json`-format file with upstream credentials.
    pub auth_file: Option<PathBuf>,
    pub upstream: UpstreamSettings,
    pub cache: CacheSettings,
    /// Who may pull private namespaces.
    pub server: ServerSettings,
    /// Cluster mode, when `[cluster]` is present.
    pub cluster: Option<cluster::ClusterSettings>,
    /// Where these settings came from, to load them again on reload;
    /// `None` for settings built in code, which reload keeps as they are.
    pub origin: Option<Origin>,
}

/// The config file argument and flags settings were loaded with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// `--config` as given (`None`: the default file, if it exists).
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
}

/// Values given on the command line; each one wins over the file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub cache_dir: Option<PathBuf>,
    pub hosts_dir: Option<PathBuf>,
    pub default_namespace: Option<Namespace>,
    pub auth_file: Option<PathBuf>,
}

impl Settings {
    /// Loads `config` (or [`DEFAULT_CONFIG_FILE`] if it exists) and applies
    /// `overrides`. An explicitly named file must exist.
    pub fn load(config: Option<&Path>, overrides: Overrides) -> Result<Settings, ConfigErrors> {
        let mut settings = Settings::defaults();
        settings.origin = Some(Origin {
            config: config.map(Path::to_path_buf),
            overrides: overrides.clone(),
        });
        let file = match config {
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        let mut listen_at = ConfigError {
            path: PathBuf::from("--listen"),
            line: 0,
            message: String::new(),
        };
        if let Some(path) = file {
            let src = Source::read(&path)?;
            settings.apply_file(&src)?;
            if overrides.listen.is_none() {
                let root = src.doc.as_table();
                listen_at = src.error(source::span_of(root, "listen"), "");
            }
        }
        let o = overrides;
        settings.listen = o.listen.unwrap_or(settings.listen);
        if !settings.listen.ip().is_loopback() && !settings.server.listen_beyond_loopback {
            listen_at.message = format!(
                "`listen` {} is beyond loopback: every host that reaches it could pull through \
                 this daemon; set [server] listen_beyond_loopback = true if that is meant",
                settings.listen
            );
            return Err(listen_at.into());
        }
        settings.cache_dir = o.cache_dir.unwrap_or(settings.cache_dir);
        settings.hosts_dir = o.hosts_dir.unwrap_or(settings.hosts_dir);
        settings.default_namespace = o.default_namespace.unwrap_or(settings.default_namespace);
        if o.auth_file.is_some() {
            settings.auth_file = o.auth_file;
        }
        Ok(settings)
    }

    /// Loads the settings again from where these came from (file, then
    /// the same flags on top).
    pub fn reload(&self) -> Result<Settings, ConfigErrors> {
        match &self.origin {
            Some(o) => Settings::load(o.config.as_deref(), o.overrides.clone()),
            None => Ok(self.clone()),
        }
    }

    /// The config file these settings were read from, if any.
    pub fn config_file(&self) -> Option<PathBuf> {
        match self.origin.as_ref()?.config.clone() {
            Some(p) => Some(p),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        }
    }

    /// The embedded defaults: loopback listener, a cache directory the user
    /// can write, `/etc/nodemirror/hosts.d`, docker.io for bare requests.
    pub fn defaults() -> Settings {
        Settings {
            // Both parse: they are constants checked by the tests below.
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5780))),
            cache_dir: default_cache_dir(),
            hosts_dir: PathBuf::from(DEFAULT_HOSTS_DIR),
            default_namespace: docker_io(),
            auth_file: Some(PathBuf::from(DEFAULT_AUTH_FILE)).filter(|p| p.exists()),
            upstream: UpstreamSettings::default(),
            cache: CacheSettings::default(),
            server: ServerSettings::default(),
            cluster: None,
            origin: None,
        }
    }

    fn apply_file(&mut self, src: &Source) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let base = src.path.parent().unwrap_or(Path::new("/")).to_path_buf();
        let root = src.doc.as_table();
        visit_table(src, root, &mut errors, |f| {
            match f.key {
                "listen" => {
                    self.listen = f.str()?.parse().map_err(|e| {
                        src.error(
                            f.span.clone(),
                            format!("`listen` must be ADDRESS:PORT: {e}"),
                        )
                    })?
                }
                "cache_dir" => self.cache_dir = base.join(f.str()?),
                "hosts_dir" => self.hosts_dir = base.join(f.str()?),
                "auth_file" => self.auth_file = Some(base.join(f.str()?)),
                "default_namespace" => {
                    self.default_namespace = f
                        .str()?
                        .parse()
                        .map_err(|e| src.error(f.span.clone(), format!("{e}")))?
                }
                "upstream" => {
                    let u = &mut self.upstream;
                    f.section(|f| {
                        let field = match f.key {
                            "implicit_namespaces" => {
                                u.implicit_namespaces = match f.str()? {
                                    "public" => ImplicitPolicy::Public,
                                    "any" => ImplicitPolicy::Any,
                                    "off" => ImplicitPolicy::Off,
                                    other => {
                                        return Err(f
                                            .src
                                            .error(
                                                f.span.clone(),
                                                format!(
                                                    "`implicit_namespaces` is \"public\", \"any\" or \"off\", not {other:?}"
                                                ),
                                            )
                                            .into())
                                    }
                                };
                                return Ok(());
                            }
                            "allowed_namespaces" => {
                                let mut out = Vec::new();
                                for n in f.strings()? {
                                    out.push(n.parse().map_err(|e| {
                                        ConfigErrors::from(src.error(f.span.clone(), format!("{e}")))
                                    })?);
                                }
                                u.allowed_namespaces = out;
                                return Ok(());
                            }
                            "max_fetches" | "max_fetches_per_namespace" => {
                                let n = f.size()?;
                                let n = usize::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
                                    ConfigErrors::from(src.error(
                                        f.span.clone(),
                                        format!("`{}` must be at least 1", f.key),
                                    ))
                                })?;
                                if f.key == "max_fetches" {
                                    u.max_fetches = n;
                                } else {
                                    u.max_fetches_per_namespace = n;
                                }
                                return Ok(());
                            }
                            "min_rate" => {
                                u.min_rate = f.size()?;
                                if u.min_rate == 0 {
                                    return Err(src
                                        .error(
                                            f.span.clone(),
                                            "`min_rate` must be at least 1 byte/s (a fetch that brings nothing is never cut otherwise)",
                                        )
                                        .into());
                                }
                                return Ok(());
                            }
                            "parallel_fetches" => {
                                u.parallel_fetches = f.count(1, MAX_PARALLEL_FETCHES)?;
                                return Ok(());
                            }
                            "parallel_threshold" => {
                                u.parallel_threshold = f.size()?;
                                return Ok(());
                            }
                            "takeover_rate" => {
                                u.takeover_rate = f.size()?;
                                return Ok(());
                            }
                            "proxy" => {
                                let raw = f.str()?;
                                crate::upstream::proxy::check_url(raw).map_err(|e| {
                                    f.src.error(f.span.clone(), format!("`proxy`: {e}"))
                                })?;
                                u.proxy = Some(raw.to_string());
                                return Ok(());
                            }
                            "no_proxy" => {
                                u.no_proxy = Some(f.str()?.to_string());
                                return Ok(());
                            }
                            "range_rest" => {
                                u.range_rest_background = match f.str()? {
                                    "background" => true,
                                    "on-demand" => false,
                                    other => {
                                        return Err(f
                                            .src
                                            .error(
                                                f.span.clone(),
                                                format!("`range_rest` is \"background\" or \"on-demand\", not {other:?}"),
                                            )
                                            .into())
                                    }
                                };
                                return Ok(());
                            }
                            // Zero is meaningful here: no wait, no back-off.
                            "fetch_wait" => &mut u.fetch_wait,
                            "backoff" => &mut u.backoff,
                            "backoff_max" => &mut u.backoff_max,
                            // Zero would cut every fetch or connection.
                            "fetch_deadline" | "connect_timeout" | "first_byte_timeout"
                            | "idle_timeout" => {
                                let d = f.duration_from(MIN_TIMEOUT)?;
                                *match f.key {
                                    "fetch_deadline" => &mut u.fetch_deadline,
                                    "connect_timeout" => &mut u.connect_timeout,
                                    "first_byte_timeout" => &mut u.first_byte_timeout,
                                    _ => &mut u.idle_timeout,
                                } = d;
                                return Ok(());
                            }
                            _ => return Err(f.unknown()),
                        };
                        *field = f.duration()?;
                        Ok(())
                    })?;
                }
                "cluster" => self.cluster = Some(cluster::parse(&f, &base)?),
                "server" => {
                    let s = &mut self.server;
                    f.section(|f| {
                        match f.key {
                            "allowed_uids" => s.allowed_uids = ids(&f, Id::User)?,
                            "allowed_gids" => s.allowed_gids = ids(&f, Id::Group)?,
                            "listen_beyond_loopback" => s.listen_beyond_loopback = f.bool()?,
                            "max_connections" => s.max_connections = f.count(1, 1 << 20)?,
                            "send_timeout" => {
                                s.send_timeout = f.duration_from(Duration::from_secs(1))?
                            }
                            _ => return Err(f.unknown()),
                        }
                        Ok(())
                    })?;
                }
                "cache" => {
                    let c = &mut self.cache;
                    f.section(|f| {
                        match f.key {
                            "max_size" => c.max_size = Some(f.size()?),
                            "min_free" => c.min_free = min_free(&f)?,
                            "tag_ttl" => c.tag_ttl = f.duration()?,
                            "gc_interval" => {
                                c.gc_interval = f.duration_from(Duration::from_secs(1))?
                            }
                            "verify_rate" => c.verify_rate = f.size()?,
                            "max_blob_size" => {
                                c.max_blob_size = f.size()?;
                                if c.max_blob_size == 0 {
                                    return Err(f
                                        .src
                                        .error(
                                            f.span.clone(),
                                            "`max_blob_size` must be at least 1 byte",
                                        )
                                        .into());
                                }
                            }
                            _ => return Err(f.unknown()),
                        }
                        Ok(())
                    })?;
                }
                _ => return Err(f.unknown()),
            }
            Ok(())
        });
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// The registries hosts.d configures (its folders other than `_default`).
pub fn configured_namespaces(hosts_dir: &Path) -> Result<Vec<Namespace>, ConfigErrors> {
    hosts::load_dir(hosts_dir)
        .map(|d| d.namespaces.into_keys().collect())
        .map_err(ConfigErrors)
}

/// Which kind of account a name in `[server]` is.
#[derive(Clone, Copy)]
enum Id {
    User,
    Group,
}

/// A list of numeric ids or account names (resolved now, through the
/// system's user database).
fn ids(f: &source::Field<'_>, kind: Id) -> Result<Vec<u32>, ConfigError> {
    let what = match kind {
        Id::User => "user",
        Id::Group => "group",
    };
    let wrong = |why: String| f.src.error(f.span.clone(), why);
    let Some(items) = f.item.as_array() else {
        return Err(wrong(format!(
            "`{}` must be an array of {what} ids or names",
            f.key
        )));
    };
    let mut out = Vec::new();
    for v in items.iter() {
        let id = if let Some(n) = v.as_integer() {
            u32::try_from(n).map_err(|_| wrong(format!("{n} is not a {what} id")))?
        } else if let Some(name) = v.as_str() {
            let found = match kind {
                Id::User => nix::unistd::User::from_name(name).map(|u| u.map(|u| u.uid.as_raw())),
                Id::Group => nix::unistd::Group::from_name(name).map(|g| g.map(|g| g.gid.as_raw())),
            };
            match found {
                Ok(Some(id)) => id,
                Ok(None) => return Err(wrong(format!("no {what} named {name:?} on this system"))),
                Err(e) => return Err(wrong(format!("looking up {what} {name:?}: {e}"))),
            }
        } else {
            return Err(wrong(format!(
                "`{}` must be an array of {what} ids or names",
                f.key
            )));
        };
        out.push(id);
    }
    Ok(out)
}

/// `"10%"` of the filesystem, or a size.
fn min_free(f: &source::Field<'_>) -> Result<MinFree, ConfigError> {
    if let Some(p) = f.item.as_str().and_then(|s| s.trim().strip_suffix('%')) {
        return match p.trim().parse::<u8>() {
            Ok(n) if n <= 100 => Ok(MinFree::Percent(n)),
            _ => Err(f
                .src
                .error(f.span.clone(), "`min_free` percentage must be 0% to 100%")),
        };
    }
    f.size().map(MinFree::Bytes)
}

fn docker_io() -> Namespace {
    // A constant that parses: checked by the `defaults_are_valid` test.
    "docker.io"
        .parse()
        .unwrap_or_else(|_| unreachable!("docker.io is a valid namespace"))
}

/// `$CACHE_DIRECTORY` under systemd, `/var/cache/nodemirror` for root,
/// else the user's cache folder.
fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CACHE_DIRECTORY") {
        // systemd may pass several, separated by ':'; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        if !first.is_empty() {
            return PathBuf::from(first);
        }
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/cache/nodemirror");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("nodemirror")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("config.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(DEFAULT_LISTEN.parse::<SocketAddr>().unwrap().port(), 5780);
        assert_eq!(Settings::defaults().default_namespace.as_str(), "docker.io");
    }

    #[test]
    fn file_then_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "listen = \"127.0.0.1:9000\"\ncache_dir = \"cache\"\nhosts_dir = \"/x/hosts.d\"\n\n[upstream]\nconnect_timeout = \"250ms\"\nbackoff = 2\n",
        );
        let s = Settings::load(Some(&p), Overrides::default()).unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.cache_dir, dir.path().join("cache"));
        assert_eq!(s.hosts_dir, PathBuf::from("/x/hosts.d"));
        assert_eq!(s.upstream.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.upstream.backoff, Duration::from_secs(2));
        assert_eq!(s.cache, CacheSettings::default());

        let o = Overrides {
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            hosts_dir: Some("/y".into()),
            ..Default::default()
        };
        let s = Settings::load(Some(&p), o).unwrap();
        assert_eq!(s.listen.port(), 9100);
        assert_eq!(s.hosts_dir, PathBuf::from("/y"));
        assert_eq!(s.cache_dir, dir.path().join("cache"));
    }

    #[test]
    fn cache_section() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[cache]\nmax_size = \"20GiB\"\nmin_free = \"15%\"\ntag_ttl = \"30s\"\ngc_interval = 60\n",
        );
        let c = Settings::load(Some(&p), Overrides::default())
            .unwrap()
            .cache;
        assert_eq!(c.max_size, Some(20 << 30));
        assert_eq!(c.min_free, MinFree::Percent(15));
        assert_eq!(c.tag_ttl, Duration::from_secs(30));
        assert_eq!(c.gc_interval, Duration::from_secs(60));
        let p = write(dir.path(), "[cache]\nmin_free = \"1GiB\"\n");
        let c = Settings::load(Some(&p), Overrides::default())
            .unwrap()
            .cache;
        assert_eq!(c.min_free, MinFree::Bytes(1 << 30));
        let p = write(dir.path(), "[cache]\nmin_free = \"150%\"\n");
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        assert_eq!(e.0[0].line, 2, "{e}");
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "listen = \"nope\"\nlisen = 1\n[upstream]\nidle_timeout = \"forever\"\n",
        );
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        let lines: Vec<usize> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, [1, 2, 4], "{e}");
        assert!(
            e.to_string().contains("config.toml:2: unknown key `lisen`"),
            "{e}"
        );
    }

    #[test]
    fn cluster_settings_and_their_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[cluster]\nlisten = \"10.0.0.5:5781\"\npeers = [\"10.0.0.6:5781\"]\npeers_dns = \"peers.svc:5781\"\nca = \"c/ca.pem\"\ncert = \"c/n.pem\"\nkey = \"c/n-key.pem\"\n",
        );
        let c = Settings::load(Some(&p), Overrides::default())
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.advertise, c.listen, "advertise defaults to listen");
        assert_eq!(c.peers_dns, Some(("peers.svc".to_string(), 5781)));
        assert_eq!(c.ca, dir.path().join("c/ca.pem"));
        assert_eq!(c.peer_timeout, Duration::from_millis(300));
        for (text, line, says) in [
            ("[cluster]\nlisten = \"10.0.0.5\"\n", 2, "is not IP:PORT"),
            (
                "[cluster]\nlisten = \"10.0.0.5:1\"\npeers_dns = \"name\"\n",
                3,
                "is not NAME:PORT",
            ),
            (
                "[cluster]\nlisten = \"10.0.0.5:1\"\npeers = [\"10.0.0.6:1\"]\n",
                1,
                "needs `ca`",
            ),
            (
                "[cluster]\nlisten = \"10.0.0.5:1\"\n",
                1,
                "needs `peers or peers_dns`",
            ),
            ("[cluster]\nlisen = 1\n", 2, "unknown key `lisen`"),
        ] {
            let p = write(dir.path(), text);
            let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
            assert_eq!(e.0[0].line, line, "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn every_error_inside_a_section_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[upstream]\nconnect_timeout = \"soon\"\nbackof = 1\nidle_timeout = -1\n[cache]\nmax_size = \"big\"\ntag_ttl = \"1m\"\ngc_intervall = 5\n",
        );
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        let lines: Vec<usize> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4, 6, 8], "{e}");
        let p = write(dir.path(), "upstream = 5\n");
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        assert!(
            e.to_string().contains(":1: `upstream` must be a table"),
            "{e}"
        );
    }

    #[test]
    fn durations_are_bounded_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[upstream]\nbackoff = \"5124095576030431h\"\nfetch_deadline = \"8785h\"\n[cache]\ntag_ttl = \"8784h\"\n",
        );
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        let lines: Vec<usize> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3], "{e}");
        assert!(e.to_string().contains("at most 8784h"), "{e}");
    }

    #[test]
    fn proxy_settings_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[upstream]\nproxy = \"socks5h://u:p@127.0.0.1:1080\"\nno_proxy = \"corp.example,10.0.0.0/8\"\n",
        );
        let u = Settings::load(Some(&p), Overrides::default())
            .unwrap()
            .upstream;
        assert_eq!(u.proxy.as_deref(), Some("socks5h://u:p@127.0.0.1:1080"));
        assert_eq!(u.no_proxy.as_deref(), Some("corp.example,10.0.0.0/8"));
        let p = write(dir.path(), "[upstream]\n\nproxy = \"https://proxy:3128\"\n");
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        assert_eq!(e.0[0].line, 3, "{e}");
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn server_section_names_users_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Settings::defaults().server.allowed_uids, [0], "root only");
        let p = write(
            dir.path(),
            "[server]\nallowed_uids = [0, \"root\", 1000]\nallowed_gids = [\"root\"]\n",
        );
        let s = Settings::load(Some(&p), Overrides::default())
            .unwrap()
            .server;
        assert_eq!(s.allowed_uids, [0, 0, 1000]);
        assert_eq!(s.allowed_gids, [0]);
        let p = write(
            dir.path(),
            "[server]\nallowed_uids = [\"no-such-user-here\"]\nallowed_gids = 5\nallowed = 1\n",
        );
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        let lines: Vec<usize> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4], "{e}");
        assert!(e.to_string().contains("no user named"), "{e}");
    }

    #[test]
    fn named_file_must_exist() {
        let e = Settings::load(
            Some(Path::new("/nonexistent/nm.toml")),
            Overrides::default(),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/nm.toml: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn zero_where_zero_means_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "[upstream]\nidle_timeout = 0\nfetch_deadline = \"0s\"\nmin_rate = 0\nconnect_timeout = \"50ms\"\nbackoff = 0\nfetch_wait = 0\n[cache]\ngc_interval = 0\ntag_ttl = 0\n",
        );
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        let lines: Vec<usize> = e.0.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 9], "{e}");
    }

    #[test]
    fn listening_beyond_loopback_must_be_meant() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "# a node\nlisten = \"0.0.0.0:5780\"\n");
        let e = Settings::load(Some(&p), Overrides::default()).unwrap_err();
        assert_eq!(e.0[0].line, 2, "{e}");
        assert!(e.to_string().contains("beyond loopback"), "{e}");
        let flag = Overrides {
            listen: Some("[::]:5780".parse().unwrap()),
            ..Default::default()
        };
        let e = Settings::load(None, flag.clone()).unwrap_err();
        assert!(
            e.to_string().starts_with("--listen: `listen` [::]:5780"),
            "{e}"
        );
        let p = write(
            dir.path(),
            "listen = \"0.0.0.0:5780\"\n[server]\nlisten_beyond_loopback = true\n",
        );
        let s = Settings::load(Some(&p), Overrides::default()).unwrap();
        assert!(s.server.listen_beyond_loopback);
        assert!(Settings::load(Some(&p), flag).is_ok());
    }
}
