//! Domain types for what a pull request names: the upstream [`Namespace`],
//! the [`Repository`], and a manifest [`Reference`] (tag or [`Digest`]).
//!
//! Every value is validated when parsed, so code past the HTTP edge never
//! sees a malformed name, and nothing user-supplied can escape into a path
//! or an upstream URL unchecked.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// Why a name, reference, digest or namespace was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid repository name {0:?}")]
    Name(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error("invalid digest {0:?}: only sha256:<64 lowercase hex> is accepted")]
    Digest(String),
    #[error("invalid registry namespace {0:?}: expected host[:port]")]
    Namespace(String),
}

/// A content digest. Only sha256 is accepted, as containerd and every
/// registry in use produce it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// Finishes a running sha256 hash into a digest.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Digest {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex characters after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl FromStr for Digest {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let hex = s
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or_else(|| ParseError::Digest(s.to_string()))?;
        Ok(Digest {
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A repository name as the distribution spec defines it:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`,
/// at most 255 characters.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Repository(String);

impl Repository {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    // Separators sit between alphanumerics: one '.', one or two '_', or any run of '-'.
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for Repository {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > 255 || !s.split('/').all(valid_path_component) {
            return Err(ParseError::Name(s.to_string()));
        }
        Ok(Repository(s.to_string()))
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a manifest request names: a tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`)
/// or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            Reference::Digest(d) => Some(d),
            Reference::Tag(_) => None,
        }
    }
}

impl FromStr for Reference {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.contains(':') {
            return s.parse().map(Reference::Digest);
        }
        let b = s.as_bytes();
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        let ok = !b.is_empty()
            && b.len() <= 128
            && word(b[0])
            && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
        if ok {
            Ok(Reference::Tag(s.to_string()))
        } else {
            Err(ParseError::Tag(s.to_string()))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

/// The upstream registry a request is for, as containerd names it in
/// `?ns=`: a host name or IP address with an optional port, lowercase.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Namespace(String);

impl Namespace {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The registry URL containerd would use when no hosts.toml names one.
    pub fn default_server(&self) -> String {
        match self.0.as_str() {
            "docker.io" => "https://registry-1.docker.io".to_string(),
            host => format!("https://{host}"),
        }
    }
}

fn valid_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    host.len() <= 253
        && host.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
        })
}

impl FromStr for Namespace {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError::Namespace(s.to_string());
        let lower = s.to_ascii_lowercase();
        let (host, port) = match lower.rfind(':') {
            // A colon inside brackets belongs to an IPv6 address.
            Some(i) if !lower[i..].contains(']') => (&lower[..i], Some(&lower[i + 1..])),
            _ => (lower.as_str(), None),
        };
        if !valid_host(host) {
            return Err(bad());
        }
        if let Some(p) = port {
            match p.parse::<u16>() {
                Ok(n) if n > 0 && !p.starts_with('0') => {}
                _ => return Err(bad()),
            }
        }
        Ok(Namespace(lower))
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An image reference as users write it (`busybox`, `quay.io/a/b:v1`,
/// `reg:5000/x@sha256:...`), normalised as docker and containerd do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub namespace: Namespace,
    pub repository: Repository,
    pub reference: Reference,
}

/// `registry/repository:tag` or `registry/repository@digest`, which parses
/// back as itself.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(t) => write!(f, "{}/{}:{t}", self.namespace, self.repository),
            Reference::Digest(d) => write!(f, "{}/{}@{d}", self.namespace, self.repository),
        }
    }
}

impl FromStr for ImageRef {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        // The first component is a registry if it looks like a host.
        let (host, path) = match rest.split_once('/') {
            Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => (h, p),
            _ => ("docker.io", rest),
        };
        let (path, tag) = match path.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, Some(t)),
            _ => (path, None),
        };
        let namespace: Namespace = host.parse()?;
        let path = if namespace.as_str() == "docker.io" && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => t.parse()?,
            (None, None) => Reference::Tag("latest".into()),
        };
        if matches!(reference, Reference::Digest(_))
            && tag.is_some_and(|t| t.parse::<Reference>().is_err())
        {
            return Err(ParseError::Tag(tag.unwrap_or_default().to_string()));
        }
        Ok(ImageRef {
            namespace,
            repository: path.parse()?,
            reference,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let r = |s: &str| {
            let i: ImageRef = s.parse().unwrap();
            format!("{}/{}:{}", i.namespace, i.repository, i.reference)
        };
        assert_eq!(r("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(r("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(r("quay.io/a/b:v2"), "quay.io/a/b:v2");
        assert_eq!(r("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(r(&format!("reg.io/x:v1@{D}")), format!("reg.io/x:{D}"));
        for s in [
            "busybox",
            "quay.io/a/b:v2",
            "localhost:5000/x",
            &format!("reg.io/x@{D}"),
        ] {
            let i: ImageRef = s.parse().unwrap();
            assert_eq!(i.to_string().parse::<ImageRef>().unwrap(), i, "{s}");
        }
        assert!("UPPER/x".parse::<ImageRef>().is_err());
        assert!("reg.io/x@sha256:bad".parse::<ImageRef>().is_err());
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_matches_known_value() {
        assert_eq!(Digest::of(b"").to_string(), D);
        assert_eq!(D.parse::<Digest>().unwrap(), Digest::of(b""));
    }

    #[test]
    fn digest_rejects_other_forms() {
        for bad in [
            "",
            "sha256:",
            &D.to_uppercase(),
            &D[..70],
            &format!("{D}0"),
            "sha512:abcd",
            "md5:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:../../../../etc/passwd000000000000000000000000000000000000000",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn repository_names() {
        for ok in [
            "library/busybox",
            "a",
            "a/b/c",
            "my-org/my_repo",
            "x__y",
            "a---b",
            "a.b",
            "0/1",
        ] {
            assert!(ok.parse::<Repository>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a//b",
            "A",
            "a..b",
            "a___b",
            "-a",
            "a-",
            "a/../b",
            "..",
            "a b",
            "a%2fb",
            &"a".repeat(256),
        ] {
            assert!(bad.parse::<Repository>().is_err(), "{bad}");
        }
    }

    #[test]
    fn references() {
        assert_eq!("latest".parse(), Ok(Reference::Tag("latest".into())));
        assert_eq!("_v1.2-rc".parse(), Ok(Reference::Tag("_v1.2-rc".into())));
        assert!(matches!(D.parse::<Reference>(), Ok(Reference::Digest(_))));
        for bad in ["", ".x", "-x", "a/b", "a:b", &"t".repeat(129)] {
            assert!(bad.parse::<Reference>().is_err(), "{bad}");
        }
    }

    #[test]
    fn namespaces() {
        for (input, want) in [
            ("docker.io", "docker.io"),
            ("Registry.K8s.io", "registry.k8s.io"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("localhost", "localhost"),
            ("[::1]:5000", "[::1]:5000"),
        ] {
            assert_eq!(input.parse::<Namespace>().unwrap().as_str(), want);
        }
        for bad in [
            "",
            "a..b",
            "-a.io",
            "a.io:",
            "a.io:0",
            "a.io:70000",
            "a.io:05",
            "a/b",
            "_default",
            "a.io/../x",
            "[zz]:1",
            "a b",
        ] {
            assert!(bad.parse::<Namespace>().is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Whatever a client sends, parsing returns, never panics, and what
        /// parses prints back as itself (modulo namespace case).
        #[test]
        fn parsers_are_total_and_round_trip(s in "\\PC{0,300}") {
            if let Ok(d) = s.parse::<Digest>() { proptest::prop_assert_eq!(d.to_string(), s.clone()); }
            if let Ok(r) = s.parse::<Repository>() { proptest::prop_assert_eq!(r.to_string(), s.clone()); }
            if let Ok(r) = s.parse::<Reference>() { proptest::prop_assert_eq!(r.to_string(), s.clone()); }
            if let Ok(n) = s.parse::<Namespace>() { proptest::prop_assert_eq!(n.to_string(), s.to_ascii_lowercase()); }
            let _ = s.parse::<ImageRef>();
        }

        /// Near-valid names: separators and case mixed in.
        #[test]
        fn names_never_escape_their_path(s in "[a-z0-9._/-]{1,80}") {
            if let Ok(r) = s.parse::<Repository>() {
                let name = r.to_string();
                proptest::prop_assert!(!name.split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                proptest::prop_assert!(!name.starts_with('/'));
            }
        }

        #[test]
        fn generated_digests_parse(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let d = Digest::of(&bytes);
            proptest::prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
    }

    #[test]
    fn default_servers() {
        let ns = |s: &str| s.parse::<Namespace>().unwrap().default_server();
        assert_eq!(ns("docker.io"), "https://registry-1.docker.io");
        assert_eq!(ns("quay.io"), "https://quay.io");
    }
}
