//! Zero-copy sending of cached blobs on plain-TCP connections.
//!
//! hyper writes response bodies from memory; it has no file body. So a
//! cached blob's body is one frame whose bytes are the blob file mapped
//! read-only, and the connection's writer ([`Stream`]) knows the mappings
//! its responses hold ([`Mappings`]). With vectored writes hyper queues
//! body frames as they are and hands their slices to the writer unchanged;
//! when the writer sees a slice that lies inside one of its mappings, it
//! sends those bytes with sendfile(2) from the file at the same offset
//! instead of copying them out of the mapping.
//!
//! The mapped pages are therefore never touched: no copy through user
//! space, and no resident memory growing with the blob's size (a mapping
//! costs address space only). Correctness does not rest on recognising
//! the slice: a slice that reached the writer by another way would hold
//! the file's own bytes. Cache files are never written after they are
//! renamed into place (a new blob is a new file, eviction unlinks), so the
//! mapping and the file agree.
//!
//! While a mapped slice goes out the socket is corked (`TCP_CORK`, as
//! nginx's `tcp_nopush`), and uncorked when the slice is sent: the kernel
//! then sends full-sized segments only, and the slice's tail at once.
//! Measured on the 2-core project machine, warm 256 MiB GETs on loopback:
//! 0.031 CPU-s per GET without, 0.024 with (nginx with `tcp_nopush`:
//! 0.022).

use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::cache::InUse;
use crate::metrics::METRICS;

/// Blobs smaller than this go through the ordinary read path: mapping and
/// registering costs more than copying a few pages.
pub const MIN_LEN: u64 = 64 << 10;

/// Bytes per sendfile(2) call, like nginx's `sendfile_max_chunk`; after
/// each such call the connection's task yields (its writer answers
/// `Pending` and wakes itself at once), so one big body on a fast socket
/// cannot hold a worker from the other connections: without the yield,
/// hyper's write loop went on until the socket was full, which on loopback
/// is the whole blob (a 4 KiB GET beside a 256 MiB one waited ~100 ms).
const MAX_SEND: usize = 512 << 10;

/// The file mappings of one connection's responses in progress.
#[derive(Default)]
pub struct Mappings {
    regions: Mutex<Vec<Region>>,
}

struct Region {
    start: usize,
    len: usize,
    file: Arc<File>,
    /// The file offset of the mapping's first byte.
    offset: u64,
}

impl Mappings {
    fn lock(&self) -> MutexGuard<'_, Vec<Region>> {
        self.regions.lock()
    }

    /// The file and offset that `slice` shows, if it lies inside a mapping.
    fn find(&self, slice: &[u8]) -> Option<(Arc<File>, u64)> {
        let at = slice.as_ptr() as usize;
        self.lock()
            .iter()
            .find(|r| at >= r.start && at + slice.len() <= r.start + r.len)
            .map(|r| (r.file.clone(), r.offset + (at - r.start) as u64))
    }

    /// Bytes `start..end` of a complete cached blob of `len` bytes, as a
    /// frame this connection's writer sends with sendfile. `held` keeps the
    /// blob from eviction until the frame is dropped; if the file cannot be
    /// mapped, it comes back with the error.
    pub fn blob(
        self: &Arc<Self>,
        file: &File,
        len: u64,
        start: u64,
        end: u64,
        held: InUse,
    ) -> Result<Bytes, (io::Error, InUse)> {
        let mapped = map_read_only(file, 0, len).and_then(|map| Ok((map, file.try_clone()?)));
        let (map, file) = match mapped {
            Ok(m) => m,
            Err(e) => return Err((e, held)),
        };
        let whole = self.register(map, Arc::new(file), 0, Arc::new(held));
        Ok(whole.slice(start as usize..end as usize))
    }

    /// Bytes `start..end` of a blob still being fetched, as a frame this
    /// connection's writer sends with sendfile: only bytes already written
    /// (`end` at most the ingest's published `written`), which the ingest
    /// never writes again. `held` keeps the blob from eviction.
    pub fn part(
        self: &Arc<Self>,
        file: &Arc<File>,
        start: u64,
        end: u64,
        held: &Arc<InUse>,
    ) -> io::Result<Bytes> {
        let page = page_size() as u64;
        let aligned = start - start % page;
        let map = map_read_only(file, aligned, end - aligned)?;
        let frame = self.register(map, file.clone(), aligned, held.clone());
        Ok(frame.slice((start - aligned) as usize..))
    }

    fn register(
        self: &Arc<Self>,
        map: memmap2::Mmap,
        file: Arc<File>,
        offset: u64,
        held: Arc<InUse>,
    ) -> Bytes {
        self.lock().push(Region {
            start: map.as_ptr() as usize,
            len: map.len(),
            file,
            offset,
        });
        Bytes::from_owner(Mapped {
            map,
            mappings: self.clone(),
            _held: held,
        })
    }
}

/// A mapping, registered with its connection for as long as it lives.
struct Mapped {
    map: memmap2::Mmap,
    mappings: Arc<Mappings>,
    _held: Arc<InUse>,
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // Unregister before the address range is unmapped (the field drops
        // after this), so a later mapping at the same address is never
        // mistaken for this one.
        let start = self.map.as_ptr() as usize;
        self.mappings.lock().retain(|r| r.start != start);
    }
}

#[allow(unsafe_code)]
fn map_read_only(file: &File, offset: u64, len: u64) -> io::Result<memmap2::Mmap> {
    // SAFETY: the mapped bytes are never written again while mapped: either
    // the file is a complete, verified cache file (the store never writes
    // to such a file again: blobs are written to a temp file and renamed
    // into place; eviction and quarantine unlink or rename), or the range
    // is the already-written start of a blob being fetched, and the ingest
    // writes each offset once (its writers resume past what they wrote;
    // `written` counts only bytes on disk). The mapping is read-only and
    // its pages are normally never read at all (the writer sends the file
    // instead); if another process truncated the file anyway, sendfile
    // would come up short and the connection would be cut.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len as usize)
            .map(file)
    }
}

/// A plain-TCP connection whose writer sends mapped blob frames with
/// sendfile(2) and everything else with ordinary (vectored) writes.
pub struct Stream {
    tcp: TcpStream,
    mappings: Arc<Mappings>,
    /// `TCP_CORK` is on: a mapped slice is being sent.
    corked: bool,
    /// A sendfile call was made in this turn of the task: the next one
    /// yields first.
    sent_this_turn: bool,
    /// The next chunk, not in the page cache, being read on the disk pool.
    warming: Option<Warming>,
}

/// A chunk of a mapped file being read from disk on the disk pool, so
/// that the sendfile(2) that follows finds its pages in the page cache and
/// does not wait for the disk on the connection's worker.
struct Warming {
    offset: u64,
    done: Pin<Box<dyn Future<Output = io::Result<()>> + Send>>,
}

impl Stream {
    pub fn new(tcp: TcpStream) -> Self {
        Stream {
            tcp,
            mappings: Arc::default(),
            corked: false,
            sent_this_turn: false,
            warming: None,
        }
    }

    /// Corks or uncorks the socket. Uncorking sends what is queued at
    /// once. A failure costs only speed, so it is logged, not returned.
    fn cork(&mut self, on: bool) {
        if self.corked == on {
            return;
        }
        self.corked = on;
        if let Err(e) = socket2::SockRef::from(&self.tcp).set_tcp_cork(on) {
            tracing::debug!(error = %e, on, "TCP_CORK");
        }
    }

    /// The registry that this connection's blob frames are mapped into.
    pub fn mappings(&self) -> Arc<Mappings> {
        self.mappings.clone()
    }

    /// Sends up to [`MAX_SEND`] bytes of a mapped slice (`slice`, which
    /// shows `file` from `offset`), corked until the slice's last byte is
    /// sent. A chunk whose pages are not all in the page cache is first
    /// read on the disk pool: sendfile then copies from memory and never
    /// waits for the disk here.
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        file: &Arc<File>,
        offset: u64,
        slice: &[u8],
    ) -> Poll<io::Result<usize>> {
        if std::mem::take(&mut self.sent_this_turn) {
            // One chunk per turn: let the worker run other tasks first.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let len = slice.len();
        let count = len.min(MAX_SEND);
        ready!(self.poll_warm(cx, file, offset, &slice[..count]));
        self.cork(true);
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let sent = self.tcp.try_io(Interest::WRITABLE, || {
                let mut off = offset as nix::libc::off_t;
                nix::sys::sendfile::sendfile(self.tcp.as_fd(), file.as_fd(), Some(&mut off), count)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(n) => {
                    METRICS.sent_by_sendfile.inc_by(n as u64);
                    self.sent_this_turn = true;
                    if n == len {
                        self.cork(false);
                    }
                    // 0 means the file is shorter than its mapping: hyper
                    // treats a zero-length write as an error and closes.
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Stream {
    /// Ready once `chunk` (file bytes from `offset`) is in the page cache:
    /// at once when it already is (mincore(2) on the mapping says so),
    /// else after a read of it on the disk pool.
    fn poll_warm(
        &mut self,
        cx: &mut Context<'_>,
        file: &Arc<File>,
        offset: u64,
        chunk: &[u8],
    ) -> Poll<()> {
        let mut warming = match self.warming.take() {
            Some(w) if w.offset == offset => w,
            // A chunk read for another write is no longer wanted.
            _ => {
                if resident(chunk) {
                    return Poll::Ready(());
                }
                METRICS.sendfile_disk_reads.inc();
                let (file, count) = (file.clone(), chunk.len());
                let read = crate::cache::pool::run(move || read_through(&file, offset, count));
                Warming {
                    offset,
                    done: Box::pin(async move { read.await? }),
                }
            }
        };
        match warming.done.as_mut().poll(cx) {
            // A read error is left for sendfile to meet and report.
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => {
                self.warming = Some(warming);
                Poll::Pending
            }
        }
    }
}

/// The system's page size.
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |p| p as usize)
    })
}

/// Whether every page under `chunk`, a slice of a live file mapping, is in
/// the page cache. When mincore(2) cannot tell (an error, or a chunk over
/// more pages than [`MAX_SEND`] makes), it says yes: the chunk is then
/// sent as it would be without the check.
#[allow(unsafe_code)]
fn resident(chunk: &[u8]) -> bool {
    const MOST: usize = MAX_SEND / 4096 + 2;
    let page = page_size();
    let at = chunk.as_ptr() as usize;
    let start = at - at % page;
    let span = at + chunk.len() - start;
    let pages = span.div_ceil(page);
    if chunk.is_empty() || pages > MOST {
        return true;
    }
    let mut flags = [0u8; MOST];
    // SAFETY: `start..start + span` lies inside the mapping that `chunk`
    // is a slice of (mappings start on a page boundary and `chunk` is
    // borrowed, so the mapping is live); mincore only reads the page
    // tables and writes one byte per page into `flags`, which has room
    // for `pages` bytes.
    let r =
        unsafe { nix::libc::mincore(start as *mut nix::libc::c_void, span, flags.as_mut_ptr()) };
    r != 0 || flags[..pages].iter().all(|f| f & 1 == 1)
}

/// Reads `count` bytes of `file` from `offset` (on the disk pool), so that
/// they are in the page cache; the bytes themselves are dropped.
fn read_through(file: &File, offset: u64, count: usize) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const STEP: usize = 64 << 10;
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; STEP]);
    }
    SCRATCH.with_borrow_mut(|buf| {
        let mut done = 0;
        while done < count {
            let want = (count - done).min(STEP);
            match file.read_at(&mut buf[..want], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some((file, offset)) = self.mappings.find(buf) {
            return self.poll_sendfile(cx, &file, offset, buf);
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // What comes before the first mapped slice (response heads, small
        // bodies) goes in one write; a mapped slice goes alone, by sendfile.
        let mut before = 0;
        for (i, b) in bufs.iter().enumerate() {
            if b.is_empty() {
                continue;
            }
            if let Some((file, offset)) = self.mappings.find(b) {
                if before == 0 {
                    return self.poll_sendfile(cx, &file, offset, b);
                }
                return Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..i]);
            }
            before += b.len();
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper queues body frames unchanged only for vectored writers;
        // otherwise it would copy them into its own buffer.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing stays held by the cork once the writer asks for it out.
        self.cork(false);
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.cork(false);
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::cache::Store;
    use crate::reference::Digest;

    fn corked(s: &Stream) -> bool {
        socket2::SockRef::from(&s.tcp).tcp_cork().unwrap()
    }

    /// A mapped slice goes out corked and leaves the socket uncorked once
    /// its last byte is sent, so nothing waits in the kernel for more.
    #[tokio::test]
    async fn a_mapped_slice_is_sent_corked_then_uncorked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let data: Vec<u8> = (0..(5 * MAX_SEND as u32 + 123))
            .map(|i| (i % 253) as u8)
            .collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let held = store.hold(&Digest::of(&data));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut client, mut stream) = (client.unwrap(), Stream::new(accepted.unwrap().0));
        let len = data.len() as u64;
        let frame = stream
            .mappings()
            .blob(&file, len, 7, len, held)
            .ok()
            .unwrap();

        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut rest = &frame[..];
        let mut corked_between = true;
        while !rest.is_empty() {
            let n = stream.write(rest).await.unwrap();
            assert!(n > 0 && n <= MAX_SEND);
            rest = &rest[n..];
            if !rest.is_empty() {
                corked_between &= corked(&stream);
            }
        }
        assert!(corked_between, "the socket was uncorked inside the slice");
        assert!(!corked(&stream), "the socket stayed corked after the slice");
        drop(frame);
        stream.shutdown().await.unwrap();
        drop(stream);
        assert_eq!(reader.await.unwrap(), data[7..]);
    }
}
