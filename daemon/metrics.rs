//! Prometheus metrics, served at `/metrics` in the text exposition format.
//!
//! One process-wide registry, like Prometheus client libraries' default:
//! counters are bumped where things happen (server, cache, upstream) and
//! gauges are read when scraped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use parking_lot::Mutex;

type Labels = Vec<(&'static str, String)>;

/// A family of counters keyed by label values.
pub struct Family {
    name: &'static str,
    help: &'static str,
    values: Mutex<BTreeMap<Labels, u64>>,
}

impl Family {
    const fn new(name: &'static str, help: &'static str) -> Self {
        Family {
            name,
            help,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn inc(&self, labels: &[(&'static str, &str)]) {
        self.add(labels, 1);
    }

    pub fn add(&self, labels: &[(&'static str, &str)], n: u64) {
        let key: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        *self.values.lock().entry(key).or_insert(0) += n;
    }

    /// The value for exactly these labels (0 if never set).
    #[cfg(test)]
    pub fn get(&self, labels: &[(&'static str, &str)]) -> u64 {
        let key: Labels = labels.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.values.lock().get(&key).copied().unwrap_or(0)
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} counter", self.name);
        for (labels, v) in self.values.lock().iter() {
            let _ = writeln!(out, "{}{} {v}", self.name, render_labels(labels));
        }
    }
}

fn render_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Every metric the daemon exports.
pub struct Metrics {
    /// By namespace, kind (manifest, blob, other) and status code.
    pub requests: Family,
    /// By kind and result: hit, miss, coalesced (joined a fetch under way),
    /// stale (served while every upstream failed).
    pub cache: Family,
    /// Body bytes sent to clients from the cache, and straight from an
    /// upstream (the request that started a fetch). Atomics: bumped per frame.
    pub served_from_cache: AtomicU64,
    pub served_from_upstream: AtomicU64,
    /// Of the bytes from the cache, those sent with sendfile(2).
    pub sent_by_sendfile: AtomicU64,
    /// Of those, bytes of blobs still being fetched (handed out as parts).
    pub sent_in_flight: AtomicU64,
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
    pub cache_bytes: AtomicU64,
    pub cache_blobs: AtomicU64,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    Metrics {
    requests: Family::new(
        "nodemirror_requests_total",
        "Pull API requests by registry namespace, kind and status.",
    ),
    cache: Family::new(
        "nodemirror_cache_requests_total",
        "Cache lookups by kind and result (hit, miss, coalesced, stale).",
    ),
    served_from_cache: AtomicU64::new(0),
    served_from_upstream: AtomicU64::new(0),
    sent_by_sendfile: AtomicU64::new(0),
    sent_in_flight: AtomicU64::new(0),
    upstream_errors: Family::new(
        "nodemirror_upstream_errors_total",
        "Failed upstream attempts by endpoint and reason.",
    ),
    fallbacks: Family::new(
        "nodemirror_upstream_fallbacks_total",
        "Fallbacks to the next endpoint, by the endpoint that failed.",
    ),
    credentials_refused: Family::new(
        "nodemirror_upstream_credentials_refused_total",
        "Requests whose credentials an upstream endpoint refused (401/403), by endpoint.",
    ),
    upstream_bytes: Family::new(
        "nodemirror_upstream_fetched_bytes_total",
        "Blob bytes fetched from upstreams into the cache.",
    ),
    resumes: Family::new(
        "nodemirror_upstream_resumes_total",
        "Blob transfers resumed with Range after a connection broke or crawled, by the endpoint that took over.",
    ),
    blob_fetches: Family::new(
        "nodemirror_blob_fetches_total",
        "Blobs fetched into the cache, by source (peer, upstream).",
    ),
    peer_bytes: Family::new(
        "nodemirror_peer_bytes_total",
        "Cluster mode: blob bytes received from peers and sent to them, by direction.",
    ),
    peer_requests: Family::new(
        "nodemirror_peer_requests_total",
        "Cluster mode: requests answered on the peer port, by role and status.",
    ),
    parallel: Family::new(
        "nodemirror_upstream_parallel_fetches_total",
        "Blobs fetched over several connections in ranges, by the endpoint of the first answer.",
    ),
    evictions: Family::new(
        "nodemirror_cache_evictions_total",
        "Blobs evicted from the cache.",
    ),
    quarantined: Family::new(
        "nodemirror_cache_quarantined_total",
        "Cache files found damaged (wrong size or digest) and moved to quarantine.",
    ),
    verified_bytes: Family::new(
        "nodemirror_cache_verified_bytes_total",
        "Blob bytes re-verified by the background check.",
    ),
    cache_bytes: AtomicU64::new(0),
    cache_blobs: AtomicU64::new(0),
}
});

impl Metrics {
    /// The exposition text; `in_flight` is read at scrape time.
    pub fn render(&self, in_flight: usize) -> String {
        let mut out = String::new();
        for f in [
            &self.requests,
            &self.cache,
            &self.upstream_errors,
            &self.fallbacks,
            &self.credentials_refused,
            &self.upstream_bytes,
            &self.resumes,
            &self.parallel,
            &self.blob_fetches,
            &self.peer_bytes,
            &self.peer_requests,
            &self.evictions,
            &self.quarantined,
            &self.verified_bytes,
        ] {
            f.render(&mut out);
        }
        let _ = writeln!(
            out,
            "# HELP nodemirror_served_bytes_total Body bytes sent to clients by source.\n\
             # TYPE nodemirror_served_bytes_total counter\n\
             nodemirror_served_bytes_total{{source=\"cache\"}} {}\n\
             nodemirror_served_bytes_total{{source=\"upstream\"}} {}",
            self.served_from_cache.load(Ordering::Relaxed),
            self.served_from_upstream.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP nodemirror_sendfile_bytes_total Of the bytes from the cache, those sent with sendfile(2), without a copy through the daemon.\n\
             # TYPE nodemirror_sendfile_bytes_total counter\n\
             nodemirror_sendfile_bytes_total {}",
            self.sent_by_sendfile.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP nodemirror_sendfile_in_flight_bytes_total Of those, bytes of blobs still being fetched (clients following a download).\n\
             # TYPE nodemirror_sendfile_in_flight_bytes_total counter\n\
             nodemirror_sendfile_in_flight_bytes_total {}",
            self.sent_in_flight.load(Ordering::Relaxed),
        );
        for (name, help, v) in [
            (
                "nodemirror_cache_size_bytes",
                "Bytes in the cache: blobs, manifests and tags.",
                self.cache_bytes.load(Ordering::Relaxed),
            ),
            (
                "nodemirror_cache_blobs",
                "Blobs in the cache.",
                self.cache_blobs.load(Ordering::Relaxed),
            ),
            (
                "nodemirror_inflight_fetches",
                "Blob fetches under way.",
                in_flight as u64,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }

    /// Sets the cache gauges from a scan.
    pub fn cache_scanned(&self, blobs: u64, bytes: u64) {
        self.cache_blobs.store(blobs, Ordering::Relaxed);
        self.cache_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn blob_committed(&self, bytes: u64) {
        self.cache_blobs.fetch_add(1, Ordering::Relaxed);
        self.cache_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let f = Family::new("x_total", "An example.");
        f.inc(&[("ns", "docker.io"), ("kind", "blob")]);
        f.add(&[("ns", "docker.io"), ("kind", "blob")], 2);
        f.inc(&[("ns", "we\"ird"), ("kind", "blob")]);
        let mut out = String::new();
        f.render(&mut out);
        assert_eq!(
            out,
            "# HELP x_total An example.\n# TYPE x_total counter\n\
             x_total{ns=\"docker.io\",kind=\"blob\"} 3\n\
             x_total{ns=\"we\\\"ird\",kind=\"blob\"} 1\n"
        );
        assert_eq!(f.get(&[("ns", "docker.io"), ("kind", "blob")]), 3);
    }
}
