//! Errors a request can end in, by side, and their one mapping to HTTP
//! status and OCI error JSON.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Response, StatusCode};

use super::{full, ResponseBody, API_VERSION};
use crate::reference::ParseError;
use crate::upstream::Exhausted;

#[derive(Debug, thiserror::Error)]
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
    /// Every upstream endpoint was tried (`what` is MANIFEST or BLOB).
    #[error("{what} unavailable from every upstream endpoint: {source}")]
    Upstream {
        what: &'static str,
        source: Arc<Exhausted>,
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
    /// A fault of the daemon itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    pub fn status(&self) -> StatusCode {
        match self {
            ServeError::Invalid(_) => StatusCode::BAD_REQUEST,
            ServeError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ServeError::UnknownRoute(_) => StatusCode::NOT_FOUND,
            // A quick 404 ends the loop at once and lets the caller move on.
            ServeError::Loop => StatusCode::NOT_FOUND,
            // A quick 404 lets containerd go on to its next host; 503 says
            // the upstreams are unreachable rather than the content absent.
            ServeError::Upstream { source, .. } if source.all_not_found() => StatusCode::NOT_FOUND,
            ServeError::Upstream { .. } | ServeError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            ServeError::Upstream { source, what } if source.all_not_found() => match *what {
                "manifest" => "MANIFEST_UNKNOWN",
                _ => "BLOB_UNKNOWN",
            },
            ServeError::Upstream { .. } | ServeError::Unavailable(_) => "UNAVAILABLE",
            ServeError::Internal(_) => "UNKNOWN",
        }
    }

    /// The response: OCI error JSON, or headers only for HEAD.
    pub fn into_response(self, head: bool) -> Response<ResponseBody> {
        let status = self.status();
        let body = serde_json::json!({
            "errors": [{"code": self.code(), "message": self.to_string()}]
        })
        .to_string();
        let mut builder = Response::builder()
            .status(status)
            .header(API_VERSION.0, API_VERSION.1)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len());
        if let ServeError::MethodNotAllowed(_) = self {
            builder = builder.header(ALLOW, "GET, HEAD");
        }
        let body = if head {
            Bytes::new()
        } else {
            Bytes::from(body)
        };
        builder
            .body(full(body))
            .unwrap_or_else(|_| Response::new(full(Bytes::new())))
    }
}
