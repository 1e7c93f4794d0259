//! The `nodemirror` command: parses the command line, sets up logging,
//! loads configuration and hands over to [`nodemirror::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nodemirror::config::{ConfigErrors, Overrides, Settings};
use nodemirror::reference::Namespace;
use nodemirror::StartError;

#[derive(Parser)]
#[command(
    version,
    about = "Node-local pull-through mirror for every container registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the mirror (the default when no command is given).
    Serve(ServeArgs),
    /// Validate the configuration and hosts.d, print the result, exit.
    CheckConfig(ServeArgs),
    /// Inspect and maintain the cache (safe while the daemon runs).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Point containerd at the mirror (certs.d hosts.toml and config_path), or undo it.
    Containerd {
        #[command(subcommand)]
        action: ContainerdAction,
    },
    /// Give CRI-O, podman, skopeo and buildah the mirror (a registries.conf.d drop-in), or undo it.
    Crio {
        #[command(subcommand)]
        action: CrioAction,
    },
    /// Print (or merge into a file) an rke2/k3s registries.yaml that sends every registry to the mirror.
    #[command(visible_aliases = ["rke2-registries", "k3s-registries"])]
    RegistriesYaml {
        /// Merge into this registries.yaml (e.g. /etc/rancher/k3s/registries.yaml) instead of printing.
        #[arg(long)]
        merge: Option<PathBuf>,
        /// Mirror URL [default: http://<listen address from the configuration>]
        #[arg(long)]
        mirror: Option<String>,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Cluster mode: make the cluster's certificates; show the members.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Check this node end to end, one line per check with its fix; exit 1 when anything is wrong.
    ///
    /// The daemon answers; containerd's config_path and hosts.toml files (read as the containerd
    /// here reads them) send pulls to the daemon first; the CRI-O/podman drop-in; rke2/k3s
    /// registries.yaml; and a manifest HEAD through the daemon exactly as containerd sends it.
    Doctor {
        /// The daemon [default: http://<listen address from the configuration>]
        #[arg(long)]
        server: Option<String>,
        /// containerd's config.toml.
        #[arg(
            long = "containerd-config",
            default_value = "/etc/containerd/config.toml"
        )]
        containerd_config: PathBuf,
        /// The containerd program, asked for its version and `config dump`.
        #[arg(long, default_value = "containerd")]
        containerd: PathBuf,
        /// The containerd version, e.g. 1.7 [default: asked of the program]
        #[arg(long, value_parser = parse_containerd_version)]
        containerd_version: Option<nodemirror::node::containerd::Version>,
        /// containerd's hosts folder [default: its config_path]
        #[arg(long)]
        certs_dir: Option<PathBuf>,
        /// containers/image's drop-in folder (CRI-O, podman).
        #[arg(long, default_value = nodemirror::node::crio::DEFAULT_DIR)]
        crio_dir: PathBuf,
        /// rke2/k3s registries.yaml, checked where its folder exists (repeatable) [default: /etc/rancher/k3s/registries.yaml and /etc/rancher/rke2/registries.yaml]
        #[arg(long = "registries-yaml")]
        registries_yaml: Vec<PathBuf>,
        /// Image whose manifest to ask for [default: containerd's sandbox image, else registry.k8s.io/pause:3.10]
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Keep images in the cache: pinned manifests, blobs and tags are never evicted.
    Pin {
        #[command(subcommand)]
        action: PinAction,
    },
    /// Pull images through the running daemon so they are cached (on this node, or with --cluster by each blob's owner).
    Prefetch {
        /// Image references, e.g. `busybox`, `quay.io/org/app:v1`, `reg/x@sha256:...`
        #[arg(required = true)]
        images: Vec<String>,
        /// Cluster mode: each blob's owner fetches it once (or has it already), so a rollout's pulls are served from the cluster; this node keeps the manifests only.
        #[arg(long)]
        cluster: bool,
        /// Daemon to pull through [default: http://<listen address from the configuration>]
        #[arg(long)]
        server: Option<String>,
        /// Platform of a multi-platform image to fetch [default: this machine's, e.g. linux/amd64]
        #[arg(long, conflicts_with = "all_platforms")]
        platform: Option<String>,
        /// Fetch every platform of a multi-platform image.
        #[arg(long)]
        all_platforms: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
}

// Parsed once per run: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum ContainerdAction {
    /// Write <certs-dir>/_default/hosts.toml (or per registry) with the mirror first, and set config_path.
    Install {
        /// containerd's hosts folder [default: config_path from --config, else /etc/containerd/certs.d]
        #[arg(long)]
        certs_dir: Option<PathBuf>,
        /// containerd's config.toml
        #[arg(long = "config", default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// Only these registries (repeatable), instead of _default (all of them).
        #[arg(long = "registry")]
        registries: Vec<String>,
        /// Mirror URL [default: http://<listen address from nodemirror's config ($NODEMIRROR_CONFIG or /etc/nodemirror/config.toml)>]
        #[arg(long)]
        mirror: Option<String>,
        /// Where the originals are kept for uninstall.
        #[arg(long, default_value = "/var/lib/nodemirror")]
        state_dir: PathBuf,
        /// The containerd that reads the files, e.g. 1.7 or 2.1 [default: asked of `containerd --version`]
        #[arg(long, value_parser = parse_containerd_version)]
        containerd_version: Option<nodemirror::node::containerd::Version>,
    },
    /// Restore what install changed.
    Uninstall {
        #[arg(long, default_value = "/var/lib/nodemirror")]
        state_dir: PathBuf,
    },
}

fn parse_containerd_version(s: &str) -> Result<nodemirror::node::containerd::Version, String> {
    nodemirror::node::containerd::Version::parse(s)
        .ok_or_else(|| format!("{s:?} is not a containerd version such as 1.7 or 2.1"))
}

#[derive(Subcommand)]
enum CrioAction {
    /// Write <dir>/50-nodemirror.conf: a path-prefixed mirror for docker.io and each registry in hosts.d.
    Install {
        /// containers/image's drop-in folder.
        #[arg(long, default_value = nodemirror::node::crio::DEFAULT_DIR)]
        dir: PathBuf,
        /// Mirror URL [default: http://<listen address from the configuration>]
        #[arg(long)]
        mirror: Option<String>,
        /// Where the original is kept for uninstall.
        #[arg(long, default_value = "/var/lib/nodemirror")]
        state_dir: PathBuf,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Restore what install changed.
    Uninstall {
        #[arg(long, default_value = "/var/lib/nodemirror")]
        state_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Write a new cluster CA: DIR/ca.pem and DIR/ca-key.pem (keep the key off the nodes).
    Ca {
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a node's certificate, signed by the CA in --ca: DIR/NAME.pem and DIR/NAME-key.pem.
    Cert {
        /// The folder with ca.pem and ca-key.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The node's name (file names, and the certificate's common name).
        #[arg(long)]
        name: String,
        /// An address peers reach the node at (repeatable); peers check it against the members.
        #[arg(long, required = true)]
        ip: Vec<std::net::IpAddr>,
        /// A DNS name for the node (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Show the members as the running daemon sees them, their health, and its share of the digests.
    Status {
        /// Daemon to ask [default: http://<listen address from the configuration>]
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        args: ServeArgs,
    },
}

#[derive(Subcommand)]
enum PinAction {
    /// Pull every platform of IMAGE through the daemon, then pin it (by tag: whatever the tag points to).
    Add {
        /// Image reference, e.g. `quay.io/org/app:v1` or `reg/x@sha256:...`
        image: String,
        /// Daemon to pull through [default: http://<listen address from the configuration>]
        #[arg(long)]
        server: Option<String>,
        /// Pin what the cache holds now, without pulling.
        #[arg(long)]
        no_fetch: bool,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Unpin IMAGE (its content is then evicted like any other).
    Rm {
        image: String,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// List the pins, what each resolves to, and how much of it is cached.
    Ls(ServeArgs),
}

#[derive(Subcommand)]
enum CacheAction {
    /// Count blobs, manifests, tags and bytes; show free disk space.
    Stats(ServeArgs),
    /// Evict least-recently-used blobs down to the configured limits.
    Gc {
        /// Override `[cache] max_size`, e.g. 20GiB.
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
        /// Override `[cache] min_free` with a size, e.g. 10GiB.
        #[arg(long, value_parser = parse_size)]
        min_free: Option<u64>,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Re-hash every cached file; move corrupt ones to quarantine/ (exit 1 if any).
    Verify(ServeArgs),
    /// Load images from an OCI layout (folder or tar, as `skopeo copy ... oci-archive:` writes) or a `docker save` archive; every file verified, tags recorded. Through the daemon when one runs.
    Import {
        /// The archive (uncompressed tar) or OCI layout folder.
        input: PathBuf,
        /// The name each image of the archive gets, in the archive's order: REGISTRY/REPOSITORY[:TAG] (repeatable).
        #[arg(long = "as", value_name = "IMAGE", required = true)]
        as_: Vec<nodemirror::reference::ImageRef>,
        #[command(flatten)]
        args: ServeArgs,
    },
    /// Write cached images as an OCI layout tar (all platforms, or those chosen), which `nodemirror cache import`, skopeo and `ctr import` read.
    Export {
        /// Images, e.g. `quay.io/org/app:v1`, `reg/x@sha256:...`
        #[arg(required = true)]
        images: Vec<nodemirror::reference::ImageRef>,
        /// The tar to write (`-`: standard output).
        #[arg(short = 'o', long)]
        output: PathBuf,
        /// Only this platform's manifests and blobs, e.g. linux/amd64 (repeatable; the index is kept as it is).
        #[arg(long)]
        platform: Vec<nodemirror::cache::export::PlatformChoice>,
        #[command(flatten)]
        args: ServeArgs,
    },
}

impl CacheAction {
    fn args(&self) -> &ServeArgs {
        match self {
            CacheAction::Stats(a)
            | CacheAction::Verify(a)
            | CacheAction::Gc { args: a, .. }
            | CacheAction::Import { args: a, .. }
            | CacheAction::Export { args: a, .. } => a,
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    nodemirror::config::parse_size(s).ok_or_else(|| format!("invalid size {s:?}"))
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// Daemon configuration file [default: /etc/nodemirror/config.toml if present]
    #[arg(long, env = "NODEMIRROR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5780]
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Cache directory [default: $CACHE_DIRECTORY, /var/cache/nodemirror as root, else ~/.cache/nodemirror]
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Folder of <namespace>/hosts.toml files [default: /etc/nodemirror/hosts.d]
    #[arg(long)]
    hosts_dir: Option<PathBuf>,
    /// Namespace for requests without ?ns= [default: docker.io]
    #[arg(long)]
    default_namespace: Option<Namespace>,
    /// Upstream credentials, docker config.json format [default: /etc/nodemirror/auth.json if present]
    #[arg(long)]
    auth_file: Option<PathBuf>,
}

impl ServeArgs {
    fn settings(&self) -> Result<Settings, ConfigErrors> {
        Settings::load(
            self.config.as_deref(),
            Overrides {
                listen: self.listen,
                cache_dir: self.cache_dir.clone(),
                hosts_dir: self.hosts_dir.clone(),
                default_namespace: self.default_namespace.clone(),
                auth_file: self.auth_file.clone(),
            },
        )
    }
}

/// Why a command failed; each kind has its exit code (sysexits.h where
/// one fits), decided in [`CliError::exit_code`] alone.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cache {dir}: {source}")]
    CacheOpen {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cache {dir}: {source}")]
    Cache {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} corrupt cache files quarantined")]
    Corrupt(usize),
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Usage(_) => 64, // EX_USAGE
            CliError::Start(e) => e.exit_code() as u8,
            CliError::Listen { .. } | CliError::Runtime(_) => 71, // EX_OSERR
            CliError::CacheOpen { .. } => 73,                     // EX_CANTCREAT
            CliError::Cache { .. } => 74,                         // EX_IOERR
            CliError::Corrupt(_) | CliError::Failed(_) => 1,
        }
    }
}

fn main() -> ExitCode {
    nodemirror::tune_for_streaming();
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodemirror: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(a)) => serve(&a),
        Some(Command::CheckConfig(a)) => check_config(&a),
        Some(Command::Cache { action }) => cache_command(action),
        Some(Command::Containerd { action }) => containerd_command(action),
        Some(Command::Crio { action }) => crio_command(action),
        Some(Command::RegistriesYaml {
            merge,
            mirror,
            args,
        }) => registries_command(merge, mirror, &args),
        Some(Command::Cluster { action }) => cluster_command(action),
        Some(Command::Prefetch {
            images,
            cluster,
            server,
            platform,
            all_platforms,
            args,
        }) => prefetch_command(&images, cluster, server, platform, all_platforms, &args),
        Some(Command::Pin { action }) => pin_command(action),
        Some(Command::Doctor {
            server,
            containerd_config,
            containerd,
            containerd_version,
            certs_dir,
            crio_dir,
            registries_yaml,
            image,
            args,
        }) => {
            let opts = nodemirror::node::doctor::Options {
                server: mirror_url(server, &args)?,
                containerd_config,
                containerd,
                containerd_version,
                certs_dir,
                crio_dir,
                registries_yaml: if registries_yaml.is_empty() {
                    vec![
                        "/etc/rancher/k3s/registries.yaml".into(),
                        "/etc/rancher/rke2/registries.yaml".into(),
                    ]
                } else {
                    registries_yaml
                },
                image,
            };
            let checks = runtime()?.block_on(nodemirror::node::doctor::run(&opts));
            for c in &checks {
                println!("{c}");
            }
            let failed = checks
                .iter()
                .filter(|c| c.outcome == nodemirror::node::doctor::Outcome::Fail)
                .count();
            if failed > 0 {
                return Err(CliError::Failed(format!(
                    "doctor: {failed} of {} checks failed",
                    checks.len()
                )));
            }
            Ok(())
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("NODEMIRROR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("NODEMIRROR_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Colour only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Runtime::new().map_err(CliError::Runtime)
}

fn serve(args: &ServeArgs) -> Result<(), CliError> {
    let settings = args.settings()?;
    raise_open_files_limit();
    runtime()?.block_on(async move {
        let listener = listen(&settings).await.map_err(|source| CliError::Listen {
            addr: settings.listen,
            source,
        })?;
        Ok(nodemirror::run(settings, listener, shutdown_signal()).await?)
    })
}

/// Lets the daemon open as many files as its hard limit allows (the soft
/// limit is often 1024): connections are capped by `max_connections`,
/// well before descriptors run out.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, "could not raise the open files limit");
            }
        }
    }
}

fn check_config(args: &ServeArgs) -> Result<(), CliError> {
    let settings = args.settings()?;
    runtime()?.block_on(async { nodemirror::check(&settings) })?;
    println!("configuration OK: {settings:#?}");
    Ok(())
}

/// The socket systemd passed (socket activation), else a new one. A
/// socket beyond loopback needs `[server] listen_beyond_loopback`, as a
/// configured address does.
async fn listen(settings: &Settings) -> std::io::Result<tokio::net::TcpListener> {
    match nodemirror::activated_listener()? {
        Some(l) => {
            let at = l.local_addr()?;
            if !at.ip().is_loopback() && !settings.server.listen_beyond_loopback {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "the socket systemd passed is at {at}, beyond loopback; \
                         set [server] listen_beyond_loopback = true if that is meant"
                    ),
                ));
            }
            tracing::info!("using the socket passed by systemd");
            tokio::net::TcpListener::from_std(l)
        }
        None => tokio::net::TcpListener::bind(settings.listen).await,
    }
}

/// The configured cache, opened beside a daemon that may be running (its
/// downloads in tmp/ are never touched; collection goes through it):
/// the store, whether a daemon holds it, and its folder.
fn open_cache(
    settings: &Settings,
) -> Result<(std::sync::Arc<nodemirror::cache::Store>, bool, PathBuf), CliError> {
    let dir = settings.cache_dir.clone();
    let (store, daemon) =
        nodemirror::cache::Store::open_beside(&dir).map_err(|source| CliError::CacheOpen {
            dir: dir.clone(),
            source,
        })?;
    Ok((store, daemon, dir))
}

fn cache_command(action: CacheAction) -> Result<(), CliError> {
    use nodemirror::cache::Limits;
    let settings = action.args().settings()?;
    let (store, daemon, dir) = open_cache(&settings)?;
    let failed = |source| CliError::Cache {
        dir: dir.clone(),
        source,
    };
    match action {
        CacheAction::Stats(_) => {
            let s = store.stats().map_err(failed)?;
            println!("cache directory: {}", dir.display());
            println!("blobs:           {} ({} bytes)", s.blobs, s.blob_bytes);
            println!(
                "manifests:       {} ({} bytes)",
                s.manifests, s.manifest_bytes
            );
            println!("tags:            {} ({} bytes)", s.tags, s.tag_bytes);
            println!("temp files:      {}", s.temp_files);
            println!("free disk:       {} bytes", s.free_bytes);
            let running = if daemon {
                "running (holds the cache)"
            } else {
                "not running"
            };
            println!("daemon:          {running}");
        }
        CacheAction::Gc {
            max_size, min_free, ..
        } => {
            let r = if daemon {
                let base = format!("http://{}", settings.listen);
                runtime()?
                    .block_on(nodemirror::admin::request_gc(&base, max_size, min_free))
                    .map_err(|e| {
                        CliError::Failed(format!("the daemon using this cache collects it: {e}"))
                    })?
            } else {
                let mut limits =
                    Limits::from_settings(&settings.cache, store.root()).map_err(failed)?;
                limits.max_size = max_size.or(limits.max_size);
                limits.min_free = min_free.unwrap_or(limits.min_free);
                store.collect(limits).map_err(failed)?
            };
            if !r.walked {
                println!(
                    "{} bytes stored, within every limit: nothing to evict",
                    r.bytes_after
                );
                return Ok(());
            }
            println!(
                "evicted {} of {} files ({} of {} blobs; {} bytes); {} bytes remain; {} in use kept; {} pinned kept ({} bytes)",
                r.evicted,
                r.files_before,
                r.evicted_blobs,
                r.blobs_before,
                r.evicted_bytes,
                r.bytes_after,
                r.skipped_in_use,
                r.pinned,
                r.pinned_bytes
            );
        }
        CacheAction::Import { input, as_, .. } => {
            let base = daemon.then(|| format!("http://{}", settings.listen));
            if base.is_none() {
                let limits =
                    Limits::from_settings(&settings.cache, store.root()).map_err(failed)?;
                store.set_budget(limits.budget(settings.cache.max_blob_size));
            }
            let r = nodemirror::archive::import_command(store, base, &input, as_)
                .map_err(CliError::Failed)?;
            for image in &r.images {
                println!("imported {image}");
            }
            println!(
                "{} manifests; {} blobs added ({} bytes), {} already cached",
                r.manifests, r.blobs_added, r.bytes_added, r.blobs_present
            );
            for m in &r.missing {
                println!("not in the archive (kept out of the index's platforms here): {m}");
            }
        }
        CacheAction::Export {
            images,
            output,
            platform,
            ..
        } => {
            let r = nodemirror::archive::export_command(&store, &images, &platform, &output)
                .map_err(CliError::Failed)?;
            for image in &r.images {
                eprintln!("exported {image}");
            }
            eprintln!(
                "{} manifests, {} blobs ({} bytes) to {}",
                r.manifests,
                r.blobs,
                r.bytes,
                output.display()
            );
        }
        CacheAction::Verify(_) => {
            let (checked, bad) = store.verify().map_err(failed)?;
            println!("checked {checked} files, {} corrupt", bad.len());
            for b in &bad {
                println!("quarantined {}", b.display());
            }
            if !bad.is_empty() {
                return Err(CliError::Corrupt(bad.len()));
            }
        }
    }
    Ok(())
}

/// The mirror's URL (or a daemon's, for prefetch): given, or from the
/// configured listen address.
fn mirror_url(mirror: Option<String>, args: &ServeArgs) -> Result<String, CliError> {
    match mirror {
        Some(m) => Ok(m),
        None => Ok(format!("http://{}", args.settings()?.listen)),
    }
}

fn cluster_command(action: ClusterAction) -> Result<(), CliError> {
    use nodemirror::cluster::certs;
    match action {
        ClusterAction::Ca { out } => {
            certs::write_ca(&out).map_err(CliError::Failed)?;
            println!(
                "wrote {0}/ca.pem and {0}/ca-key.pem; copy ca.pem to every node, keep ca-key.pem off them",
                out.display()
            );
            Ok(())
        }
        ClusterAction::Cert {
            ca,
            name,
            ip,
            dns,
            out,
        } => {
            certs::write_cert(&ca, &name, &ip, &dns, &out).map_err(CliError::Failed)?;
            println!("wrote {0}/{name}.pem and {0}/{name}-key.pem", out.display());
            Ok(())
        }
        ClusterAction::Status { server, args } => {
            let server = mirror_url(server, &args)?;
            let url = format!("{}/cluster/status", server.trim_end_matches('/'));
            let (status, body) = runtime()?
                .block_on(nodemirror::cluster::fetch_status(&url))
                .map_err(|e| CliError::Failed(format!("{url}: {e}")))?;
            if status == 404 {
                return Err(CliError::Failed(format!(
                    "{server} is not in cluster mode (no [cluster] in its configuration)"
                )));
            }
            print!("{}", nodemirror::cluster::render_status(&body));
            Ok(())
        }
    }
}

fn containerd_command(action: ContainerdAction) -> Result<(), CliError> {
    use nodemirror::node::containerd::{install, uninstall, Install};
    match action {
        ContainerdAction::Install {
            certs_dir,
            containerd_config,
            registries,
            mirror,
            state_dir,
            containerd_version,
        } => {
            let own = ServeArgs {
                config: std::env::var_os("NODEMIRROR_CONFIG").map(PathBuf::from),
                ..ServeArgs::default()
            };
            let opts = Install {
                certs_dir_explicit: certs_dir.is_some(),
                // containerd resolves config_path from its own working directory.
                certs_dir: certs_dir
                    .map(|d| std::path::absolute(&d).unwrap_or(d))
                    .unwrap_or_else(|| PathBuf::from("/etc/containerd/certs.d")),
                config: containerd_config,
                mirror: mirror_url(mirror, &own)?,
                registries,
                state_dir,
                version: containerd_version,
                detected: nodemirror::node::containerd::Version::detect(std::path::Path::new(
                    "containerd",
                ))
                .ok(),
            };
            let r =
                install(&opts).map_err(|e| CliError::Failed(format!("containerd install: {e}")))?;
            for note in &r.notes {
                println!("note      {note}");
            }
            for p in &r.changed {
                println!("updated   {}", p.display());
            }
            for p in &r.unchanged {
                println!("unchanged {}", p.display());
            }
            if r.restart_containerd {
                println!("restart containerd to apply config_path: systemctl restart containerd");
            }
        }
        ContainerdAction::Uninstall { state_dir } => {
            let (exact, surgical) = uninstall(&state_dir)
                .map_err(|e| CliError::Failed(format!("containerd uninstall: {e}")))?;
            for p in &exact {
                println!("restored  {}", p.display());
            }
            for p in &surgical {
                println!(
                    "edited since install; removed only the mirror from {}",
                    p.display()
                );
            }
            if exact.is_empty() && surgical.is_empty() {
                println!("nothing to undo");
            }
        }
    }
    Ok(())
}

fn crio_command(action: CrioAction) -> Result<(), CliError> {
    use nodemirror::node::crio::{install, uninstall, Install, Undone};
    match action {
        CrioAction::Install {
            dir,
            mirror,
            state_dir,
            args,
        } => {
            let settings = args.settings()?;
            let opts = Install {
                dir,
                mirror: mirror_url(mirror, &args)?,
                namespaces: nodemirror::config::configured_namespaces(&settings.hosts_dir)?,
                state_dir,
            };
            let r = install(&opts).map_err(|e| CliError::Failed(format!("crio install: {e}")))?;
            let verb = if r.changed { "updated  " } else { "unchanged" };
            println!("{verb} {}", r.path.display());
            for (ns, why) in &r.skipped {
                println!("skipped   {ns}: {why}");
            }
            if r.changed {
                println!("podman, skopeo and buildah read it at their next pull; CRI-O: systemctl reload crio");
            }
        }
        CrioAction::Uninstall { state_dir } => {
            match uninstall(&state_dir)
                .map_err(|e| CliError::Failed(format!("crio uninstall: {e}")))?
            {
                Undone::NothingInstalled => println!("nothing to undo"),
                Undone::Restored(p) => println!("restored  {}", p.display()),
                Undone::LeftEdited(p) => {
                    println!("edited since install; left in place: {}", p.display())
                }
            }
        }
    }
    Ok(())
}

fn registries_command(
    merge: Option<PathBuf>,
    mirror: Option<String>,
    args: &ServeArgs,
) -> Result<(), CliError> {
    use nodemirror::node::registries::{self, Merged};
    let mirror = mirror_url(mirror, args)?;
    let Some(path) = merge else {
        print!("{}", registries::render(&mirror));
        return Ok(());
    };
    match registries::merge_file(&path, &mirror) {
        Ok(Merged::Unchanged) => println!("unchanged {}", path.display()),
        Ok(Merged::Updated { .. }) => println!(
            "updated   {} (restart rke2-server/rke2-agent or k3s to apply)",
            path.display()
        ),
        Err(e) => return Err(CliError::Failed(e.to_string())),
    }
    Ok(())
}

fn prefetch_command(
    images: &[String],
    cluster: bool,
    server: Option<String>,
    platform: Option<String>,
    all_platforms: bool,
    args: &ServeArgs,
) -> Result<(), CliError> {
    use nodemirror::prefetch::{prefetch, preheat, Platforms, Preheated};
    let images: Vec<nodemirror::reference::ImageRef> = images
        .iter()
        .map(|i| i.parse())
        .collect::<Result<_, _>>()
        .map_err(|e: nodemirror::reference::ParseError| CliError::Usage(e.to_string()))?;
    let server = mirror_url(server, args)?;
    let platforms = match (all_platforms, platform) {
        (true, _) => Platforms::All,
        (false, Some(p)) => Platforms::One(p),
        (false, None) => Platforms::host(),
    };
    let rt = runtime()?;
    let mut failures = Vec::new();
    for image in &images {
        if !cluster {
            match rt.block_on(prefetch(&server, image, &platforms)) {
                Ok(s) => println!(
                    "prefetched {image}: {} manifests, {} blobs, {} bytes",
                    s.manifests, s.blobs, s.bytes
                ),
                Err(e) => failures.push(format!("{image}: {e}")),
            }
            continue;
        }
        let mut progress = |p: Preheated<'_>| match p.result {
            Ok((owner, bytes)) => {
                println!(
                    "[{}/{}] {} {bytes} bytes at {owner}",
                    p.index, p.of, p.digest
                )
            }
            Err(e) => eprintln!("[{}/{}] {} failed: {e}", p.index, p.of, p.digest),
        };
        match rt.block_on(preheat(&server, image, &platforms, &mut progress)) {
            Ok(s) => {
                println!(
                    "preheated {image}: {} manifests, {} of {} blobs at their owners, {} bytes",
                    s.manifests,
                    s.blobs,
                    s.blobs + s.failed.len(),
                    s.bytes
                );
                for (d, e) in s.failed {
                    failures.push(format!("{image}: {d}: {e}"));
                }
            }
            Err(e) => failures.push(format!("{image}: {e}")),
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    Err(CliError::Failed(format!(
        "prefetch failed for {} of what was asked:\n  {}",
        failures.len(),
        failures.join("\n  ")
    )))
}

fn pin_command(action: PinAction) -> Result<(), CliError> {
    use nodemirror::reference::ImageRef;
    let parse = |image: &str| -> Result<ImageRef, CliError> {
        image
            .parse()
            .map_err(|e: nodemirror::reference::ParseError| CliError::Usage(e.to_string()))
    };
    let args = match &action {
        PinAction::Add { args, .. } | PinAction::Rm { args, .. } | PinAction::Ls(args) => args,
    };
    let (store, _, dir) = open_cache(&args.settings()?)?;
    let failed = |source| CliError::Cache {
        dir: dir.clone(),
        source,
    };
    match action {
        PinAction::Add {
            image,
            server,
            no_fetch,
            args,
        } => {
            let image = parse(&image)?;
            if !no_fetch {
                use nodemirror::prefetch::{prefetch, Platforms};
                let server = mirror_url(server, &args)?;
                let s = runtime()?
                    .block_on(prefetch(&server, &image, &Platforms::All))
                    .map_err(|e| {
                        CliError::Failed(format!(
                            "pulling {image} through {server} failed, nothing pinned: {e} \
                             (--no-fetch pins what the cache holds)"
                        ))
                    })?;
                println!(
                    "pulled {image}: {} manifests, {} blobs, {} bytes",
                    s.manifests, s.blobs, s.bytes
                );
            }
            if store.add_pin(&image).map_err(failed)? {
                println!("pinned {image}");
            } else {
                println!("{image} was pinned already");
            }
        }
        PinAction::Rm { image, .. } => {
            let image = parse(&image)?;
            if !store.remove_pin(&image).map_err(failed)? {
                return Err(CliError::Failed(format!("{image} is not pinned")));
            }
            println!("unpinned {image}");
        }
        PinAction::Ls(_) => {
            for p in store.pin_status().map_err(failed)? {
                let roots: Vec<String> = p.roots.iter().map(|d| d.to_string()).collect();
                let roots = if roots.is_empty() {
                    "(no tag record)".to_string()
                } else {
                    roots.join(",")
                };
                println!(
                    "{}\t{roots}\t{} cached ({} bytes), {} missing",
                    p.image, p.cached, p.cached_bytes, p.missing
                );
            }
        }
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
