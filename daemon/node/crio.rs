//! `nodemirror crio install|uninstall`: one containers-registries.conf.d
//! drop-in (read by CRI-O, podman, skopeo and buildah through
//! containers/image) that gives docker.io and every registry configured in
//! hosts.d a mirror on the node-local daemon, with a path prefix naming
//! the registry: `location = "127.0.0.1:5780/quay.io"` makes those clients
//! ask `/v2/quay.io/<repository>/...`, which nodemirror routes to quay.io.
//!
//! The operator's own files are never touched: the drop-in is a file of its
//! own (`50-nodemirror.conf`). Its `[[registry]]` entries replace entries
//! with the same prefix from files read before it, which is how drop-ins
//! work; registries it does not name keep their configuration.

use std::path::{Path, PathBuf};

use super::{io_err, read_optional, sha, InstallError, Touched};
use crate::reference::Namespace;

/// The drop-in's file name: after distribution defaults (`00-*`), before
/// an operator's late overrides (`99-*`).
pub const FILE_NAME: &str = "50-nodemirror.conf";

/// Where containers/image looks for drop-ins.
pub const DEFAULT_DIR: &str = "/etc/containers/registries.conf.d";

/// What `install` should write.
pub struct Install {
    /// The registries.conf.d folder.
    pub dir: PathBuf,
    /// The mirror URL, e.g. `http://127.0.0.1:5780`.
    pub mirror: String,
    /// Registries to give the mirror (docker.io is always added).
    pub namespaces: Vec<Namespace>,
    /// Where the original is kept for `uninstall`.
    pub state_dir: PathBuf,
}

/// What `install` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    pub path: PathBuf,
    pub changed: bool,
    /// Registries left out, with why.
    pub skipped: Vec<(Namespace, String)>,
}

/// What `uninstall` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Undone {
    NothingInstalled,
    /// The file is back as it was before install (or gone, if it was not there).
    Restored(PathBuf),
    /// The drop-in was edited since install: left as it is.
    LeftEdited(PathBuf),
}

fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("crio-install.json")
}

/// The mirror as containers/image wants a location: `host:port[/path]`,
/// and whether it is plain HTTP.
fn location(mirror: &str) -> Result<(String, bool), String> {
    let url = url::Url::parse(mirror).map_err(|e| format!("mirror URL {mirror:?}: {e}"))?;
    let insecure = match url.scheme() {
        "http" => true,
        "https" => false,
        other => {
            return Err(format!(
                "mirror URL {mirror:?}: scheme {other} (http or https)"
            ))
        }
    };
    let host = url
        .host_str()
        .ok_or_else(|| format!("mirror URL {mirror:?} has no host"))?;
    if host.starts_with('[') {
        return Err(format!(
            "mirror URL {mirror:?}: containers/image (podman 4.3) refuses IPv6-literal mirror \
             locations; use an IPv4 address or a name such as localhost"
        ));
    }
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let path = url.path().trim_end_matches('/');
    Ok((format!("{host}{port}{path}"), insecure))
}

/// The drop-in's text for these registries; registries that containers/image
/// cannot name in a mirror path (IPv6 literals) come back apart.
pub fn render(
    mirror: &str,
    namespaces: &[Namespace],
) -> Result<(String, Vec<(Namespace, String)>), String> {
    let (base, insecure) = location(mirror)?;
    let mut all: Vec<Namespace> = namespaces.to_vec();
    all.push("docker.io".parse().map_err(|e| format!("{e}"))?);
    all.sort();
    all.dedup();
    let mut text = String::from(
        "# Written by `nodemirror crio install`; `nodemirror crio uninstall` removes it.\n\
         # Pulls of these registries try the node-local mirror first, then the registry.\n",
    );
    let mut skipped = Vec::new();
    for ns in all {
        if ns.as_str().starts_with('[') {
            skipped.push((ns, "IPv6 literals cannot be named in a mirror path".into()));
            continue;
        }
        // A mirror path cannot hold ':': host_port stands for host:port,
        // and nodemirror reads it back.
        let prefix = ns.as_str().replace(':', "_");
        text.push_str(&format!(
            "\n[[registry]]\nprefix = \"{ns}\"\nlocation = \"{ns}\"\n\n\
             [[registry.mirror]]\nlocation = \"{base}/{prefix}\"\ninsecure = {insecure}\n"
        ));
    }
    Ok((text, skipped))
}

/// Writes the drop-in. Running it again with the same registries changes
/// nothing; the file's first original (if one was there) is kept for
/// `uninstall`.
pub fn install(opts: &Install) -> Result<Report, InstallError> {
    let path = opts.dir.join(FILE_NAME);
    let (text, skipped) =
        render(&opts.mirror, &opts.namespaces).map_err(|message| InstallError::Refused {
            path: path.clone(),
            message,
        })?;
    let current = read_optional(&path)?;
    let sf = state_file(&opts.state_dir);
    let mut touched: Touched = match read_optional(&sf)? {
        Some(t) => serde_json::from_str(&t).map_err(|e| InstallError::Toml {
            path: sf.clone(),
            message: e.to_string(),
        })?,
        None => Touched {
            path: path.clone(),
            original: current.clone(),
            written_sha256: String::new(),
        },
    };
    let changed = current.as_deref() != Some(text.as_str());
    if changed {
        crate::atomic::write(&path, text.as_bytes()).map_err(io_err(&path))?;
    }
    touched.written_sha256 = sha(&text);
    let json = serde_json::to_string_pretty(&touched).map_err(|e| InstallError::Io {
        path: sf.clone(),
        source: std::io::Error::other(e),
    })?;
    crate::atomic::write(&sf, json.as_bytes()).map_err(io_err(&sf))?;
    Ok(Report {
        path,
        changed,
        skipped,
    })
}

/// Puts back what `install` found: the original bytes, or no file.
pub fn uninstall(state_dir: &Path) -> Result<Undone, InstallError> {
    let sf = state_file(state_dir);
    let Some(state) = read_optional(&sf)? else {
        return Ok(Undone::NothingInstalled);
    };
    let touched: Touched = serde_json::from_str(&state).map_err(|e| InstallError::Toml {
        path: sf.clone(),
        message: e.to_string(),
    })?;
    let current = read_optional(&touched.path)?;
    let untouched = current.as_deref().map(sha) == Some(touched.written_sha256.clone());
    let undone = if untouched || current.is_none() {
        match &touched.original {
            Some(orig) => crate::atomic::write(&touched.path, orig.as_bytes())
                .map_err(io_err(&touched.path))?,
            None if current.is_some() => {
                std::fs::remove_file(&touched.path).map_err(io_err(&touched.path))?
            }
            None => {}
        }
        Undone::Restored(touched.path)
    } else {
        Undone::LeftEdited(touched.path)
    };
    std::fs::remove_file(&sf).map_err(io_err(&sf))?;
    Ok(undone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> Namespace {
        s.parse().unwrap()
    }

    #[test]
    fn one_registry_entry_per_namespace_with_a_prefixed_mirror() {
        let (text, skipped) = render(
            "http://127.0.0.1:5780",
            &[
                ns("quay.io"),
                ns("127.0.0.1:5000"),
                ns("[::1]:5000"),
                ns("docker.io"),
            ],
        )
        .unwrap();
        let doc: toml_edit::DocumentMut = text.parse().unwrap();
        let regs = doc["registry"].as_array_of_tables().unwrap();
        let got: Vec<(String, String, bool)> = regs
            .iter()
            .map(|r| {
                let m = &r["mirror"].as_array_of_tables().unwrap().get(0).unwrap();
                (
                    r["prefix"].as_str().unwrap().to_string(),
                    m["location"].as_str().unwrap().to_string(),
                    m["insecure"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "127.0.0.1:5000".into(),
                    "127.0.0.1:5780/127.0.0.1_5000".into(),
                    true
                ),
                ("docker.io".into(), "127.0.0.1:5780/docker.io".into(), true),
                ("quay.io".into(), "127.0.0.1:5780/quay.io".into(), true),
            ]
        );
        assert_eq!(skipped.len(), 1);
        assert!(render("http://[::1]:5780", &[]).is_err());
        let (text, _) = render("https://mirror.local", &[]).unwrap();
        assert!(text.contains("location = \"mirror.local/docker.io\"\ninsecure = false"));
    }

    #[test]
    fn install_is_idempotent_and_uninstall_restores_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let conf_d = dir.path().join("registries.conf.d");
        std::fs::create_dir_all(&conf_d).unwrap();
        let theirs = conf_d.join("10-theirs.conf");
        std::fs::write(&theirs, "unqualified-search-registries = [\"x.io\"]\n").unwrap();
        // A file of the same name was there: it comes back byte for byte.
        let ours = conf_d.join(FILE_NAME);
        std::fs::write(&ours, "# an old hand-written file\n").unwrap();
        let opts = Install {
            dir: conf_d.clone(),
            mirror: "http://127.0.0.1:5780".into(),
            namespaces: vec![ns("quay.io")],
            state_dir: dir.path().join("state"),
        };
        assert!(install(&opts).unwrap().changed);
        assert!(!install(&opts).unwrap().changed, "idempotent");
        assert!(std::fs::read_to_string(&ours).unwrap().contains("quay.io"));
        assert_eq!(
            uninstall(&opts.state_dir).unwrap(),
            Undone::Restored(ours.clone())
        );
        assert_eq!(
            std::fs::read_to_string(&ours).unwrap(),
            "# an old hand-written file\n"
        );
        assert_eq!(
            uninstall(&opts.state_dir).unwrap(),
            Undone::NothingInstalled
        );
        // Nothing there before: nothing there after.
        std::fs::remove_file(&ours).unwrap();
        install(&opts).unwrap();
        uninstall(&opts.state_dir).unwrap();
        assert!(!ours.exists());
        // An edit since install is left alone.
        install(&opts).unwrap();
        std::fs::write(&ours, "# edited\n").unwrap();
        assert_eq!(
            uninstall(&opts.state_dir).unwrap(),
            Undone::LeftEdited(ours.clone())
        );
        assert_eq!(
            std::fs::read_to_string(&theirs).unwrap(),
            "unqualified-search-registries = [\"x.io\"]\n"
        );
    }
}
