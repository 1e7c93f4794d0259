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
    let cli = Cli::parse();
    init_logging();
    let (check_only, args) = match cli.command {
        Some(Command::Serve(a)) => (false, a),
        Some(Command::CheckConfig(a)) => (true, a),
        None => (false, cli.serve),
    };
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nodemirror: invalid configuration:\n{e}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nodemirror: cannot start the async runtime: {e}");
            return ExitCode::from(71);
        }
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
        let listener = match tokio::net::TcpListener::bind(settings.listen).await {
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
