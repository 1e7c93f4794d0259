//! Prometheus metrics, served at `/metrics` in the text exposition format,
//! on the Prometheus project's Rust client (`prometheus-client`).
//!
//! One process-wide registry: counters and histograms are bumped where
//! things happen (server, cache, upstream) and gauges are set when
//! scraped. Namespace labels are bounded: registries named by requests
//! alone are counted as `other` ([`ns_label`]).

use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family as PromFamily, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::oci::{BoxError, ResponseBody};

type Labels = Vec<(&'static str, String)>;

fn key(labels: &[(&'static str, &str)]) -> Labels {
    labels.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// A family of counters keyed by label values.
#[derive(Clone)]
pub struct Family(PromFamily<Labels, Counter>);

impl Family {
    fn new() -> Self {
        Family(PromFamily::default())
    }

    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        self.add(labels, 1);
    }

    pub fn add(&self, labels: &[(&'static str, &str)], n: u64) {
        self.0.get_or_create(&key(labels)).inc_by(n);
    }

    /// The value for exactly these labels (0 if never set).
    #[cfg(test)]
    pub fn get(&self, labels: &[(&'static str, &str)]) -> u64 {
        self.0.get(&key(labels)).map_or(0, |c| c.get())
    }
}

/// Latency buckets, in seconds: from a cached manifest (well under a
/// millisecond) to a multi-gigabyte layer over a slow link.
const BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

#[derive(Clone, Copy)]
pub struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(BUCKETS)
    }
}

/// A family of latency histograms keyed by label values.
#[derive(Clone)]
pub struct Latency(PromFamily<Labels, Histogram, Buckets>);

impl Latency {
    fn new() -> Self {
        Latency(PromFamily::new_with_constructor(Buckets))
    }

    /// The histogram for these labels, to observe into later.
    pub fn with(&self, labels: &[(&'static str, &str)]) -> Histogram {
        self.0.get_or_create(&key(labels)).clone()
    }

    pub fn observe_since(&self, labels: &[(&'static str, &str)], start: Instant) {
        self.with(labels).observe(start.elapsed().as_secs_f64());
    }
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    /// By namespace, kind (manifest, blob, other) and status code.
    pub requests: Family,
    /// Seconds from a request's arrival to its body's last byte handed to
    /// the socket (or the client leaving), by namespace, kind and status
    /// class (2xx..5xx).
    pub request_duration: Latency,
    /// Seconds from a request's arrival to its response's headers.
    pub first_byte: Latency,
    /// Seconds an upstream fetch took, by namespace, kind (manifest, blob)
    /// and result (ok, error, unavailable).
    pub upstream_duration: Latency,
    /// By kind and result: hit, miss, coalesced (joined a fetch under way),
    /// stale (served while every upstream failed).
    pub cache: Family,
    /// Body bytes sent to clients from the cache, and straight from an
    /// upstream (the request that started a fetch).
    pub served_from_cache: Counter,
    pub served_from_upstream: Counter,
    /// Of the bytes from the cache, those sent with sendfile(2).
    pub sent_by_sendfile: Counter,
    /// Of those, bytes of blobs still being fetched (handed out as parts).
    pub sent_in_flight: Counter,
    /// sendfile(2) chunks whose pages were not in the page cache, read
    /// from disk on the disk pool first.
    pub sendfile_disk_reads: Counter,
    /// Failed attempts, by endpoint and reason.
    pub upstream_errors: Family,
    /// Moves to the next endpoint after a failure, by the endpoint left.
    pub fallbacks: Family,
    /// Requests with credentials an endpoint refused (401/403), by endpoint.
    pub credentials_refused: Family,
    /// Bytes fetched from upstreams into the cache.
    pub upstream_bytes: Family,
    /// Blob transfers resumed with Range after a connection broke, by the
    /// endpoint that took over.
    pub resumes: Family,
    /// Blobs fetched into the cache, by where they came from (`peer`,
    /// `upstream`): the upstream count over the blobs pulled is the
    /// cluster's amplification.
    pub blob_fetches: Family,
    /// Cluster mode: blob bytes received from peers and sent to them.
    pub peer_bytes: Family,
    /// Cluster mode: requests on the peer port, by role and status.
    pub peer_requests: Family,
    /// Blobs fetched over several connections in ranges, by the endpoint
    /// of the first answer.
    pub parallel: Family,
    /// Blobs evicted by collection.
    pub evictions: Family,
    /// Cache files found damaged and moved to quarantine/.
    pub quarantined: Family,
    /// Blob bytes re-verified in the background.
    pub verified_bytes: Family,
    /// Blob bytes in the cache (from the last scan, plus commits since).
    pub cache_bytes: Gauge<u64, AtomicU64>,
    pub cache_blobs: Gauge<u64, AtomicU64>,
    /// Set when scraped, from [`Scrape`].
    inflight: Gauge<u64, AtomicU64>,
    slots_in_use: Gauge<u64, AtomicU64>,
    slots_limit: Gauge<u64, AtomicU64>,
    peers: PromFamily<Labels, Gauge<u64, AtomicU64>>,
    max_size: Gauge<u64, AtomicU64>,
    min_free: Gauge<u64, AtomicU64>,
    fs_free: Gauge<u64, AtomicU64>,
    fs_size: Gauge<u64, AtomicU64>,
}

/// What the gauges read at scrape time say.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scrape {
    /// Blob fetches under way.
    pub in_flight: usize,
    /// Upstream fetch slots in use, and their number.
    pub slots: (usize, usize),
    /// Cluster mode: the other members, answering and failing.
    pub peers: Option<(usize, usize)>,
    /// `[cache] max_size` (0: none) and the `min_free` floor, in bytes.
    pub max_size: u64,
    pub min_free: u64,
    /// The cache filesystem's free (for unprivileged users) and total bytes.
    pub fs: Option<(u64, u64)>,
    /// The cache's running total of stored bytes, once counted.
    pub stored: Option<u64>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn counter(r: &mut Registry, name: &str, help: &str) -> Family {
    let f = Family::new();
    r.register(name, help, f.0.clone());
    f
}

fn latency(r: &mut Registry, name: &str, help: &str) -> Latency {
    let f = Latency::new();
    r.register_with_unit(name, help, Unit::Seconds, f.0.clone());
    f
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> Gauge<u64, AtomicU64> {
    let g = Gauge::<u64, AtomicU64>::default();
    r.register(name, help, g.clone());
    g
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::default();
        let r = &mut r;
        let requests = counter(
            r,
            "nodemirror_requests",
            "Pull API requests by registry namespace, kind and status",
        );
        let request_duration = latency(
            r,
            "nodemirror_request_duration",
            "Seconds from a request's arrival to its body's last byte sent (or the client leaving), \
             by namespace, kind and status class",
        );
        let first_byte = latency(
            r,
            "nodemirror_request_first_byte",
            "Seconds from a request's arrival to its response's headers, by namespace, kind and \
             status class",
        );
        let upstream_duration = latency(
            r,
            "nodemirror_upstream_fetch_duration",
            "Seconds an upstream fetch took (a manifest, or a blob until verified and cached), by \
             namespace, kind and result",
        );
        let cache = counter(
            r,
            "nodemirror_cache_requests",
            "Cache lookups by kind and result (hit, miss, coalesced, stale)",
        );
        let upstream_errors = counter(
            r,
            "nodemirror_upstream_errors",
            "Failed upstream attempts by endpoint and reason",
        );
        let fallbacks = counter(
            r,
            "nodemirror_upstream_fallbacks",
            "Fallbacks to the next endpoint, by the endpoint that failed",
        );
        let credentials_refused = counter(
            r,
            "nodemirror_upstream_credentials_refused",
            "Requests whose credentials an upstream endpoint refused (401/403), by endpoint",
        );
        let upstream_bytes = counter(
            r,
            "nodemirror_upstream_fetched_bytes",
            "Blob bytes fetched from upstreams into the cache",
        );
        let resumes = counter(
            r,
            "nodemirror_upstream_resumes",
            "Blob transfers resumed with Range after a connection broke or crawled, by the \
             endpoint that took over",
        );
        let parallel = counter(
            r,
            "nodemirror_upstream_parallel_fetches",
            "Blobs fetched over several connections in ranges, by the endpoint of the first answer",
        );
        let blob_fetches = counter(
            r,
            "nodemirror_blob_fetches",
            "Blobs fetched into the cache, by source (peer, upstream)",
        );
        let peer_bytes = counter(
            r,
            "nodemirror_peer_bytes",
            "Cluster mode: blob bytes received from peers and sent to them, by direction",
        );
        let peer_requests = counter(
            r,
            "nodemirror_peer_requests",
            "Cluster mode: requests answered on the peer port, by role and status",
        );
        let evictions = counter(
            r,
            "nodemirror_cache_evictions",
            "Blobs evicted from the cache",
        );
        let quarantined = counter(
            r,
            "nodemirror_cache_quarantined",
            "Cache files found damaged (wrong size or digest) and moved to quarantine",
        );
        let verified_bytes = counter(
            r,
            "nodemirror_cache_verified_bytes",
            "Blob bytes re-verified by the background check",
        );
        let served = counter(
            r,
            "nodemirror_served_bytes",
            "Body bytes sent to clients by source",
        );
        let sent_by_sendfile = Counter::default();
        r.register(
            "nodemirror_sendfile_bytes",
            "Of the bytes from the cache, those sent with sendfile(2), without a copy through the \
             daemon",
            sent_by_sendfile.clone(),
        );
        let sent_in_flight = Counter::default();
        r.register(
            "nodemirror_sendfile_in_flight_bytes",
            "Of those, bytes of blobs still being fetched (clients following a download)",
            sent_in_flight.clone(),
        );
        let sendfile_disk_reads = Counter::default();
        r.register(
            "nodemirror_sendfile_disk_reads",
            "Chunks of cached blobs that were not in the page cache, read from disk on the disk \
             pool before sendfile(2) sent them (never on a request worker)",
            sendfile_disk_reads.clone(),
        );
        let cache_bytes = gauge(
            r,
            "nodemirror_cache_size_bytes",
            "Bytes in the cache: blobs, manifests and tags",
        );
        let cache_blobs = gauge(r, "nodemirror_cache_blobs", "Blobs in the cache");
        let inflight = gauge(r, "nodemirror_inflight_fetches", "Blob fetches under way");
        let slots_in_use = gauge(
            r,
            "nodemirror_fetch_slots_in_use",
            "Upstream fetch slots in use (all in use: new downloads wait, then get 503)",
        );
        let slots_limit = gauge(
            r,
            "nodemirror_fetch_slots",
            "Upstream fetch slots ([upstream] max_fetches)",
        );
        let peers = PromFamily::<Labels, Gauge<u64, AtomicU64>>::default();
        r.register(
            "nodemirror_cluster_peers",
            "Cluster mode: the other members, by state (up, down: backing off after failures)",
            peers.clone(),
        );
        let max_size = gauge(
            r,
            "nodemirror_cache_max_size_bytes",
            "[cache] max_size (0: none)",
        );
        let min_free = gauge(
            r,
            "nodemirror_cache_min_free_bytes",
            "[cache] min_free: free bytes the cache leaves on its filesystem",
        );
        let fs_free = gauge(
            r,
            "nodemirror_cache_filesystem_free_bytes",
            "Free bytes on the cache's filesystem (for unprivileged users)",
        );
        let fs_size = gauge(
            r,
            "nodemirror_cache_filesystem_size_bytes",
            "Size of the cache's filesystem",
        );
        // Series whose labels are known start at zero, so that rate() and
        // the shipped alerts see them before the first event.
        for kind in ["manifest", "tag", "blob"] {
            for result in ["hit", "miss"] {
                cache.add(&[("kind", kind), ("result", result)], 0);
            }
        }
        for source in ["upstream", "peer"] {
            blob_fetches.add(&[("source", source)], 0);
        }
        for direction in ["received", "sent"] {
            peer_bytes.add(&[("direction", direction)], 0);
        }
        for f in [&upstream_bytes, &evictions, &quarantined, &verified_bytes] {
            f.add(&[], 0);
        }
        let source = |s: &str| served.0.get_or_create(&key(&[("source", s)])).clone();
        let (served_from_cache, served_from_upstream) = (source("cache"), source("upstream"));
        Metrics {
            registry: std::mem::take(r),
            requests,
            request_duration,
            first_byte,
            upstream_duration,
            cache,
            served_from_cache,
            served_from_upstream,
            sent_by_sendfile,
            sent_in_flight,
            sendfile_disk_reads,
            upstream_errors,
            fallbacks,
            credentials_refused,
            upstream_bytes,
            resumes,
            blob_fetches,
            peer_bytes,
            peer_requests,
            parallel,
            evictions,
            quarantined,
            verified_bytes,
            cache_bytes,
            cache_blobs,
            inflight,
            slots_in_use,
            slots_limit,
            peers,
            max_size,
            min_free,
            fs_free,
            fs_size,
        }
    }

    /// The exposition text, with the gauges `now` sets.
    pub fn render(&self, now: &Scrape) -> String {
        self.inflight.set(now.in_flight as u64);
        self.slots_in_use.set(now.slots.0 as u64);
        self.slots_limit.set(now.slots.1 as u64);
        if let Some((up, down)) = now.peers {
            self.peers
                .get_or_create(&key(&[("state", "up")]))
                .set(up as u64);
            self.peers
                .get_or_create(&key(&[("state", "down")]))
                .set(down as u64);
        }
        if let Some(stored) = now.stored {
            self.cache_bytes.set(stored);
        }
        self.max_size.set(now.max_size);
        self.min_free.set(now.min_free);
        if let Some((free, size)) = now.fs {
            self.fs_free.set(free);
            self.fs_size.set(size);
        }
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }

    /// Sets the cache gauges from a scan.
    pub fn cache_scanned(&self, blobs: u64, bytes: u64) {
        self.cache_blobs.set(blobs);
        self.cache_bytes.set(bytes);
    }

    pub fn blob_committed(&self, bytes: u64) {
        self.cache_blobs.inc();
        self.cache_bytes.inc_by(bytes);
    }
}

/// `2xx`, `3xx`, `4xx` or `5xx`.
pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The namespace as a label: configured registries (hosts.d, the default
/// namespace) by name, every other as `other`, so that no caller can grow
/// the metrics without bound.
pub fn ns_label<'a>(snap: &crate::snapshot::Snapshot, ns: &'a str) -> &'a str {
    if snap.upstream.configures(ns) || snap.settings.default_namespace.as_str() == ns {
        ns
    } else {
        "other"
    }
}

/// Observes into `hist` the seconds since `start` once the response body
/// has gone out: when the body is done and the socket writer has let go of
/// its last frame (or the client left).
pub fn timed(body: ResponseBody, start: Instant, hist: Histogram) -> ResponseBody {
    http_body_util::BodyExt::boxed(Timed {
        inner: body,
        done: Arc::new(Done { start, hist }),
    })
}

struct Done {
    start: Instant,
    hist: Histogram,
}

impl Drop for Done {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

/// A frame's bytes, unchanged (the sendfile writer still knows a mapped
/// slice by its address), holding the request's [`Done`].
struct Held {
    bytes: Bytes,
    _done: Arc<Done>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

struct Timed {
    inner: ResponseBody,
    done: Arc<Done>,
}

impl Body for Timed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let done = &this.done;
                Poll::Ready(Some(Ok(frame.map_data(|b| {
                    if b.is_empty() {
                        b
                    } else {
                        Bytes::from_owner(Held {
                            bytes: b,
                            _done: done.clone(),
                        })
                    }
                }))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::new();
        let ok = [("ns", "docker.io"), ("kind", "blob"), ("status", "200")];
        m.requests.inc(&ok);
        m.requests.add(&ok, 2);
        m.requests
            .inc(&[("ns", "we\"ird"), ("kind", "blob"), ("status", "200")]);
        m.served_from_cache.inc_by(5);
        let labels = [
            ("ns", "docker.io"),
            ("kind", "blob"),
            ("status_class", "2xx"),
        ];
        m.request_duration.with(&labels).observe(0.003);
        let out = m.render(&Scrape {
            in_flight: 7,
            ..Scrape::default()
        });
        for line in [
            "# TYPE nodemirror_requests_total counter",
            "nodemirror_requests_total{ns=\"docker.io\",kind=\"blob\",status=\"200\"} 3",
            "nodemirror_requests_total{ns=\"we\\\"ird\",kind=\"blob\",status=\"200\"} 1",
            "nodemirror_served_bytes_total{source=\"cache\"} 5",
            "nodemirror_served_bytes_total{source=\"upstream\"} 0",
            "# TYPE nodemirror_request_duration_seconds histogram",
            "nodemirror_request_duration_seconds_bucket{ns=\"docker.io\",kind=\"blob\",status_class=\"2xx\",le=\"0.0025\"} 0",
            "nodemirror_request_duration_seconds_bucket{ns=\"docker.io\",kind=\"blob\",status_class=\"2xx\",le=\"0.005\"} 1",
            "nodemirror_request_duration_seconds_count{ns=\"docker.io\",kind=\"blob\",status_class=\"2xx\"} 1",
            "nodemirror_inflight_fetches 7",
        ] {
            assert!(out.lines().any(|l| l == line), "{line}\nin\n{out}");
        }
        assert_eq!(m.requests.get(&ok), 3);
    }
}
