//! Who may see cached content: decided by where it came from (the
//! namespaces it was verified through, its origins), never by the
//! namespace a request names alone.
//!
//! - Content with at least one public origin is public: every client and
//!   every peer gets it, under any namespace.
//! - Content whose origins are all private (credentials or `private =
//!   true`) goes to local clients only under one of those namespaces
//!   (and `server` lets only allowed users use a private namespace at
//!   all); to peers only under one of them that says `share = true`.
//!
//! Anything else is a miss for the namespace asked: its own upstream must
//! confirm the digest before the cached copy is served under it.

use crate::reference::Namespace;
use crate::upstream::Config;

/// Whether content that came through `origins` may be served for a
/// request naming `ns`, from a peer (`peer`) or a local client.
pub fn visible(cfg: &Config, origins: &[Namespace], ns: &Namespace, peer: bool) -> bool {
    if origins.iter().any(|o| !cfg.is_private(o)) {
        return true;
    }
    origins.contains(ns) && (!peer || cfg.shareable(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hosts: &[(&str, &str)]) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        for (ns, text) in hosts {
            std::fs::create_dir_all(dir.path().join(ns)).unwrap();
            std::fs::write(dir.path().join(ns).join("hosts.toml"), text).unwrap();
        }
        let cfg = crate::upstream::Upstream::new()
            .configure(dir.path(), None, &Default::default(), 0)
            .unwrap();
        (dir, cfg)
    }

    #[test]
    fn origins_decide_what_a_namespace_sees() {
        let (_d, cfg) = config(&[
            (
                "private.test",
                "private = true\nserver = \"http://127.0.0.1:9\"\n",
            ),
            (
                "shared.test",
                "private = true\nshare = true\nserver = \"http://127.0.0.1:9\"\n",
            ),
            ("public.test", "server = \"http://127.0.0.1:9\"\n"),
        ]);
        let n = |s: &str| -> Namespace { s.parse().unwrap() };
        let (private, shared, public) = (n("private.test"), n("shared.test"), n("public.test"));
        let other = n("other.test");
        // Private only: under its own namespace, locally; never to peers.
        let p = [private.clone()];
        assert!(visible(&cfg, &p, &private, false));
        assert!(!visible(&cfg, &p, &public, false));
        assert!(!visible(&cfg, &p, &other, false));
        assert!(!visible(&cfg, &p, &private, true));
        assert!(!visible(&cfg, &p, &public, true));
        // Private with share = true: to peers under that namespace only.
        let s = [shared.clone()];
        assert!(visible(&cfg, &s, &shared, true));
        assert!(!visible(&cfg, &s, &public, true));
        assert!(!visible(&cfg, &s, &private, false));
        // One public origin makes it public, for everyone.
        let both = [private.clone(), other.clone()];
        for ns in [&private, &public, &other, &shared] {
            assert!(visible(&cfg, &both, ns, false));
            assert!(visible(&cfg, &both, ns, true));
        }
        // No origins known (a cache from before they were kept): nobody.
        assert!(!visible(&cfg, &[], &public, false));
    }
}
