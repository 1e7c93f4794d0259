//! Which endpoints failed recently. A failing endpoint is skipped for a
//! back-off period that doubles with each consecutive failure; it is still
//! tried as a last resort when every endpoint of a chain is backing off, so
//! a recovered upstream is noticed without waiting out the period.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Health {
    /// Base and maximum back-off; changed by a reload.
    limits: Mutex<(Duration, Duration)>,
    state: Mutex<HashMap<String, State>>,
}

struct State {
    failures: u32,
    until: Instant,
}

impl Health {
    pub fn new(base: Duration, max: Duration) -> Self {
        Health {
            limits: Mutex::new((base, max)),
            state: Mutex::default(),
        }
    }

    pub fn set_limits(&self, base: Duration, max: Duration) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = (base, max);
    }

    /// True while `endpoint` should be skipped.
    pub fn backing_off(&self, endpoint: &str) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .get(endpoint)
            .is_some_and(|s| s.until > Instant::now())
    }

    pub fn failure(&self, endpoint: &str) -> Duration {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = state.entry(endpoint.to_string()).or_insert(State {
            failures: 0,
            until: Instant::now(),
        });
        s.failures = s.failures.saturating_add(1);
        let factor = 1u32 << (s.failures - 1).min(16);
        let (base, max) = *self.limits.lock().unwrap_or_else(|p| p.into_inner());
        let wait = base.saturating_mul(factor).min(max);
        s.until = Instant::now() + wait;
        wait
    }

    pub fn success(&self, endpoint: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.remove(endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_max_and_success_clears() {
        let h = Health::new(Duration::from_secs(1), Duration::from_secs(3));
        assert!(!h.backing_off("a"));
        assert_eq!(h.failure("a"), Duration::from_secs(1));
        assert_eq!(h.failure("a"), Duration::from_secs(2));
        assert_eq!(h.failure("a"), Duration::from_secs(3));
        assert!(h.backing_off("a"));
        assert!(!h.backing_off("b"));
        h.success("a");
        assert!(!h.backing_off("a"));
    }

    #[test]
    fn zero_backoff_never_skips() {
        let h = Health::new(Duration::ZERO, Duration::ZERO);
        h.failure("a");
        assert!(!h.backing_off("a"));
    }
}
