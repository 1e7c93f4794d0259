//! The vocabulary of the OCI distribution API over HTTP that every layer
//! shares: the response body type and its constructors, header names,
//! manifest media types, and [`ServeError`] with its one mapping to status
//! codes and OCI error JSON.
//!
//! This module sits at the bottom: `server`, `mirror`, `cache` and
//! `upstream` may use it; it uses none of them.

pub mod accept;
mod error;
pub mod media;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub use accept::Accept;
pub use error::{Content, ServeError, Verdict};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response body the daemon sends.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// `Docker-Distribution-API-Version: registry/2.0`, on every API answer.
pub const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// The `Content-Length` of a message, if present and a number.
pub fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A body of bytes in hand.
pub fn full(b: Bytes) -> ResponseBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// Any streaming body.
pub fn boxed<B>(body: B) -> ResponseBody
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Send + Sync + 'static,
{
    BoxBody::new(body)
}
