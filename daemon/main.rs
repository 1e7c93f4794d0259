//! The `nodemirror` command: parses the command line, sets up logging,
//! loads configuration and hands over to [`nodemirror::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use nodemirror::config::{Overrides, Settings};
use nodemirror::reference::Namespace;

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
    /// Pull an image through the running daemon so it is cached.
    Prefetch {
        /// Image reference, e.g. `busybox`, `quay.io/org/app:v1`, `reg/x@sha256:...`
        image: String,
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
    },
    /// Restore what install changed.
    Uninstall {
        #[arg(long, default_value = "/var/lib/nodemirror")]
        state_dir: PathBuf,
    },
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
}

impl CacheAction {
    fn args(&self) -> &ServeArgs {
        match self {
            CacheAction::Stats(a) | CacheAction::Verify(a) | CacheAction::Gc { args: a, .. } => a,
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    nodemirror::config::source::parse_size(s).ok_or_else(|| format!("invalid size {s:?}"))
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
    fn settings(&self) -> Result<Settings, nodemirror::config::ConfigErrors> {
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

fn main() -> ExitCode {
    nodemirror::memory::tune_for_streaming();
    let cli = Cli::parse();
    init_logging();
    let (check_only, args) = match cli.command {
        Some(Command::Serve(a)) => (false, a),
        Some(Command::CheckConfig(a)) => (true, a),
        Some(Command::Cache { action }) => return cache_command(action),
        Some(Command::Containerd { action }) => return containerd_command(action),
        Some(Command::RegistriesYaml {
            merge,
            mirror,
            args,
        }) => return registries_command(merge, mirror, &args),
        Some(Command::Prefetch {
            image,
            server,
            platform,
            all_platforms,
            args,
        }) => return prefetch_command(&image, server, platform, all_platforms, &args),
        None => (false, cli.serve),
    };
    let settings = match load_or_exit(&args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        if check_only {
            return match nodemirror::build(&settings) {
                Ok(_) => {
                    println!("configuration OK: {settings:#?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nodemirror: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            };
        }
        let listener = match listen(&settings).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("nodemirror: cannot listen on {}: {e}", settings.listen);
                return ExitCode::from(71);
            }
        };
        match nodemirror::run(settings, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nodemirror: {e}");
                ExitCode::from(e.exit_code() as u8)
            }
        }
    })
}

/// The socket systemd passed (socket activation), else a new one.
async fn listen(settings: &Settings) -> std::io::Result<tokio::net::TcpListener> {
    match nodemirror::systemd::activated_listener()? {
        Some(l) => {
            tracing::info!("using the socket passed by systemd");
            tokio::net::TcpListener::from_std(l)
        }
        None => tokio::net::TcpListener::bind(settings.listen).await,
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("nodemirror: cannot start the async runtime: {e}");
        ExitCode::from(71)
    })
}

fn load_or_exit(args: &ServeArgs) -> Result<Settings, ExitCode> {
    args.settings().map_err(|e| {
        eprintln!("nodemirror: invalid configuration:\n{e}");
        ExitCode::from(64)
    })
}

fn cache_command(action: CacheAction) -> ExitCode {
    use nodemirror::cache::gc::Limits;
    use nodemirror::cache::Store;
    let settings = match load_or_exit(action.args()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let store = match Store::open(&settings.cache_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nodemirror: cache {}: {e}", settings.cache_dir.display());
            return ExitCode::from(73);
        }
    };
    let result = match action {
        CacheAction::Stats(_) => store.stats().map(|s| {
            println!("cache directory: {}", settings.cache_dir.display());
            println!("blobs:           {} ({} bytes)", s.blobs, s.blob_bytes);
            println!("manifests:       {}", s.manifests);
            println!("tags:            {}", s.tags);
            println!("temp files:      {}", s.temp_files);
            println!("free disk:       {} bytes", s.free_bytes);
            ExitCode::SUCCESS
        }),
        CacheAction::Gc {
            max_size, min_free, ..
        } => Limits::from_settings(&settings.cache, store.root())
            .and_then(|mut limits| {
                limits.max_size = max_size.or(limits.max_size);
                limits.min_free = min_free.unwrap_or(limits.min_free);
                store.collect(limits)
            })
            .map(|r| {
                println!(
                    "evicted {} of {} blobs ({} bytes); {} bytes remain; {} in use kept",
                    r.evicted, r.blobs_before, r.evicted_bytes, r.bytes_after, r.skipped_in_use
                );
                ExitCode::SUCCESS
            }),
        CacheAction::Verify(_) => store.verify().map(|(checked, bad)| {
            println!("checked {checked} files, {} corrupt", bad.len());
            for b in &bad {
                println!("quarantined {}", b.display());
            }
            if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("nodemirror: cache {}: {e}", settings.cache_dir.display());
        ExitCode::from(74)
    })
}

/// The mirror's URL (or a daemon's, for prefetch): given, or from the
/// configured listen address.
fn mirror_url(mirror: Option<String>, args: &ServeArgs) -> Result<String, ExitCode> {
    match mirror {
        Some(m) => Ok(m),
        None => load_or_exit(args).map(|s| format!("http://{}", s.listen)),
    }
}

fn containerd_command(action: ContainerdAction) -> ExitCode {
    use nodemirror::node::containerd::{install, uninstall, Install};
    match action {
        ContainerdAction::Install {
            certs_dir,
            containerd_config,
            registries,
            mirror,
            state_dir,
        } => {
            let own = ServeArgs {
                config: std::env::var_os("NODEMIRROR_CONFIG").map(PathBuf::from),
                ..ServeArgs::default()
            };
            let mirror = match mirror_url(mirror, &own) {
                Ok(m) => m,
                Err(code) => return code,
            };
            let opts = Install {
                certs_dir_explicit: certs_dir.is_some(),
                // containerd resolves config_path from its own working directory.
                certs_dir: certs_dir
                    .map(|d| std::path::absolute(&d).unwrap_or(d))
                    .unwrap_or_else(|| PathBuf::from("/etc/containerd/certs.d")),
                config: containerd_config,
                mirror,
                registries,
                state_dir,
            };
            match install(&opts) {
                Ok(r) => {
                    for p in &r.changed {
                        println!("updated   {}", p.display());
                    }
                    for p in &r.unchanged {
                        println!("unchanged {}", p.display());
                    }
                    if r.restart_containerd {
                        println!(
                            "restart containerd to apply config_path: systemctl restart containerd"
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nodemirror: containerd install: {e}");
                    ExitCode::from(1)
                }
            }
        }
        ContainerdAction::Uninstall { state_dir } => match uninstall(&state_dir) {
            Ok((exact, surgical)) => {
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
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nodemirror: containerd uninstall: {e}");
                ExitCode::from(1)
            }
        },
    }
}

fn registries_command(
    merge: Option<PathBuf>,
    mirror: Option<String>,
    args: &ServeArgs,
) -> ExitCode {
    use nodemirror::node::registries;
    let mirror = match mirror_url(mirror, args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let Some(path) = merge else {
        print!("{}", registries::render(&mirror));
        return ExitCode::SUCCESS;
    };
    let existing = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            eprintln!("nodemirror: {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let merged = if existing.is_empty() {
        Ok(Some(registries::render(&mirror)))
    } else {
        registries::merge(&existing, &mirror)
    };
    let text = match merged {
        Ok(Some(t)) => t,
        Ok(None) => {
            println!("unchanged {}", path.display());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nodemirror: {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let backup = path.with_extension("yaml.nodemirror-orig");
    let written = (|| {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if !existing.is_empty() && !backup.exists() {
            std::fs::write(&backup, &existing)?;
        }
        let tmp = path.with_extension("yaml.nodemirror-tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &path)
    })();
    match written {
        Ok(()) => {
            println!(
                "updated   {} (restart rke2-server/rke2-agent or k3s to apply)",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodemirror: {}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

fn prefetch_command(
    image: &str,
    server: Option<String>,
    platform: Option<String>,
    all_platforms: bool,
    args: &ServeArgs,
) -> ExitCode {
    use nodemirror::prefetch::{prefetch, Platforms};
    let image: nodemirror::reference::ImageRef = match image.parse() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("nodemirror: {e}");
            return ExitCode::from(64);
        }
    };
    let server = match mirror_url(server, args) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let platforms = match (all_platforms, platform) {
        (true, _) => Platforms::All,
        (false, Some(p)) => Platforms::One(p),
        (false, None) => Platforms::host(),
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(prefetch(&server, &image, &platforms)) {
        Ok(s) => {
            println!(
                "prefetched {}/{}:{}: {} manifests, {} blobs, {} bytes",
                image.namespace, image.repository, image.reference, s.manifests, s.blobs, s.bytes
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nodemirror: prefetch failed: {e}");
            ExitCode::from(1)
        }
    }
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
