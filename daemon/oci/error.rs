//! Errors a request can end in, by side, and their one mapping to HTTP
//! status and OCI error JSON.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use super::{full, ResponseBody, API_VERSION};
use crate::reference::ParseError;

/// What a request asked the upstreams for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Manifest,
    Blob,
    Tags,
    Referrers,
    Catalog,
}

impl Content {
    /// The OCI error code for "not there".
    fn unknown_code(self) -> &'static str {
        match self {
            Content::Manifest | Content::Referrers => "MANIFEST_UNKNOWN",
            Content::Blob => "BLOB_UNKNOWN",
            Content::Tags | Content::Catalog => "NAME_UNKNOWN",
        }
    }
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Content::Manifest => "manifest",
            Content::Blob => "blob",
            Content::Tags => "tag list",
            Content::Referrers => "referrers list",
            Content::Catalog => "catalog",
        })
    }
}

/// What every endpoint of a chain together said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every endpoint is rate limiting this daemon: the client should
    /// come back after `retry_after`.
    Throttled { retry_after: std::time::Duration },
    /// Every endpoint answered that it does not have the content (or may
    /// not show it): the client should look elsewhere.
    NotFound,
    /// Endpoints failed: down, timing out, erring.
    Failed,
    /// No endpoint may be contacted for this registry (admission policy,
    /// non-public address).
    Refused,
    /// The registry refused the credentials the daemon has for it.
    CredentialsRefused,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ServeError {
    /// The client asked for something malformed.
    #[error("{0}")]
    Invalid(#[from] ParseError),
    /// The client used a method this pull-only mirror does not offer.
    #[error("{0} is not supported: this mirror serves pulls only")]
    MethodNotAllowed(http::Method),
    /// No such route in the distribution API subset served here.
    #[error("unsupported endpoint {0}")]
    UnknownRoute(String),
    /// Every upstream endpoint was tried; `detail` says what each answered
    /// (for the log: clients get a generic message that tells nothing
    /// about the addresses behind the mirror).
    #[error("{}", upstream_message(*what, *verdict))]
    Upstream {
        what: Content,
        verdict: Verdict,
        detail: Arc<str>,
        /// The registry's own error body (JSON), when passed on (429).
        upstream_body: Option<Bytes>,
    },
    /// The request came from this daemon itself: hosts.d routes a
    /// namespace back here.
    #[error(
        "request loop: this request came from this nodemirror; a hosts.d entry points back at it"
    )]
    Loop,
    /// A fetch failed before anything was sent to this client.
    #[error("{0}")]
    Unavailable(String),
    /// Every upstream fetch slot is taken: come back after `retry_after`.
    #[error("too many upstream fetches under way; retry later")]
    Busy { retry_after: std::time::Duration },
    /// A private namespace asked by a client `[server]` does not allow.
    #[error("registry {0} is private: its content is served to allowed local users only (see [server] allowed_uids and allowed_gids)")]
    Private(String),
    /// Cluster mode: a peer asked for what is not shared with peers.
    #[error("not shared with the cluster's peers: {0}")]
    NotShared(String),
    /// Cluster mode: a peer asked as a holder for content this node does
    /// not hold.
    #[error("{0} not held by this node")]
    NotHeld(Content),
    /// A fault of the daemon itself.
    #[error("internal error: {0}")]
    Internal(String),
}

fn upstream_message(what: Content, verdict: Verdict) -> String {
    match verdict {
        Verdict::NotFound => format!("{what} not found in the upstream registry"),
        Verdict::Failed => format!("{what} unavailable: the upstream registry failed"),
        Verdict::Throttled { .. } => {
            format!("{what} unavailable: the upstream registry is rate limiting; retry later")
        }
        Verdict::CredentialsRefused => format!(
            "{what} unavailable: the upstream registry refused the credentials nodemirror has for it \
             (see the daemon's log and its credentials file)"
        ),
        Verdict::Refused => format!(
            "{what} unavailable: this registry may not be contacted (a registry without a hosts.d \
             folder must be allowed and at public addresses)"
        ),
    }
}

impl ServeError {
    /// What the log gets beyond the client's message.
    pub fn detail(&self) -> Option<&str> {
        match self {
            ServeError::Upstream { detail, .. } => Some(detail),
            _ => None,
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> ServeError {
        ServeError::Internal(e.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ServeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            // A quick 404 ends the loop at once and lets the caller move on.
            ServeError::Loop => StatusCode::NOT_FOUND,
            // A quick 404 lets containerd go on to its next host; 503 says
            // the upstreams are unreachable rather than the content absent.
            ServeError::Upstream {
                verdict: Verdict::NotFound,
                ..
            } => StatusCode::NOT_FOUND,
            ServeError::Upstream {
                verdict: Verdict::Throttled { .. },
                ..
            } => StatusCode::TOO_MANY_REQUESTS,
            ServeError::Upstream {
                verdict: Verdict::Refused | Verdict::CredentialsRefused,
                ..
            } => StatusCode::FORBIDDEN,
            ServeError::Upstream {
                verdict: Verdict::Failed,
                ..
            }
            | ServeError::Unavailable(_)
            | ServeError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ServeError::NotShared(_) | ServeError::Private(_) => StatusCode::FORBIDDEN,
            ServeError::NotHeld(_) => StatusCode::NOT_FOUND,
            ServeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OCI / distribution error code.
    pub fn code(&self) -> &'static str {
        match self {
            ServeError::Invalid(ParseError::Name(_) | ParseError::Namespace(_)) => "NAME_INVALID",
            ServeError::Invalid(ParseError::Digest(_)) => "DIGEST_INVALID",
            ServeError::Invalid(ParseError::Tag(_)) => "TAG_INVALID",
            ServeError::MethodNotAllowed(_) | ServeError::UnknownRoute(_) => "UNSUPPORTED",
            ServeError::Loop => "NAME_UNKNOWN",
            ServeError::Upstream {
                what,
                verdict: Verdict::NotFound,
                ..
            } => what.unknown_code(),
            ServeError::Upstream {
                verdict: Verdict::Throttled { .. },
                ..
            } => "TOOMANYREQUESTS",
            ServeError::Upstream {
                verdict: Verdict::Refused | Verdict::CredentialsRefused,
                ..
            } => "DENIED",
            ServeError::Upstream { .. } | ServeError::Unavailable(_) | ServeError::Busy { .. } => {
                "UNAVAILABLE"
            }
            ServeError::NotShared(_) | ServeError::Private(_) => "DENIED",
            ServeError::NotHeld(what) => what.unknown_code(),
            ServeError::Internal(_) => "UNKNOWN",
        }
    }

    /// The response: OCI error JSON, or headers only for HEAD.
    pub fn into_response(self, head: bool) -> Response<ResponseBody> {
        let status = self.status();
        let body = match &self {
            ServeError::Upstream {
                upstream_body: Some(b),
                ..
            } => b.clone(),
            _ => Bytes::from(
                serde_json::json!({
                    "errors": [{"code": self.code(), "message": self.to_string()}]
                })
                .to_string(),
            ),
        };
        let mut builder = Response::builder()
            .status(status)
            .header(API_VERSION.0, API_VERSION.1)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len());
        match &self {
            ServeError::MethodNotAllowed(_) => builder = builder.header(ALLOW, "GET, HEAD"),
            ServeError::Upstream {
                verdict: Verdict::Throttled { retry_after },
                ..
            }
            | ServeError::Busy { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                builder = builder.header(RETRY_AFTER, secs.max(1));
            }
            _ => {}
        }
        let body = if head { Bytes::new() } else { body };
        builder
            .body(full(body))
            .unwrap_or_else(|_| Response::new(full(Bytes::new())))
    }
}
