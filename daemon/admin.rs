//! Cache maintenance through the running daemon: the daemon owns its
//! cache (it holds the cache's lock), so `nodemirror cache gc` asks it to
//! collect (`POST /cache/gc` on the local listener, allowed users only)
//! instead of unlinking files behind its back. The daemon's collection
//! knows which blobs are being read or written and keeps them.

use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::cache::{Limits, Report};
use crate::metrics::METRICS;
use crate::oci::{full, ResponseBody};
use crate::server::{App, Caller};

/// Collects the cache now with `limits`, off the async threads, and
/// records what it did.
pub async fn collect(app: &App, limits: Limits) -> std::io::Result<Report> {
    let store = app.mirror.store.clone();
    let report = tokio::task::spawn_blocking(move || store.collect(limits))
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
    if report.evicted > 0 || report.skipped_in_use > 0 {
        METRICS.evictions.add(&[], report.evicted_blobs);
        METRICS.cache_scanned(
            report.blobs_before.saturating_sub(report.evicted_blobs),
            report.bytes_after,
        );
        tracing::info!(
            evicted = report.evicted,
            evicted_bytes = report.evicted_bytes,
            skipped_in_use = report.skipped_in_use,
            pinned = report.pinned,
            bytes = report.bytes_after,
            "cache collection"
        );
    }
    Ok(report)
}

/// A JSON answer of the maintenance endpoints.
pub(crate) fn answer(status: StatusCode, body: serde_json::Value) -> Response<ResponseBody> {
    let body = Bytes::from(body.to_string());
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Whether the local client of `req` is one of `[server]`'s allowed users.
pub(crate) async fn caller_allowed(app: &App, req: &Request<Incoming>) -> bool {
    let snap = app.live.load();
    match req.extensions().get::<std::sync::Arc<Caller>>() {
        Some(c) => c.allowed(&snap.settings.server).await,
        None => false,
    }
}

/// `POST /cluster/preheat?ns=REGISTRY&repository=REPO&digest=DIGEST`: makes
/// the digest's owner in the cluster fetch the blob (or find it cached),
/// reading it through without storing it here; `{"owner", "bytes"}`.
pub async fn preheat(app: &App, req: Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::POST {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "POST /cluster/preheat"}),
        );
    }
    if !caller_allowed(app, &req).await {
        return answer(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "only users in [server] allowed_uids/allowed_gids may preheat the cluster"}),
        );
    }
    let Some(cluster) = app.mirror.cluster.clone() else {
        return answer(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not in cluster mode (no [cluster] in the configuration)"}),
        );
    };
    let (mut ns, mut repository, mut digest) = (None, None, None);
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "ns" => ns = v.parse::<crate::reference::Namespace>().ok(),
            "repository" => repository = v.parse::<crate::reference::Repository>().ok(),
            "digest" => digest = v.parse::<crate::reference::Digest>().ok(),
            _ => {}
        }
    }
    let (Some(ns), Some(repository), Some(digest)) = (ns, repository, digest) else {
        return answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "ns, repository and digest are needed, each valid"}),
        );
    };
    if !app.live.load().upstream.shareable(&ns) {
        return answer(
            StatusCode::CONFLICT,
            serde_json::json!({"error": format!("{ns} is not shared with the cluster (credentials or private = true, without share = true)")}),
        );
    }
    match cluster.preheat(&ns, &repository, &digest).await {
        Ok((owner, bytes)) => answer(
            StatusCode::OK,
            serde_json::json!({"owner": owner.to_string(), "bytes": bytes}),
        ),
        Err(e) => answer(StatusCode::BAD_GATEWAY, serde_json::json!({ "error": e })),
    }
}

/// Asks the daemon at `base` to preheat one blob in its cluster: the
/// owner and the bytes, or why not.
pub async fn request_preheat(
    base: &str,
    ns: &str,
    repository: &str,
    digest: &str,
) -> Result<(String, u64), String> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("ns", ns);
    query.append_pair("repository", repository);
    query.append_pair("digest", digest);
    let url = format!(
        "{}/cluster/preheat?{}",
        base.trim_end_matches('/'),
        query.finish()
    );
    let (status, body) = call(Method::POST, &url, Duration::from_secs(3600)).await?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(v["error"]
            .as_str()
            .map_or_else(|| status.to_string(), str::to_string));
    }
    Ok((
        v["owner"].as_str().unwrap_or("?").to_string(),
        v["bytes"].as_u64().unwrap_or(0),
    ))
}

/// `POST /cache/gc[?max_size=BYTES][&min_free=BYTES]`: collects now, with
/// the configured limits unless given; the report as JSON.
pub async fn gc(app: &App, req: Request<Incoming>) -> Response<ResponseBody> {
    if req.method() != Method::POST {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "POST /cache/gc"}),
        );
    }
    let snap = app.live.load();
    if !caller_allowed(app, &req).await {
        return answer(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "only users in [server] allowed_uids/allowed_gids may collect the cache"}),
        );
    }
    let mut max_size = None;
    let mut min_free = None;
    for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        let n = match v.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": format!("{k}={v} is not a number of bytes")}),
                )
            }
        };
        match k.as_ref() {
            "max_size" => max_size = Some(n),
            "min_free" => min_free = Some(n),
            _ => {}
        }
    }
    let (cache, root) = (
        snap.settings.cache.clone(),
        app.mirror.store.root().to_path_buf(),
    );
    let limits = tokio::task::spawn_blocking(move || Limits::from_settings(&cache, &root)).await;
    let mut limits = match limits {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": e.to_string()}),
            )
        }
        Err(e) => {
            return answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": e.to_string()}),
            )
        }
    };
    limits.max_size = max_size.or(limits.max_size);
    limits.min_free = min_free.unwrap_or(limits.min_free);
    match collect(app, limits).await {
        Ok(r) => answer(
            StatusCode::OK,
            serde_json::json!({
                "walked": r.walked,
                "files_before": r.files_before,
                "bytes_before": r.bytes_before,
                "blobs_before": r.blobs_before,
                "evicted": r.evicted,
                "evicted_blobs": r.evicted_blobs,
                "evicted_bytes": r.evicted_bytes,
                "skipped_in_use": r.skipped_in_use,
                "pinned": r.pinned,
                "pinned_bytes": r.pinned_bytes,
                "bytes_after": r.bytes_after,
            }),
        ),
        Err(e) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": e.to_string()}),
        ),
    }
}

/// A plain-HTTP request to a daemon (its local listener): the status and
/// body, within `limit`.
pub async fn call(
    method: Method,
    url: &str,
    limit: Duration,
) -> Result<(StatusCode, Bytes), String> {
    request(method, url, &[], limit)
        .await
        .map(|(status, _, body)| (status, body))
}

/// A plain-HTTP request with these headers: the status, headers and body
/// (at most 1 MiB of it), within `limit`.
pub async fn request(
    method: Method,
    url: &str,
    headers: &[(http::header::HeaderName, String)],
    limit: Duration,
) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let req = req
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let work = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| crate::upstream::error_chain(&e))?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

/// Asks the daemon at `base` (`http://ADDR`) to collect: its report.
pub async fn request_gc(
    base: &str,
    max_size: Option<u64>,
    min_free: Option<u64>,
) -> Result<Report, String> {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    if let Some(m) = max_size {
        query.append_pair("max_size", &m.to_string());
    }
    if let Some(m) = min_free {
        query.append_pair("min_free", &m.to_string());
    }
    let url = format!("{}/cache/gc?{}", base.trim_end_matches('/'), query.finish());
    let (status, body) = call(Method::POST, &url, Duration::from_secs(600))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
    if status != StatusCode::OK {
        return Err(format!(
            "{url}: {status}: {}",
            v["error"].as_str().unwrap_or("")
        ));
    }
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Report {
        walked: v["walked"].as_bool().unwrap_or(true),
        files_before: n("files_before"),
        bytes_before: n("bytes_before"),
        blobs_before: n("blobs_before"),
        evicted: n("evicted"),
        evicted_blobs: n("evicted_blobs"),
        evicted_bytes: n("evicted_bytes"),
        skipped_in_use: n("skipped_in_use"),
        pinned: n("pinned"),
        pinned_bytes: n("pinned_bytes"),
        bytes_after: n("bytes_after"),
    })
}
