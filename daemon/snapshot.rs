//! The configuration in force: one immutable [`Snapshot`] of everything a
//! reload may change (daemon settings, upstream routes, credentials,
//! timeouts, back-off, cache limits), published with a single swap.
//!
//! A request loads the snapshot once at its start and uses it to its end,
//! so it never sees new routes with old timeouts; a reload builds a whole
//! new snapshot and replaces the old one only when all of it is valid.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{ConfigErrors, Settings};
use crate::upstream::{self, Upstream};

/// Everything a reload may change, as one value.
pub struct Snapshot {
    pub settings: Settings,
    pub upstream: upstream::Config,
}

impl Snapshot {
    /// Reads hosts.d and the credentials that `settings` name.
    pub fn build(
        upstream: &Upstream,
        settings: Settings,
        generation: u64,
    ) -> Result<Snapshot, ConfigErrors> {
        let config = upstream
            .configure(
                &settings.hosts_dir,
                settings.auth_file.as_deref(),
                &settings.upstream,
                generation,
            )
            .map_err(ConfigErrors)?;
        Ok(Snapshot {
            settings,
            upstream: config,
        })
    }
}

/// The snapshot in force.
pub struct Live {
    current: ArcSwap<Snapshot>,
    generation: AtomicU64,
}

impl Live {
    pub fn new(first: Snapshot) -> Live {
        Live {
            current: ArcSwap::from_pointee(first),
            generation: AtomicU64::new(0),
        }
    }

    /// The snapshot in force now; hold it for the whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// A generation number for the next snapshot.
    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Puts `next` in force: requests that start from now on see it. The
    /// snapshot it replaces comes back.
    pub fn publish(&self, next: Snapshot) -> Arc<Snapshot> {
        self.current.swap(Arc::new(next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_held_snapshot_stays_whole_across_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Upstream::new();
        let mut settings = Settings::defaults();
        settings.hosts_dir = dir.path().to_path_buf();
        settings.auth_file = None;
        let live = Live::new(Snapshot::build(&upstream, settings.clone(), 0).unwrap());
        let held = live.load();

        settings.upstream.first_byte_timeout = Duration::from_secs(99);
        settings.cache.tag_ttl = Duration::from_secs(7);
        let next = Snapshot::build(&upstream, settings, live.next_generation()).unwrap();
        live.publish(next);

        // The request that started before the reload sees the old values
        // together; a new one sees the new values together.
        assert_eq!(
            held.upstream.settings.first_byte_timeout,
            Duration::from_secs(15)
        );
        assert_eq!(held.settings.cache.tag_ttl, Duration::from_secs(60));
        let now = live.load();
        assert_eq!(
            now.upstream.settings.first_byte_timeout,
            Duration::from_secs(99)
        );
        assert_eq!(now.settings.cache.tag_ttl, Duration::from_secs(7));
    }
}
