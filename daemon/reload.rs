//! Applying configuration changes without a restart, on SIGHUP and when
//! files change (inotify on hosts.d and on the config file's folder).
//!
//! A reload reads config.toml again (with the same flags on top), hosts.d
//! and the credentials file, off the async threads (regular files of at
//! most 1 MiB each, opened without blocking; at most 30 s in all), so
//! requests are served meanwhile. If anything is broken, each problem is logged
//! with its file and line and nothing changes. Otherwise upstream routes,
//! credentials, timeouts and back-off, tag TTL, cache limits and the
//! default namespace apply at once; `listen` and `cache_dir` need a
//! restart, and the log says so.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::server::App;
use crate::snapshot::Snapshot;
use crate::systemd;

/// Changes settle for this long before a reload, so an editor's write,
/// rename and chmod make one reload.
const SETTLE: Duration = Duration::from_millis(300);

/// The longest a reload may take: past it, the configuration in force
/// stays and the reload's result, should it come, is dropped.
const RELOAD_TIME: Duration = Duration::from_secs(30);

/// Reloads everything (blocking: files are read) and puts it in force;
/// returns a status line for systemd and the snapshot that was replaced,
/// if one was. Nothing is published once `abandoned` is set.
fn publish(app: &App, abandoned: &AtomicBool) -> (String, Option<Arc<Snapshot>>) {
    let current = &app.live.load().settings;
    let next = current
        .reload()
        .and_then(|new| Snapshot::build(&app.mirror.upstream, new, app.live.next_generation()));
    let next = match next {
        Ok(s) => s,
        Err(errors) => return (failed(&errors.0), None),
    };
    if abandoned.load(Ordering::Acquire) {
        return ("reload abandoned".into(), None);
    }
    let new = &next.settings;
    if new.listen != current.listen {
        tracing::warn!(old = %current.listen, new = %new.listen, "listen changed: restart to apply");
    }
    if new.cache_dir != current.cache_dir {
        tracing::warn!(old = %current.cache_dir.display(), new = %new.cache_dir.display(), "cache_dir changed: restart to apply");
    }
    if new.hosts_dir != current.hosts_dir {
        tracing::info!(dir = %new.hosts_dir.display(), "hosts_dir changed: read now; restart to watch it for changes");
    }
    match (&app.mirror.cluster, &new.cluster) {
        (Some(c), Some(s)) => {
            if let Err(e) = c.reload(s) {
                tracing::error!(error = %e, "cluster reload failed; keeping its last good settings");
            }
        }
        (None, Some(_)) | (Some(_), None) => {
            tracing::warn!("[cluster] added or removed: restart to apply")
        }
        (None, None) => {}
    }
    match crate::cache::Limits::from_settings(&new.cache, app.mirror.store.root()) {
        Ok(limits) => app
            .mirror
            .store
            .set_budget(limits.budget(new.cache.max_blob_size)),
        Err(e) => tracing::warn!(error = %e, "cache limits not applied"),
    }
    let status = format!("reloaded {}", new.hosts_dir.display());
    let old = app.live.publish(next);
    tracing::info!("configuration reloaded");
    (status, Some(old))
}

/// How long the reload waits for the requests that hold the snapshot it
/// replaced, to free it itself.
const RETIRE_WAIT: Duration = Duration::from_secs(1);

/// Drops the replaced snapshot here, on the reload's thread, once the
/// requests that started with it are done (a big configuration's drop is
/// work no request should do); after [`RETIRE_WAIT`] the last holder
/// drops it.
fn retire(old: Arc<Snapshot>) {
    let deadline = std::time::Instant::now() + RETIRE_WAIT;
    while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(old);
}

/// Reloads on a thread of its own at a lower CPU priority (nice 10):
/// reading and parsing a large configuration never takes a core from the
/// requests. The status line comes back as soon as the new snapshot is
/// in force; the old one is retired after that.
fn in_background(
    app: Arc<App>,
    abandoned: Arc<AtomicBool>,
) -> tokio::sync::oneshot::Receiver<String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // What the reload starts (the cluster's DNS refresher) runs on the
    // daemon's runtime.
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("nodemirror-reload".into())
        .spawn(move || {
            let _runtime = runtime.enter();
            lower_priority();
            let (status, old) = publish(&app, &abandoned);
            let _ = tx.send(status);
            if let Some(old) = old {
                retire(old);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the reload thread");
    }
    rx
}

/// Nice 10 for the calling thread (on Linux a thread's own).
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: setpriority with PRIO_PROCESS and 0 changes only the calling
    // thread's nice value; it touches no memory.
    let r = unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, 10) };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "reload thread keeps its priority");
    }
}

/// Logs each problem; returns the status line of a failed reload.
fn failed(errors: &[crate::config::ConfigError]) -> String {
    for e in errors {
        tracing::error!(error = %e, "reload failed; keeping the last good configuration");
    }
    format!(
        "reload failed ({} errors); last good configuration in force",
        errors.len()
    )
}

/// Background reloading: a SIGHUP listener and a file watcher.
pub struct Reloader {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Reloader {
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Reloads off the async threads (files are read and parsed there), so
/// requests are served meanwhile; gives up after [`RELOAD_TIME`].
async fn reload_now(app: &Arc<App>) {
    systemd::reloading();
    tracing::info!("reloading configuration");
    let abandoned = Arc::new(AtomicBool::new(false));
    let work = {
        let (app, abandoned) = (app.clone(), abandoned.clone());
        in_background(app, abandoned)
    };
    let status = match tokio::time::timeout(RELOAD_TIME, work).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reload failed; keeping the last good configuration");
            "reload failed; last good configuration in force".into()
        }
        Err(_) => {
            abandoned.store(true, Ordering::Release);
            tracing::error!(limit = ?RELOAD_TIME,
                "reload did not finish in time; keeping the last good configuration");
            "reload timed out; last good configuration in force".into()
        }
    };
    systemd::ready(&status);
}

pub fn spawn(app: Arc<App>) -> Reloader {
    let mut tasks = Vec::new();
    let hup_app = app.clone();
    tasks.push(tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            reload_now(&hup_app).await;
        }
    }));
    let settings = app.live.load().settings.clone();
    let mut targets = vec![Target {
        dir: settings.hosts_dir.clone(),
        only: None,
    }];
    // The folders of the config file and of the credentials file may hold
    // anything (logs, even): react to those two files only, wherever
    // they are.
    // With no credentials file yet, the default one is watched: creating
    // it applies it.
    let auth = settings
        .auth_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_AUTH_FILE));
    let files = settings.config_file().into_iter().chain(Some(auth));
    for file in files {
        let dir = file.parent().map(PathBuf::from).unwrap_or_default();
        match targets
            .iter_mut()
            .find(|t| t.dir == dir && t.only.is_some())
        {
            Some(t) => t.only.get_or_insert_with(Vec::new).push(file),
            None => targets.push(Target {
                dir,
                only: Some(vec![file]),
            }),
        }
    }
    let watcher = watch(targets).map(|(watcher, mut rx)| {
        tasks.push(tokio::spawn(async move {
            while rx.recv().await.is_some() {
                loop {
                    match tokio::time::timeout(SETTLE, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                reload_now(&app).await;
            }
        }));
        watcher
    });
    Reloader {
        tasks,
        _watcher: watcher,
    }
}

/// A folder to watch: everything under it, or `only` these files in it.
struct Target {
    dir: PathBuf,
    only: Option<Vec<PathBuf>>,
}

/// Watches the targets; each relevant change sends a unit.
fn watch(
    targets: Vec<Target>,
) -> Option<(
    notify::RecommendedWatcher,
    tokio::sync::mpsc::UnboundedReceiver<()>,
)> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let recursive: Vec<PathBuf> = targets
        .iter()
        .filter(|t| t.only.is_none())
        .map(|t| t.dir.clone())
        .collect();
    let files: Vec<PathBuf> = targets
        .iter()
        .flat_map(|t| t.only.clone().unwrap_or_default())
        .collect();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if matches!(ev.kind, EventKind::Access(_)) {
            return;
        }
        let relevant = ev
            .paths
            .iter()
            .any(|p| recursive.iter().any(|d| p.starts_with(d)) || files.iter().any(|f| p == f));
        if relevant {
            let _ = tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for configuration changes; reload with SIGHUP");
            return None;
        }
    };
    let mut watching = 0;
    for t in targets {
        let mode = if t.only.is_none() {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        match watcher.watch(&t.dir, mode) {
            Ok(()) => watching += 1,
            Err(e) => {
                tracing::info!(dir = %t.dir.display(), error = %e, "not watching for changes; reload with SIGHUP")
            }
        }
    }
    (watching > 0).then_some((watcher, rx))
}
