//! The bounded pool that does the daemon's disk and hashing work: writes
//! and hashes of ingests, reads of files for clients (and of chunks sendfile
//! will send, when they are not in the page cache), fsync and rename, the
//! removal of abandoned temporary files.
//!
//! Each job is short (one batch of at most a few MiB): no thread is held
//! for the life of a download or a response, so any number of slow
//! upstreams or slow clients cannot exhaust the threads that every other
//! request needs (before, each ingest held two blocking threads and each
//! reader one: 270 trickling downloads used up tokio's blocking pool and
//! cached blobs stalled behind them).

use std::io;
use std::sync::LazyLock;

use tokio::sync::oneshot;

/// Threads: twice the processors (the work is page-cache copies and
/// SHA-256, with some waiting on the disk), at least 4.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .max(4)
}

static POOL: LazyLock<Option<rayon::ThreadPool>> = LazyLock::new(|| {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads())
        .thread_name(|i| format!("nodemirror-disk-{i}"))
        .build()
        .map_err(|e| tracing::error!(error = %e, "cannot start the disk pool; using tokio's"))
        .ok()
});

/// Starts `job` on the pool at once (before the future is first polled,
/// so a caller may go on receiving while it runs) and returns its result
/// without blocking the runtime.
pub fn run<T, F>(job: F) -> impl std::future::Future<Output = io::Result<T>> + Send
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    enum Started<T> {
        Pool(oneshot::Receiver<T>),
        Tokio(tokio::task::JoinHandle<T>),
    }
    let started = match POOL.as_ref() {
        Some(pool) => {
            let (tx, rx) = oneshot::channel();
            pool.spawn(move || {
                let _ = tx.send(job());
            });
            Started::Pool(rx)
        }
        None => Started::Tokio(tokio::task::spawn_blocking(job)),
    };
    async move {
        match started {
            Started::Pool(rx) => rx
                .await
                .map_err(|_| io::Error::other("the disk pool dropped a job")),
            Started::Tokio(handle) => handle.await.map_err(|e| io::Error::other(e.to_string())),
        }
    }
}

/// Starts `job` on the pool and does not wait for it (a clean-up that
/// nobody waits on, like removing a temporary file from a `Drop`). Without
/// a pool it runs here.
pub fn detach(job: impl FnOnce() + Send + 'static) {
    match POOL.as_ref() {
        Some(pool) => pool.spawn(job),
        None => job(),
    }
}
