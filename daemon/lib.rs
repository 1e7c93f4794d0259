//! nodemirror: a node-local pull-through mirror for every container
//! registry, behind one namespace-aware endpoint.
//!
//! A request flows through these components:
//! - [`server`] accepts HTTP, parses the path and `?ns=` into the domain
//!   types of [`reference`], and maps every error to OCI error JSON;
//! - [`mirror`] serves manifests (read whole, verified, then sent) and
//!   blobs (streamed with their digest checked);
//! - [`upstream`] holds each namespace's endpoint chain from hosts.d
//!   ([`config::hosts`]), tries endpoints in order with timeouts, auth and
//!   redirects, and falls back before a byte reaches the client.
//!
//! [`run`] wires them together; `main` only parses the command line.

#![forbid(unsafe_code)]

pub mod config;
pub mod mirror;
pub mod reference;
pub mod server;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use config::{ConfigErrors, Settings};
use mirror::Mirror;
use server::App;
use upstream::Upstream;

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error("cache directory {path}: {source}")]
    CacheDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl StartError {
    /// The process exit code: 64 (EX_USAGE) for bad configuration.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => 64,
            StartError::CacheDir { .. } => 73,
        }
    }
}

/// Builds everything `settings` describes, ready to serve.
pub fn build(settings: &Settings) -> Result<Arc<App>, StartError> {
    std::fs::create_dir_all(&settings.cache_dir).map_err(|source| StartError::CacheDir {
        path: settings.cache_dir.clone(),
        source,
    })?;
    let upstream = Upstream::new(
        &settings.hosts_dir,
        settings.auth_file.as_deref(),
        settings.upstream.clone(),
    )
    .map_err(ConfigErrors)?;
    Ok(Arc::new(App {
        mirror: Mirror {
            upstream: Arc::new(upstream),
        },
        default_namespace: settings.default_namespace.clone(),
    }))
}

/// Serves on `listener` until `shutdown` resolves; re-reads hosts.d on
/// SIGHUP, keeping the routes in force when the new files are broken.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let app = build(&settings)?;
    let reload_app = app.clone();
    let hosts_dir = settings.hosts_dir.clone();
    let reloader = tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match reload_app.mirror.upstream.reload(&hosts_dir) {
                Ok(()) => tracing::info!(dir = %hosts_dir.display(), "reloaded hosts.d"),
                Err(errors) => {
                    for e in errors {
                        tracing::error!(error = %e, "hosts.d reload failed; keeping the last good configuration");
                    }
                }
            }
        }
    });
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        cache_dir = %settings.cache_dir.display(),
        hosts_dir = %settings.hosts_dir.display(),
        default_namespace = %settings.default_namespace,
        "nodemirror serving"
    );
    server::serve(listener, app, shutdown).await;
    reloader.abort();
    Ok(())
}
