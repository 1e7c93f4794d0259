//! The cache of Authorization headers that worked, bounded in entries and
//! bytes: requests for many repositories (each with its token) cannot
//! grow it without bound.

use std::collections::HashMap;
use std::time::Instant;

use http::HeaderValue;

use crate::reference::Repository;

pub(super) struct Cached {
    pub(super) header: HeaderValue,
    pub(super) expires: Option<Instant>,
}

/// Authorization headers kept at most, in number and in bytes: requests
/// for many repositories must not grow the cache without bound.
const MAX_CACHED: usize = 1024;
const MAX_CACHED_BYTES: usize = 4 << 20;

/// What a cached Authorization header is good for: one endpoint and
/// repository, under the configuration it was obtained with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The configuration snapshot: credentials may differ in the next.
    pub generation: u64,
    pub endpoint: String,
    /// `None` for registry-wide requests (`_catalog`).
    pub repository: Option<Repository>,
}

#[derive(Default)]
pub(super) struct TokenCache {
    pub(super) entries: HashMap<TokenKey, Cached>,
    pub(super) bytes: usize,
}

impl TokenCache {
    pub(super) fn remove(&mut self, key: &TokenKey) {
        if let Some(c) = self.entries.remove(key) {
            self.bytes -= cost(key, &c);
        }
    }

    /// Keeps `entry`, first dropping expired ones and, while over the
    /// bounds, those that expire soonest.
    pub(super) fn insert(&mut self, key: TokenKey, entry: Cached) {
        self.remove(&key);
        let now = Instant::now();
        let before = self.entries.len();
        self.entries
            .retain(|_, c| c.expires.is_none_or(|t| t > now));
        if self.entries.len() != before {
            self.bytes = self.entries.iter().map(|(k, c)| cost(k, c)).sum();
        }
        let added = cost(&key, &entry);
        while !self.entries.is_empty()
            && (self.entries.len() >= MAX_CACHED || self.bytes + added > MAX_CACHED_BYTES)
        {
            let soonest = self
                .entries
                .iter()
                .min_by_key(|(_, c)| c.expires)
                .map(|(k, _)| k.clone());
            match soonest {
                Some(k) => self.remove(&k),
                None => break,
            }
        }
        self.bytes += added;
        self.entries.insert(key, entry);
    }
}

/// What an entry takes, roughly.
fn cost(key: &TokenKey, c: &Cached) -> usize {
    c.header.len()
        + key.endpoint.len()
        + key.repository.as_ref().map_or(0, |r| r.as_str().len())
        + 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_token_cache_is_bounded_in_entries_and_bytes() {
        let mut cache = TokenCache::default();
        let big = "x".repeat(super::super::MAX_TOKEN_BYTES);
        for i in 0..5000 {
            let key = TokenKey {
                generation: 0,
                endpoint: "https://reg.test/v2".into(),
                repository: Some(format!("repo{i}").parse().unwrap()),
            };
            cache.insert(
                key,
                Cached {
                    header: HeaderValue::try_from(format!("Bearer {big}")).unwrap(),
                    expires: Some(Instant::now() + Duration::from_secs(300)),
                },
            );
        }
        let (n, bytes) = (cache.entries.len(), cache.bytes);
        assert!(n <= MAX_CACHED && bytes <= MAX_CACHED_BYTES, "{n} {bytes}");
        assert!(n > 100, "{n}");
        let sum: usize = cache.entries.iter().map(|(k, c)| cost(k, c)).sum();
        assert_eq!(sum, bytes, "the byte count follows the entries");
    }
}
