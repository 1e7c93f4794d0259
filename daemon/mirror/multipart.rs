//! `206 multipart/byteranges` answers (RFC 9110 §14.6) for requests with
//! several ranges, as zstd:chunked pulls and lazy pullers send them: one
//! part per range, each read from the blob's file as the fetch makes its
//! bytes readable (a cached blob at once), in the order the ranges were
//! asked (see [`super::range::MAX_PARTS`]).
//!
//! The framing is Go's `mime/multipart` writer's, which containers/image
//! reads: `--B` and each part's headers, CRLF between parts, `--B--` at
//! the end; the body's length is known before the first byte.

use std::fs::File;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{stream, StreamExt};
use http_body::Frame;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use crate::cache::ingest::Progress;
use crate::cache::{read, InUse, Store};
use crate::oci::{boxed, BoxError, ResponseBody};
use crate::reference::Digest;

/// The parts of one answer: each range with its header.
pub struct Parts {
    boundary: String,
    parts: Vec<(Bytes, u64, u64)>,
    closing: Bytes,
    digest: Digest,
}

impl Parts {
    pub fn new(ranges: &[(u64, u64)], total: u64, digest: &Digest) -> Parts {
        let boundary = boundary(digest);
        let parts = ranges
            .iter()
            .enumerate()
            .map(|(i, &(a, b))| {
                let lead = if i == 0 { "" } else { "\r\n" };
                let head = format!(
                    "{lead}--{boundary}\r\nContent-Range: bytes {a}-{b}/{total}\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                );
                (Bytes::from(head), a, b)
            })
            .collect();
        let closing = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        Parts {
            boundary,
            parts,
            closing,
            digest: digest.clone(),
        }
    }

    pub fn content_type(&self) -> String {
        format!("multipart/byteranges; boundary={}", self.boundary)
    }

    /// The body's length in bytes.
    pub fn len(&self) -> u64 {
        self.parts
            .iter()
            .map(|(h, a, b)| h.len() as u64 + (b - a + 1))
            .sum::<u64>()
            + self.closing.len() as u64
    }

    /// The body: each part's header, then its bytes from `file` as
    /// `progress` makes them readable. `held` keeps the blob from eviction
    /// until the body ends; each part holds it too while it reads.
    pub fn body(
        self,
        file: Arc<File>,
        progress: watch::Receiver<Progress>,
        store: Arc<Store>,
        held: InUse,
    ) -> ResponseBody {
        let Parts {
            parts,
            closing,
            digest,
            ..
        } = self;
        let frames = stream::iter(parts).flat_map(move |(head, a, b)| {
            let _ = &held;
            let bytes = read::stream(
                file.clone(),
                progress.clone(),
                (a, Some(b + 1), a == 0),
                store.hold(&digest),
                None,
                None,
            );
            stream::once(async move { Ok::<_, BoxError>(Frame::data(head)) })
                .chain(http_body_util::BodyStream::new(bytes))
        });
        let end = stream::once(async move { Ok::<_, BoxError>(Frame::data(closing)) });
        boxed(http_body_util::StreamBody::new(frames.chain(end)))
    }
}

/// A boundary no blob byte sequence is likely to contain: 32 hex digits
/// from the digest and the time.
fn boundary(digest: &Digest) -> String {
    let mut h = Sha256::new();
    h.update(digest.hex().as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.update(now.to_le_bytes());
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn parts_are_framed_as_go_reads_them_and_sized_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let d = Digest::of(&blob);
        let path = dir.path().join("blob");
        std::fs::write(&path, &blob).unwrap();
        let parts = Parts::new(&[(9000, 9009), (0, 4)], blob.len() as u64, &d);
        let len = parts.len();
        let ct = parts.content_type();
        let (_, progress) = watch::channel(Progress::complete(blob.len() as u64));
        let body = parts.body(
            Arc::new(File::open(&path).unwrap()),
            progress,
            store.clone(),
            store.hold(&d),
        );
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(got.len() as u64, len);
        let b = ct.strip_prefix("multipart/byteranges; boundary=").unwrap();
        let text = String::from_utf8_lossy(&got);
        let want_head = format!(
            "--{b}\r\nContent-Range: bytes 9000-9009/10000\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        assert!(text.starts_with(&want_head), "{text}");
        let first = &got[want_head.len()..want_head.len() + 10];
        assert_eq!(first, &blob[9000..9010]);
        assert!(text.contains("Content-Range: bytes 0-4/10000"));
        assert!(got.ends_with(format!("\r\n--{b}--\r\n").as_bytes()));
        assert!(!store.in_use(&d), "holds end with the body");
    }
}
