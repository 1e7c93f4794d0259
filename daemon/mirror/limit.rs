//! Caps on upstream fetches under way: in all, and per namespace, so one
//! broken or hostile registry cannot take every slot. Namespaces without
//! a hosts.d folder share one namespace cap between them: anyone may
//! name any number of them, and the map of caps stays as small as
//! hosts.d. A request beyond a
//! cap waits up to `fetch_wait` for a slot, then gets 503 with
//! `Retry-After` (containerd then tries its next host). The caps follow the
//! configuration in force; a fetch keeps the slot it took until it ends.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamSettings;
use crate::oci::ServeError;
use crate::reference::Namespace;
use crate::upstream::Config;

/// A semaphore sized `max`; replaced when the configured size changes.
struct Cap {
    max: usize,
    slots: Arc<Semaphore>,
}

impl Cap {
    fn new(max: usize) -> Cap {
        Cap {
            max,
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    fn sized(&mut self, max: usize) -> Arc<Semaphore> {
        if self.max != max {
            *self = Cap::new(max);
        }
        self.slots.clone()
    }
}

/// The slots of fetches under way.
pub struct Limits {
    global: Mutex<Cap>,
    namespaces: Mutex<HashMap<Group, Cap>>,
}

/// Who shares a namespace cap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Group {
    /// A namespace with a hosts.d folder.
    Configured(Namespace),
    /// Every namespace without one.
    Implicit,
}

/// Held for as long as a fetch runs.
pub struct Slot {
    _namespace: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            global: Mutex::new(Cap::new(UpstreamSettings::default().max_fetches)),
            namespaces: Mutex::default(),
        }
    }
}

impl Limits {
    /// A slot for a fetch from `ns`, waiting up to `fetch_wait`.
    pub async fn acquire(&self, cfg: &Config, ns: &Namespace) -> Result<Slot, ServeError> {
        let s = &cfg.settings;
        let group = if cfg.configures(ns.as_str()) {
            Group::Configured(ns.clone())
        } else {
            Group::Implicit
        };
        let per_ns = self
            .namespaces
            .lock()
            .entry(group)
            .or_insert_with(|| Cap::new(s.max_fetches_per_namespace))
            .sized(s.max_fetches_per_namespace);
        let global = self.global.lock().sized(s.max_fetches);
        // The namespace's slot first: waiters for one busy registry do not
        // sit on slots others could use.
        let take = async {
            let namespace = per_ns.acquire_owned().await.ok()?;
            let global = global.acquire_owned().await.ok()?;
            Some(Slot {
                _namespace: namespace,
                _global: global,
            })
        };
        match tokio::time::timeout(s.fetch_wait, take).await {
            Ok(Some(slot)) => Ok(slot),
            _ => {
                tracing::warn!(%ns, max = s.max_fetches, max_per_namespace = s.max_fetches_per_namespace,
                    "too many upstream fetches under way; answering 503");
                Err(ServeError::Busy {
                    retry_after: s.fetch_wait.max(std::time::Duration::from_secs(1)),
                })
            }
        }
    }

    /// Fetch slots in use, and how many there are.
    pub fn slots(&self) -> (usize, usize) {
        let global = self.global.lock();
        (
            global.max.saturating_sub(global.slots.available_permits()),
            global.max,
        )
    }

    /// Why the daemon is saturated, if it is: no fetch slot is free.
    pub fn saturated(&self) -> Option<String> {
        let global = self.global.lock();
        (global.slots.available_permits() == 0)
            .then(|| format!("all {} upstream fetch slots in use", global.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(hosts: &[&str], s: UpstreamSettings) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        for ns in hosts {
            std::fs::create_dir_all(dir.path().join(ns)).unwrap();
            std::fs::write(
                dir.path().join(ns).join("hosts.toml"),
                "server = \"http://127.0.0.1:9\"\n",
            )
            .unwrap();
        }
        let cfg = crate::upstream::Upstream::new()
            .configure(dir.path(), None, &s, 0)
            .unwrap();
        (dir, cfg)
    }

    #[tokio::test]
    async fn a_busy_namespace_waits_then_is_refused_and_others_go_on() {
        let limits = Limits::default();
        let s = UpstreamSettings {
            max_fetches: 3,
            max_fetches_per_namespace: 2,
            fetch_wait: Duration::from_millis(50),
            ..UpstreamSettings::default()
        };
        let (_dir, cfg) = config(&["a.test", "b.test"], s);
        let (a, b): (Namespace, Namespace) = ("a.test".parse().unwrap(), "b.test".parse().unwrap());
        let _a1 = limits.acquire(&cfg, &a).await.unwrap();
        let a2 = limits.acquire(&cfg, &a).await.unwrap();
        assert!(matches!(
            limits.acquire(&cfg, &a).await,
            Err(ServeError::Busy { .. })
        ));
        let _b1 = limits.acquire(&cfg, &b).await.unwrap();
        assert!(limits.saturated().is_some());
        drop(a2);
        assert!(limits.saturated().is_none());
        assert!(limits.acquire(&cfg, &a).await.is_ok());
    }

    #[tokio::test]
    async fn namespaces_without_a_folder_share_one_cap() {
        let limits = Limits::default();
        let s = UpstreamSettings {
            max_fetches: 100,
            max_fetches_per_namespace: 2,
            fetch_wait: Duration::from_millis(50),
            ..UpstreamSettings::default()
        };
        let (_dir, cfg) = config(&["a.test"], s);
        let ns = |i: usize| -> Namespace { format!("x{i}.test").parse().unwrap() };
        let _one = limits.acquire(&cfg, &ns(1)).await.unwrap();
        let _two = limits.acquire(&cfg, &ns(2)).await.unwrap();
        assert!(matches!(
            limits.acquire(&cfg, &ns(3)).await,
            Err(ServeError::Busy { .. })
        ));
        // A configured namespace has its own.
        let a: Namespace = "a.test".parse().unwrap();
        assert!(limits.acquire(&cfg, &a).await.is_ok());
        assert_eq!(limits.namespaces.lock().len(), 2);
    }
}
