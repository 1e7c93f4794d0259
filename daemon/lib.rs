//! nodemirror: a node-local pull-through mirror for every container
//! registry, behind one namespace-aware endpoint.
//!
//! Layers, each importing only those below it:
//! - `server` accepts HTTP and parses each request once (`server::route`)
//!   into the domain types of [`reference`];
//! - `mirror` serves manifests (read whole, verified, stored, then sent;
//!   tags revalidated after a TTL) and blobs (`mirror::blob`), with the
//!   single-flight fetch that feeds the cache (`mirror::flight`);
//! - [`cache`] is the content-addressed store shared by every upstream:
//!   ingest of verified blobs, readers of growing files, eviction; it
//!   knows nothing of upstreams;
//! - `upstream` holds each namespace's endpoint chain from hosts.d, tries
//!   endpoints in order with timeouts, auth and redirects, and falls back
//!   before a byte reaches the client;
//! - `oci`, at the bottom, is the shared vocabulary: body type, headers,
//!   media types, and the one mapping of errors to status and OCI JSON.
//!
//! What a reload may change is one immutable `snapshot::Snapshot`, swapped
//! whole; a request loads it once. [`run`] wires everything together;
//! `main` only parses the command line.

// Three audited exceptions: adopting a socket passed by systemd (systemd.rs),
// mapping a cache file (complete, or the written start of one being fetched)
// to send it with sendfile (sendfile.rs), and
// setting glibc's allocator parameters (memory.rs).
#![deny(unsafe_code)]

pub mod admin;
pub mod archive;
mod atomic;
pub mod cache;
pub mod cluster;
pub mod config;
mod memory;
mod metrics;
mod mirror;
pub mod node;
mod oci;
pub mod prefetch;
pub mod reference;
mod reload;
mod sendfile;
mod server;
mod snapshot;
mod systemd;
mod upstream;

pub use memory::tune_for_streaming;
pub use systemd::activated_listener;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use cache::gc::Limits;
use cache::Store;
use config::{ConfigErrors, Settings};
use mirror::flight::Flights;
use mirror::Mirror;
use server::App;
use snapshot::{Live, Snapshot};
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
    #[error("cluster: {0}")]
    Cluster(String),
}

impl StartError {
    /// The process exit code: 64 (EX_USAGE) for bad configuration.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) | StartError::Cluster(_) => 64,
            StartError::CacheDir { .. } => 73,
        }
    }
}

/// Checks everything `settings` describes (configuration, hosts.d,
/// credentials, the cluster's certificates, a cache it can write to)
/// without taking the cache from a daemon that may be running.
pub fn check(settings: &Settings) -> Result<(), StartError> {
    let upstream = Arc::new(Upstream::new());
    Snapshot::build(&upstream, settings.clone(), 0)?;
    Store::open_beside(&settings.cache_dir)
        .and_then(|(store, _)| store.check_writable())
        .map_err(|source| StartError::CacheDir {
            path: settings.cache_dir.clone(),
            source,
        })?;
    if let Some(c) = &settings.cluster {
        cluster::Cluster::start(c, upstream, settings.upstream.clone())
            .map_err(StartError::Cluster)?;
    }
    Ok(())
}

/// Builds everything `settings` describes, ready to serve: the cache is
/// this daemon's from now on (its lock).
pub fn build(settings: &Settings) -> Result<Arc<App>, StartError> {
    let upstream = Arc::new(Upstream::new());
    let snapshot = Snapshot::build(&upstream, settings.clone(), 0)?;
    let store = Store::open(&settings.cache_dir).map_err(|source| StartError::CacheDir {
        path: settings.cache_dir.clone(),
        source,
    })?;
    let limits = Arc::new(mirror::Limits::default());
    let cluster = match &settings.cluster {
        Some(c) => Some(
            cluster::Cluster::start(c, upstream.clone(), settings.upstream.clone())
                .map_err(StartError::Cluster)?,
        ),
        None => None,
    };
    Ok(Arc::new(App {
        mirror: Mirror {
            flights: Flights::new(
                store.clone(),
                upstream.clone(),
                limits.clone(),
                cluster.clone(),
            ),
            upstream,
            store,
            limits,
            cluster,
        },
        live: Live::new(snapshot),
        draining: std::sync::atomic::AtomicBool::new(false),
        connections: server::Connections::new(settings.server.max_connections),
        peer_connections: server::Connections::new(settings.server.max_connections),
    }))
}

/// Serves on `listener` until `shutdown` resolves; reloads configuration
/// on SIGHUP and file changes ([`reload`]).
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let app = build(&settings)?;
    // The limits downloads are held to, now (a statvfs); the count of what
    // the cache holds runs beside serving: no request waits for it.
    let cache_settings = settings.cache.clone();
    let store = app.mirror.store.clone();
    let budget = tokio::task::spawn_blocking(move || {
        Limits::from_settings(&cache_settings, store.root())
            .map(|l| store.set_budget(l.budget(cache_settings.max_blob_size)))
    })
    .await;
    if let Ok(Err(e)) | Err(e) = budget.map_err(|e| std::io::Error::other(e.to_string())) {
        tracing::warn!(error = %e, "cannot read the cache filesystem's size");
    }
    let summary = "counting the cache beside serving";
    let peers = match &app.mirror.cluster {
        Some(c) => {
            let listener = TcpListener::bind(c.listen)
                .await
                .map_err(|e| StartError::Cluster(format!("listening on {}: {e}", c.listen)))?;
            tracing::info!(listen = %c.listen, advertise = %c.me(), "cluster peer listener");
            Some(tokio::spawn(server::serve_peers(
                listener,
                app.clone(),
                c.clone(),
            )))
        }
        None => None,
    };
    let reloader = reload::spawn(app.clone());
    let gc = tokio::spawn(collect_periodically(app.clone()));
    let verifier = {
        let live = app.clone();
        tokio::spawn(cache::verify::run(app.mirror.store.clone(), move || {
            live.live.load().settings.cache.verify_rate
        }))
    };
    let release = tokio::spawn(release_memory_when_idle(app.clone()));
    let listen = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    if let Some(lowered) = app.connections.lowered_to(settings.server.max_connections) {
        tracing::warn!(
            max_connections = settings.server.max_connections,
            served = lowered,
            "the open files limit allows fewer connections than max_connections; raise LimitNOFILE"
        );
    }
    if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
        tracing::warn!(listen = %listen,
            "listening beyond loopback (listen_beyond_loopback = true): every host that reaches this address can pull through the daemon");
    }
    let watchdog = systemd::spawn_watchdog();
    systemd::ready(&format!("serving on {listen}; {summary}"));
    let count = tokio::spawn(count_cache(app.mirror.store.clone(), listen.clone()));
    tracing::info!(
        listen = %listen,
        cache_dir = %settings.cache_dir.display(),
        hosts_dir = %settings.hosts_dir.display(),
        default_namespace = %settings.default_namespace,
        "nodemirror serving"
    );
    let shutdown = async {
        shutdown.await;
        systemd::stopping();
    };
    server::serve(listener, app.clone(), shutdown).await;
    if let Some(p) = peers {
        p.abort();
    }
    reloader.stop();
    count.abort();
    gc.abort();
    verifier.abort();
    release.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    // Let fetches under way finish storing what they downloaded: work
    // already paid for upstream is not thrown away on a restart.
    let deadline = tokio::time::Instant::now() + server::DRAIN_TIMEOUT;
    while !app.mirror.flights.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if !app.mirror.flights.is_empty() {
        tracing::warn!(
            in_flight = app.mirror.flights.len(),
            "stopping with downloads unfinished"
        );
    }
    app.mirror.store.release();
    Ok(())
}

/// How long no fetch must be under way before freed memory is given back:
/// long enough that a pull's next blob, asked for right after the last one
/// ended, reuses it.
const IDLE_BEFORE_RELEASE: std::time::Duration = std::time::Duration::from_secs(2);

/// Each time the last fetch under way ends and none has started again
/// [`IDLE_BEFORE_RELEASE`] later, gives the allocator's freed memory back
/// to the kernel ([`memory`]), off the async threads.
async fn release_memory_when_idle(app: Arc<App>) {
    let flights = &app.mirror.flights;
    loop {
        flights.idle().await;
        tokio::time::sleep(IDLE_BEFORE_RELEASE).await;
        if !flights.is_empty() {
            continue; // the fetch under way ends with another idle()
        }
        // The figures are read only for a debug log that will be written.
        let logged = tracing::enabled!(tracing::Level::DEBUG);
        let before = logged.then(memory::resident_bytes);
        match tokio::task::spawn_blocking(memory::release_free).await {
            Ok(true) if logged => tracing::debug!(
                resident_before = before,
                resident_after = memory::resident_bytes(),
                "gave freed memory back to the kernel"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "releasing freed memory failed"),
        }
    }
}

/// Evicts least-recently-used blobs now and then, off the async threads,
/// with the limits and interval in force.
/// Counts what the cache holds, off the async workers and beside serving:
/// from then on the running total stands for it (downloads and collection
/// keep it). Files stored while the count runs may be counted twice, a
/// few bytes too many until the next collection's walk.
async fn count_cache(store: Arc<cache::Store>, listen: String) {
    let began = std::time::Instant::now();
    let before = store.stored_bytes();
    let counted = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.stats()).await
    };
    match counted {
        Ok(Ok(s)) => {
            let since = store.stored_bytes().saturating_sub(before);
            store.set_counted(s.stored_bytes().saturating_add(since));
            metrics::METRICS.cache_scanned(s.blobs, s.stored_bytes());
            systemd::status(&format!(
                "serving on {listen}; {} blobs, {} MiB cached",
                s.blobs,
                s.blob_bytes >> 20
            ));
            tracing::info!(
                blobs = s.blobs,
                bytes = s.stored_bytes(),
                seconds = began.elapsed().as_secs_f64(),
                "cache counted"
            );
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot count the cache"),
        Err(e) => tracing::warn!(error = %e, "cannot count the cache"),
    }
}

async fn collect_periodically(app: Arc<App>) {
    loop {
        let cache = app.live.load().settings.cache.clone();
        // Every gc_interval, and at once when a download found no room
        // (so that the next ones fit).
        tokio::select! {
            _ = tokio::time::sleep(cache.gc_interval) => {}
            _ = app.mirror.store.room_wanted() => {}
        }
        let store = app.mirror.store.clone();
        let limits = tokio::task::spawn_blocking(move || {
            let limits = Limits::from_settings(&cache, store.root())?;
            store.set_budget(limits.budget(cache.max_blob_size));
            Ok::<_, std::io::Error>(limits)
        })
        .await;
        let result = match limits {
            Ok(Ok(limits)) => admin::collect(&app, limits).await,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "cache collection failed");
        }
    }
}
