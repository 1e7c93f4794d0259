//! The list and referrers APIs, passed through: `tags/list` (with `n` and
//! `last`), `referrers/<digest>` (OCI 1.1, with `artifactType`) and
//! `_catalog`. They fall back across endpoints and authenticate like
//! manifests; the body is bounded, must be JSON, and is not cached. A
//! `Link` to the next page is rewritten to point back at the mirror, on
//! the path the client used.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, LINK};
use http::{HeaderValue, Method, Response, StatusCode};

use super::{internal, Mirror, Pull};
use crate::oci::{full, media, Content, ResponseBody, ServeError, API_VERSION};
use crate::reference::{Digest, Repository};
use crate::upstream::{self, AttemptError, UpstreamRequest};

/// Largest list answer accepted.
const MAX_LIST_BYTES: usize = 4 << 20;

/// Which list.
pub enum List {
    Tags(Repository),
    Referrers(Repository, Digest),
    Catalog,
}

/// A list as an endpoint answered it.
struct Answer {
    content_type: HeaderValue,
    body: Bytes,
    /// The upstream's next page: its query string.
    next: Option<String>,
    /// `OCI-Filters-Applied` of a referrers answer.
    filters: Option<HeaderValue>,
}

impl Mirror {
    pub async fn list(
        &self,
        pull: &Pull<'_>,
        list: List,
    ) -> Result<Response<ResponseBody>, ServeError> {
        let client_query: Vec<(String, String)> =
            url::form_urlencoded::parse(pull.query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let pass = |keys: &[&str]| -> Vec<(String, String)> {
            client_query
                .iter()
                .filter(|(k, _)| keys.contains(&k.as_str()))
                .cloned()
                .collect()
        };
        let (what, repository, tail, query, needs_resolve, accept) = match list {
            List::Tags(repo) => (
                Content::Tags,
                Some(repo),
                "tags/list".to_string(),
                pass(&["n", "last"]),
                true,
                "application/json",
            ),
            List::Referrers(repo, d) => (
                Content::Referrers,
                Some(repo),
                format!("referrers/{d}"),
                pass(&["artifactType"]),
                false,
                media::OCI_INDEX,
            ),
            List::Catalog => (
                Content::Catalog,
                None,
                "_catalog".to_string(),
                pass(&["n", "last"]),
                true,
                "application/json",
            ),
        };
        let req = UpstreamRequest {
            method: Method::GET,
            namespace: pull.ns.clone(),
            repository,
            tail,
            query,
            needs_resolve,
            accept: Some(HeaderValue::from_static(accept)),
            range: None,
            peers: None,
        };
        let idle = pull.snap.upstream.settings.idle_timeout;
        let _slot = self.limits.acquire(&pull.snap.upstream, &pull.ns).await?;
        let (answer, _) = self
            .upstream
            .first_success(&pull.snap.upstream, &req, |_, resp| async move {
                let h = resp.headers();
                let content_type = h
                    .get(CONTENT_TYPE)
                    .cloned()
                    .unwrap_or(HeaderValue::from_static("application/json"));
                let next = h
                    .get(LINK)
                    .and_then(|v| v.to_str().ok())
                    .and_then(next_query);
                let filters = h.get("oci-filters-applied").cloned();
                let body =
                    upstream::read_whole(resp.into_body(), MAX_LIST_BYTES, idle, "list body")
                        .await?;
                if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                    return Err(AttemptError::Invalid("list answer is not JSON".into()));
                }
                Ok(Answer {
                    content_type,
                    body,
                    next,
                    filters,
                })
            })
            .await
            .map_err(|exhausted| exhausted.into_error(what))?;
        let mut builder = Response::builder()
            .status(StatusCode::OK)
            .header(API_VERSION.0, API_VERSION.1)
            .header(CONTENT_TYPE, answer.content_type)
            .header(CONTENT_LENGTH, answer.body.len());
        if let Some(next) = answer.next {
            builder = builder.header(LINK, own_link(pull, &client_query, &next));
        }
        if let Some(f) = answer.filters {
            builder = builder.header("oci-filters-applied", f);
        }
        let body = if pull.head { Bytes::new() } else { answer.body };
        builder.body(full(body)).map_err(internal)
    }
}

/// The query string of the `rel="next"` target in a `Link` header.
fn next_query(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let next = params.split(';').any(|p| {
            matches!(
                p.trim().replace(' ', "").as_str(),
                "rel=\"next\"" | "rel=next"
            )
        });
        next.then(|| {
            target
                .split_once('?')
                .map(|(_, q)| q.to_string())
                .unwrap_or_default()
        })
    })
}

/// A `Link` to the next page on this mirror: the path the client asked,
/// with the upstream's paging parameters and the client's `ns`.
fn own_link(pull: &Pull<'_>, client_query: &[(String, String)], upstream_query: &str) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in url::form_urlencoded::parse(upstream_query.as_bytes()) {
        if k != "ns" {
            q.append_pair(&k, &v);
        }
    }
    if let Some((_, ns)) = client_query.iter().find(|(k, _)| k == "ns") {
        q.append_pair("ns", ns);
    }
    format!("<{}?{}>; rel=\"next\"", pull.path, q.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links() {
        assert_eq!(
            next_query(r#"</v2/app/tags/list?last=b&n=2>; rel="next""#).as_deref(),
            Some("last=b&n=2")
        );
        assert_eq!(
            next_query(r#"<https://x/v2/_catalog?n=1&last=a>; rel=next"#).as_deref(),
            Some("n=1&last=a")
        );
        assert_eq!(next_query(r#"</v2/x>; rel="prev""#), None);
    }
}
