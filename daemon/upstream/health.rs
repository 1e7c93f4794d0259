//! Which endpoints failed recently. A failing endpoint is skipped for a
//! back-off period that doubles with each consecutive failure; it is still
//! tried as a last resort when every endpoint of a chain is backing off, so
//! a recovered upstream is noticed without waiting out the period.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::config::UpstreamSettings;

/// Failure state by endpoint; the back-off periods come from the
/// configuration in force when a failure is recorded.
#[derive(Default)]
pub struct Health {
    state: Mutex<HashMap<String, State>>,
    /// Endpoints that answered 429: until when, and their error body.
    throttled: Mutex<HashMap<String, (Instant, Option<Bytes>)>>,
}

struct State {
    failures: u32,
    until: Instant,
}

/// Endpoints tracked before those whose wait is over are forgotten:
/// registries named by requests alone are unbounded in number.
const TRACKED: usize = 1024;

/// `now + wait`, or far ahead when that cannot be represented.
fn after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(366 * 24 * 3600))
}

impl Health {
    /// True while `endpoint` should be skipped.
    pub fn backing_off(&self, endpoint: &str) -> bool {
        self.state
            .lock()
            .get(endpoint)
            .is_some_and(|s| s.until > Instant::now())
    }

    /// How much longer `endpoint` is skipped, if it is.
    pub fn backing_off_for(&self, endpoint: &str) -> Option<Duration> {
        let until = self.state.lock().get(endpoint)?.until;
        until.checked_duration_since(Instant::now())
    }

    /// Records a failure; returns how long the endpoint is now skipped.
    pub fn failure(&self, endpoint: &str, settings: &UpstreamSettings) -> Duration {
        let mut state = self.state.lock();
        if state.len() >= TRACKED && !state.contains_key(endpoint) {
            let now = Instant::now();
            state.retain(|_, s| s.until > now);
        }
        let s = state.entry(endpoint.to_string()).or_insert(State {
            failures: 0,
            until: Instant::now(),
        });
        s.failures = s.failures.saturating_add(1);
        let factor = 1u32 << (s.failures - 1).min(16);
        let wait = settings
            .backoff
            .saturating_mul(factor)
            .min(settings.backoff_max);
        s.until = after(wait);
        wait
    }

    /// Records a 429: the endpoint is not asked again for `wait`.
    pub fn throttle(&self, endpoint: &str, wait: Duration, body: Option<Bytes>) -> Duration {
        let mut throttled = self.throttled.lock();
        if throttled.len() >= TRACKED && !throttled.contains_key(endpoint) {
            let now = Instant::now();
            throttled.retain(|_, (until, _)| *until > now);
        }
        throttled.insert(endpoint.to_string(), (after(wait), body));
        wait
    }

    /// How long `endpoint` is still throttled, and its 429 body.
    pub fn throttled(&self, endpoint: &str) -> Option<(Duration, Option<Bytes>)> {
        let mut throttled = self.throttled.lock();
        let (until, body) = throttled.get(endpoint)?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            throttled.remove(endpoint);
            return None;
        }
        // Round up: a client told 0 s would ask again at once.
        Some((left.max(Duration::from_secs(1)), body.clone()))
    }

    pub fn success(&self, endpoint: &str) {
        self.state.lock().remove(endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(base: u64, max: u64) -> UpstreamSettings {
        UpstreamSettings {
            backoff: Duration::from_secs(base),
            backoff_max: Duration::from_secs(max),
            ..UpstreamSettings::default()
        }
    }

    #[test]
    fn backoff_doubles_up_to_max_and_success_clears() {
        let h = Health::default();
        let s = limits(1, 3);
        assert!(!h.backing_off("a"));
        assert_eq!(h.failure("a", &s), Duration::from_secs(1));
        assert_eq!(h.failure("a", &s), Duration::from_secs(2));
        assert_eq!(h.failure("a", &s), Duration::from_secs(3));
        assert!(h.backing_off("a"));
        assert!(!h.backing_off("b"));
        h.success("a");
        assert!(!h.backing_off("a"));
    }

    #[test]
    fn throttle_lasts_its_retry_after() {
        let h = Health::default();
        h.throttle("a", Duration::from_millis(50), None);
        assert!(h.throttled("a").is_some());
        assert!(h.throttled("b").is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.throttled("a").is_none());
    }

    #[test]
    fn forgotten_endpoints_keep_the_state_bounded() {
        let h = Health::default();
        let s = limits(0, 0);
        for i in 0..5000 {
            h.failure(&format!("https://r{i}.test/v2"), &s);
            h.throttle(&format!("https://r{i}.test/v2"), Duration::ZERO, None);
        }
        assert!(h.state.lock().len() <= TRACKED);
        assert!(h.throttled.lock().len() <= TRACKED);
        // A huge wait neither panics nor wraps.
        h.throttle("a", Duration::MAX, None);
        assert!(h.throttled("a").is_some());
    }

    #[test]
    fn zero_backoff_never_skips() {
        let h = Health::default();
        h.failure("a", &limits(0, 0));
        assert!(!h.backing_off("a"));
    }
}
