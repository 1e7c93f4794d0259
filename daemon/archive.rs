//! Images in and out of the cache without a registry: `nodemirror cache
//! import` and `nodemirror cache export` ([`crate::cache::import`],
//! [`crate::cache::export`] do the work).
//!
//! An import into a cache a daemon holds goes through that daemon (`POST
//! /cache/import`, the archive as the body, allowed users only): the
//! daemon owns its cache, so the files are its own, counted in its room
//! and kept from its collector while they land. Without a daemon the
//! command writes the cache itself, and as root hands what it wrote to
//! the cache's owner (the `nodemirror` user under systemd).

use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::cache::export::{self, PlatformChoice};
use crate::cache::import::{self, Import, ImportError, Imported};
use crate::cache::Store;
use crate::oci::ResponseBody;
use crate::reference::ImageRef;
use crate::server::App;

/// `POST /cache/import?as=IMAGE[&as=IMAGE...]`, an uncompressed tar as
/// the body: the import's report as JSON.
pub async fn serve_import(app: &App, req: Request<Incoming>) -> Response<ResponseBody> {
    use crate::admin::answer;
    let error = |status, e: String| answer(status, serde_json::json!({ "error": e }));
    if req.method() != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "POST /cache/import".into());
    }
    if !crate::admin::caller_allowed(app, &req).await {
        return error(
            StatusCode::FORBIDDEN,
            "only users in [server] allowed_uids/allowed_gids may import into the cache".into(),
        );
    }
    let mut targets = Vec::new();
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        if k == "as" {
            match v.parse::<ImageRef>() {
                Ok(r) => targets.push(r),
                Err(e) => return error(StatusCode::BAD_REQUEST, format!("as={v}: {e}")),
            }
        }
    }
    let store = app.mirror.store.clone();
    let frames = http_body_util::BodyStream::new(req.into_body())
        .filter_map(|f| async move {
            match f {
                Ok(frame) => frame.into_data().ok().map(Ok::<Bytes, io::Error>),
                Err(e) => Some(Err(io::Error::other(e))),
            }
        })
        .boxed();
    // An upload that sends nothing for `[server] send_timeout` ends the
    // import (its staged files go), rather than holding a thread and its
    // room for ever.
    let idle = app.live.load().settings.server.send_timeout;
    let frames = stream::unfold(frames, move |mut frames| async move {
        match tokio::time::timeout(idle, frames.next()).await {
            Ok(Some(item)) => Some((item, frames)),
            Ok(None) => None,
            Err(_) => Some((
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the upload sent nothing for {idle:?}"),
                )),
                frames,
            )),
        }
    })
    .boxed();
    let body = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(frames));
    let work = tokio::task::spawn_blocking(move || {
        let mut import = Import::new(store, targets)?;
        import::read_tar(&mut import, body, &mut |_| {})?;
        import.finish()
    })
    .await;
    match work {
        Ok(Ok((report, _))) => {
            tracing::info!(images = ?report.images, blobs_added = report.blobs_added,
                bytes_added = report.bytes_added, "imported into the cache");
            answer(
                StatusCode::OK,
                serde_json::to_value(&report).unwrap_or_default(),
            )
        }
        Ok(Err(ImportError::NoRoom(e))) => error(StatusCode::INSUFFICIENT_STORAGE, e.to_string()),
        Ok(Err(ImportError::Invalid(e))) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(ImportError::Io(e))) if e.kind() == io::ErrorKind::TimedOut => {
            error(StatusCode::REQUEST_TIMEOUT, e.to_string())
        }
        Ok(Err(ImportError::Io(e))) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Prints progress on stderr: each second, and at each quarter of an
/// archive of at least [`BIG`] bytes.
struct Progress {
    what: &'static str,
    total: u64,
    last: Instant,
    quarter: u64,
    shown: bool,
}

/// Archives from this size get their quarters told, however fast.
const BIG: u64 = 16 << 20;

impl Progress {
    fn new(what: &'static str, total: u64) -> Progress {
        Progress {
            what,
            total,
            last: Instant::now(),
            quarter: 0,
            shown: false,
        }
    }

    fn tell(&mut self, done: u64) {
        let quarter = match self.total {
            t if t >= BIG => done.saturating_mul(4) / t,
            _ => 0,
        };
        let new_quarter = quarter > self.quarter;
        self.quarter = self.quarter.max(quarter);
        if !new_quarter && self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = Instant::now();
        self.shown = true;
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let line = if self.total > 0 {
            format!(
                "{}: {:.0} of {:.0} MiB ({}%)",
                self.what,
                mib(done),
                mib(self.total),
                done.saturating_mul(100) / self.total
            )
        } else {
            format!("{}: {:.0} MiB", self.what, mib(done))
        };
        let mut err = io::stderr();
        if err.is_terminal() {
            let _ = write!(err, "\r{line}   ");
        } else {
            let _ = writeln!(err, "{line}");
        }
    }

    fn done(&self) {
        if self.shown && io::stderr().is_terminal() {
            eprintln!();
        }
    }
}

/// Imports `input` (a tar or a folder) into the cache at `store`: through
/// the daemon at `daemon` when one holds the cache, else directly.
pub fn import_command(
    store: Arc<Store>,
    daemon: Option<String>,
    input: &Path,
    targets: Vec<ImageRef>,
) -> Result<Imported, String> {
    let meta = std::fs::metadata(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let total = if meta.is_dir() {
        import::files_under(input)
            .map(|files| files.iter().map(|(_, size)| size).sum())
            .map_err(|e| format!("{}: {e}", input.display()))?
    } else {
        meta.len()
    };
    let mut progress = Progress::new("import", total);
    let result = match daemon {
        Some(base) => through_daemon(&base, input, meta.is_dir(), targets, &mut progress),
        None => directly(store, input, meta.is_dir(), targets, &mut progress),
    };
    progress.done();
    result
}

fn directly(
    store: Arc<Store>,
    input: &Path,
    is_dir: bool,
    targets: Vec<ImageRef>,
    progress: &mut Progress,
) -> Result<Imported, String> {
    let root = store.root().to_path_buf();
    let mut import = Import::new(store, targets).map_err(|e| e.to_string())?;
    let mut tell = |n| progress.tell(n);
    let read = if is_dir {
        import::read_dir(&mut import, input, &mut tell)
    } else {
        std::fs::File::open(input)
            .map_err(ImportError::from)
            .and_then(|f| import::read_tar(&mut import, io::BufReader::new(f), &mut tell))
    };
    read.map_err(|e| format!("{}: {e}", input.display()))?;
    let (report, created) = import.finish().map_err(|e| e.to_string())?;
    hand_to_owner(&root, &created)
        .map_err(|e| format!("cannot hand the files to the cache's owner: {e}"))?;
    Ok(report)
}

/// As root, gives the files written (and the folders made for them) to
/// the owner of the cache folder, so that a daemon running as that user
/// reads them.
fn hand_to_owner(root: &Path, created: &[PathBuf]) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let owner = std::fs::metadata(root)?;
    if owner.uid() == 0 {
        return Ok(());
    }
    let (uid, gid) = (Some(owner.uid()), Some(owner.gid()));
    let mut done = std::collections::HashSet::new();
    for path in created {
        let mut p = path.as_path();
        while p.starts_with(root) && p != root {
            if !done.insert(p.to_path_buf()) {
                break;
            }
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.uid() != owner.uid() => std::os::unix::fs::lchown(p, uid, gid)?,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            p = match p.parent() {
                Some(parent) => parent,
                None => break,
            };
        }
    }
    Ok(())
}

/// Sends the archive (a folder is sent as a tar made on the fly) to the
/// daemon's `POST /cache/import`.
fn through_daemon(
    base: &str,
    input: &Path,
    is_dir: bool,
    targets: Vec<ImageRef>,
    progress: &mut Progress,
) -> Result<Imported, String> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    for t in &targets {
        query.append_pair("as", &t.to_string());
    }
    let url = format!(
        "{}/cache/import?{}",
        base.trim_end_matches('/'),
        query.finish()
    );
    let source: Box<dyn io::Read + Send> = if is_dir {
        let (reader, writer) = nix::unistd::pipe().map_err(|e| e.to_string())?;
        let (reader, writer) = (std::fs::File::from(reader), std::fs::File::from(writer));
        let dir = input.to_path_buf();
        std::thread::spawn(move || {
            if let Err(e) = tar_folder(&dir, writer) {
                tracing::warn!(error = %e, "cannot read the folder");
            }
        });
        Box::new(reader)
    } else {
        Box::new(std::fs::File::open(input).map_err(|e| format!("{}: {e}", input.display()))?)
    };
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0u64);
    let (status, body) = rt.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
        // Reading the source blocks: on its own thread.
        let mut source = source;
        let reading = tokio::task::spawn_blocking(move || {
            let mut sent = 0u64;
            loop {
                let mut buf = vec![0u8; 1 << 20];
                match source.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        sent += n as u64;
                        let _ = sent_tx.send(sent);
                        if tx.blocking_send(Ok(buf.into())).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
        });
        let stream = tokio_stream_of(rx).map(|r| r.map(hyper::body::Frame::data));
        let body = http_body_util::StreamBody::new(stream);
        let client: hyper_util::client::legacy::Client<_, _> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let req = Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/x-tar")
            .body(body)
            .map_err(|e| e.to_string())?;
        let answer = client.request(req);
        tokio::pin!(answer);
        let resp = loop {
            tokio::select! {
                r = &mut answer => break r.map_err(|e| format!("{url}: {}", crate::upstream::error_chain(&e)))?,
                changed = sent_rx.changed() => {
                    if changed.is_ok() {
                        progress.tell(*sent_rx.borrow());
                    } else {
                        break answer.await.map_err(|e| format!("{url}: {}", crate::upstream::error_chain(&e)))?;
                    }
                }
            }
        };
        reading.abort();
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    })?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: {status}: {e}"))?;
    if status != StatusCode::OK {
        return Err(format!(
            "the daemon using this cache: {status}: {}",
            v["error"].as_str().unwrap_or("")
        ));
    }
    serde_json::from_value(v).map_err(|e| format!("{url}: {e}"))
}

fn tokio_stream_of<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Writes the files under `dir` as a tar, paths relative to it.
fn tar_folder(dir: &Path, out: impl Write) -> io::Result<()> {
    let mut tar = tar::Builder::new(out);
    for (rel, _) in import::files_under(dir)? {
        tar.append_path_with_name(dir.join(&rel), &rel)?;
    }
    tar.into_inner()?.flush()
}

/// Writes the images as an OCI layout tar to `output` (`-`: standard
/// output), through a temporary file beside it.
pub fn export_command(
    store: &Store,
    images: &[ImageRef],
    platforms: &[PlatformChoice],
    output: &Path,
) -> Result<export::Exported, String> {
    let mut progress = Progress::new("export", 0);
    if output == Path::new("-") {
        let out = io::BufWriter::new(io::stdout().lock());
        let r = export::export(store, images, platforms, out, &mut |n| progress.tell(n));
        progress.done();
        return r.map_err(|e| e.to_string());
    }
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let partial = output.with_file_name(format!(".{name}.partial"));
    let file =
        std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let written = export::export(
        store,
        images,
        platforms,
        io::BufWriter::new(&file),
        &mut |n| progress.tell(n),
    )
    .map_err(|e| e.to_string())
    .and_then(|r| {
        file.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&partial, output).map_err(|e| format!("{}: {e}", output.display()))?;
        Ok(r)
    });
    progress.done();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}
