//! What a client accepts: the union of every `Accept` header line and
//! every comma-separated item in them, without those whose `q=0`.
//! containers/image (podman, skopeo, CRI-O) sends one line per media type;
//! containerd sends one line listing them all. Both mean the same set.

use http::header::ACCEPT;
use http::{HeaderMap, HeaderValue};

use super::media;

/// The media types a client named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// Lowercase types without parameters, in the client's order.
    types: Vec<String>,
    /// `*/*` or `application/*` was named.
    any: bool,
}

impl Accept {
    /// Reads every `Accept` line of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Accept {
        let mut types = Vec::new();
        let mut any = false;
        for line in headers.get_all(ACCEPT) {
            let Ok(line) = line.to_str() else { continue };
            for item in line.split(',') {
                let mut parts = item.split(';');
                let t = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let refused = parts.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                if t.is_empty() || refused {
                    continue;
                }
                if t == "*/*" || t == "application/*" {
                    any = true;
                } else if !types.contains(&t) {
                    types.push(t);
                }
            }
        }
        Accept { types, any }
    }

    /// A client that named nothing takes whatever comes.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty() && !self.any
    }

    /// Whether the client takes `media_type`.
    pub fn admits(&self, media_type: &str) -> bool {
        let t = media_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.is_empty() || self.any || self.types.contains(&t)
    }

    /// Whether the client named `media_type` itself (not through `*/*`):
    /// how an artifact type beyond the manifest types is admitted.
    pub fn names(&self, media_type: &str) -> bool {
        self.types.contains(&super::media::essence(media_type))
    }

    /// The `Accept` value to send upstream: the client's own list as one
    /// line, or every current manifest type when it named none (a registry
    /// answers a bare request with schema 1).
    pub fn upstream_value(&self) -> HeaderValue {
        if self.is_empty() {
            return media::accept_all();
        }
        let mut items: Vec<&str> = self.types.iter().map(String::as_str).collect();
        if self.any {
            items.push("*/*");
        }
        HeaderValue::try_from(items.join(", ")).unwrap_or_else(|_| media::accept_all())
    }

    /// Which of the current manifest types ([`media::MANIFESTS`]) the
    /// client takes, as a bit set. Clients with the same class get the
    /// same answer for a tag from a registry; [`Class::ALL`] is the answer
    /// containerd and podman get.
    pub fn class(&self) -> Class {
        let mut bits = 0u8;
        for (i, t) in media::MANIFESTS.iter().enumerate() {
            if self.types.iter().any(|x| x == t) {
                bits |= 1 << i;
            }
        }
        if self.is_empty() || self.any {
            bits = Class::ALL.0;
        }
        Class(bits)
    }
}

/// A set of current manifest types a client takes (see [`Accept::class`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Class(u8);

impl Class {
    pub const ALL: Class = Class((1 << media::MANIFESTS.len()) - 1);

    pub fn bits(self) -> u8 {
        self.0
    }

    /// Every class of client there is.
    pub fn every() -> impl Iterator<Item = Class> {
        (1..=Class::ALL.0).map(Class)
    }

    /// Every class whose clients take `media_type` (none for a type
    /// outside [`media::MANIFESTS`]).
    pub fn admitting(media_type: &str) -> Vec<Class> {
        let t = media::essence(media_type);
        match media::MANIFESTS.iter().position(|m| *m == t) {
            Some(i) => (1..=Class::ALL.0)
                .filter(|bits| bits & (1 << i) != 0)
                .map(Class)
                .collect(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(ACCEPT, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn every_line_and_item_counts() {
        // containers/image: one line per type.
        let a = Accept::from_headers(&headers(&[media::OCI_MANIFEST, media::OCI_INDEX]));
        assert!(a.admits(media::OCI_INDEX));
        assert!(a.admits(media::OCI_MANIFEST));
        assert!(!a.admits(media::DOCKER_MANIFEST));
        // containerd: one line, and */*.
        let a = Accept::from_headers(&headers(&[&format!(
            "{}, {}, */*",
            media::DOCKER_MANIFEST,
            media::DOCKER_LIST
        )]));
        assert!(a.admits("application/anything"));
        assert_eq!(a.class(), Class::ALL);
        assert_eq!(
            a.upstream_value(),
            format!("{}, {}, */*", media::DOCKER_MANIFEST, media::DOCKER_LIST)
        );
    }

    #[test]
    fn q_zero_refuses_and_parameters_are_ignored() {
        let a = Accept::from_headers(&headers(&[
            "application/vnd.oci.image.index.v1+json; q=0",
            "Application/Vnd.Oci.Image.Manifest.V1+Json; q=0.5",
        ]));
        assert!(!a.admits(media::OCI_INDEX));
        assert!(a.admits(media::OCI_MANIFEST));
        assert_eq!(a.class().bits(), 0b0010);
    }

    #[test]
    fn no_accept_takes_anything_and_asks_for_current_types() {
        let a = Accept::from_headers(&HeaderMap::new());
        assert!(a.admits(media::DOCKER_SCHEMA1));
        assert_eq!(a.class(), Class::ALL);
        assert_eq!(a.upstream_value(), media::accept_all());
    }
}
