//! `nodemirror containerd install|uninstall`: points containerd at the
//! mirror through `certs.d/<registry>/hosts.toml` (containerd's own format)
//! and makes sure containerd reads that folder (`config_path`).
//!
//! Files are edited with toml_edit, so users' comments and hosts stay; the
//! mirror goes first. Every file touched is recorded with its original
//! bytes: `uninstall` puts back exactly what was there, or, when a file was
//! edited since, removes only what `install` added.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{io_err, read_optional, sha, InstallError, Touched};
use toml_edit::{value, Array, DocumentMut, Item, Table};

/// What `install` should write.
pub struct Install {
    pub certs_dir: PathBuf,
    /// Whether `certs_dir` was given explicitly (else containerd's
    /// configured `config_path` wins).
    pub certs_dir_explicit: bool,
    pub config: PathBuf,
    /// The mirror URL, e.g. `http://127.0.0.1:5780`.
    pub mirror: String,
    /// Registries to point at the mirror; empty means `_default` (all).
    pub registries: Vec<String>,
    /// Where originals are kept for `uninstall`.
    pub state_dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Default)]
struct State {
    mirror: String,
    files: Vec<Touched>,
}

fn state_file(state_dir: &Path) -> PathBuf {
    state_dir.join("containerd-install.json")
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, InstallError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| InstallError::Toml {
            path: path.to_path_buf(),
            message: e.message().trim().to_string(),
        })
}

/// What install did, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    pub changed: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
    /// containerd must be restarted for config.toml changes.
    pub restart_containerd: bool,
    pub certs_dir: PathBuf,
}

const MARK: &str =
    "# Added by `nodemirror containerd install`: pulls try the node-local mirror first.\n";

/// Adds the mirror as the first `[host]` of a hosts.toml text.
pub fn add_mirror(doc: &mut DocumentMut, mirror: &str) -> bool {
    let root = doc.as_table_mut();
    if !root.contains_key("host") {
        let mut t = Table::new();
        t.set_implicit(true);
        root.insert("host", Item::Table(t));
    }
    let Some(hosts) = root.get_mut("host").and_then(Item::as_table_mut) else {
        return false;
    };
    if hosts.contains_key(mirror) {
        return false;
    }
    // Put the mirror before the first existing host table.
    let first = hosts
        .iter()
        .filter_map(|(_, item)| item.as_table().and_then(Table::position))
        .min();
    let mut ours = Table::new();
    let mut caps = Array::new();
    caps.push("pull");
    caps.push("resolve");
    ours.insert("capabilities", value(caps));
    ours.decor_mut().set_prefix(format!("\n{MARK}"));
    if let Some(first) = first {
        shift_positions(doc.as_table_mut(), first);
        ours.set_position(Some(first));
    }
    if let Some(hosts) = doc
        .as_table_mut()
        .get_mut("host")
        .and_then(Item::as_table_mut)
    {
        hosts.insert(mirror, Item::Table(ours));
    }
    true
}

/// Moves every table at or after `from` one place down.
fn shift_positions(table: &mut Table, from: isize) {
    for (_, item) in table.iter_mut() {
        if let Some(t) = item.as_table_mut() {
            if let Some(p) = t.position().filter(|&p| p >= from) {
                t.set_position(Some(p + 1));
            }
            shift_positions(t, from);
        }
    }
}

/// Removes the mirror's `[host]` table; drops `host` if it is left empty.
pub fn remove_mirror(doc: &mut DocumentMut, mirror: &str) -> bool {
    let root = doc.as_table_mut();
    let Some(hosts) = root.get_mut("host").and_then(Item::as_table_mut) else {
        return false;
    };
    let removed = hosts.remove(mirror).is_some();
    if hosts.is_empty() {
        root.remove("host");
    }
    removed
}

/// The CRI registry table of a containerd config, by config version.
fn registry_path(doc: &DocumentMut) -> [&'static str; 3] {
    match doc.get("version").and_then(Item::as_integer) {
        Some(3) => ["plugins", "io.containerd.cri.v1.images", "registry"],
        Some(2) => ["plugins", "io.containerd.grpc.v1.cri", "registry"],
        _ => ["plugins", "cri", "registry"],
    }
}

/// containerd's configured `config_path`, if set and not empty.
pub fn configured_certs_dir(doc: &DocumentMut) -> Option<String> {
    let [a, b, c] = registry_path(doc);
    doc.get(a)?
        .get(b)?
        .get(c)?
        .get("config_path")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(|s| s.split(':').next().unwrap_or(s).to_string())
}

/// Sets `config_path` when missing. Returns whether the document changed.
pub fn ensure_config_path(
    doc: &mut DocumentMut,
    certs_dir: &str,
    path: &Path,
) -> Result<bool, InstallError> {
    let [a, b, c] = registry_path(doc);
    let refuse = |message: String| InstallError::Refused {
        path: path.to_path_buf(),
        message,
    };
    let mut table = doc.as_table_mut();
    for key in [a, b, c] {
        if !table.contains_key(key) {
            let mut t = Table::new();
            t.set_implicit(true);
            table.insert(key, Item::Table(t));
        }
        table = table
            .get_mut(key)
            .and_then(Item::as_table_mut)
            .ok_or_else(|| refuse(format!("`{key}` is not a table")))?;
    }
    if table.contains_key("mirrors") || table.contains_key("configs") {
        return Err(refuse(format!(
            "[{a}.\"{b}\".{c}] uses the deprecated `mirrors`/`configs`, which containerd refuses \
             together with config_path; move them to {certs_dir}/<registry>/hosts.toml first"
        )));
    }
    match table.get("config_path").and_then(Item::as_str) {
        Some(p)
            if p.split(':')
                .any(|d| d.trim_end_matches('/') == certs_dir.trim_end_matches('/')) =>
        {
            Ok(false)
        }
        Some(p) if !p.is_empty() => Err(refuse(format!(
            "config_path is {p:?}; run again with --certs-dir {}",
            p.split(':').next().unwrap_or(p)
        ))),
        _ => {
            table.insert("config_path", value(certs_dir));
            table.set_implicit(false);
            Ok(true)
        }
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<(), InstallError> {
    crate::atomic::write(path, text.as_bytes()).map_err(io_err(path))
}

/// Records a write; the first original of a file is the one kept.
fn record(state: &mut State, path: &Path, original: Option<String>, written: &str) {
    match state.files.iter_mut().find(|f| f.path == path) {
        Some(f) => f.written_sha256 = sha(written),
        None => state.files.push(Touched {
            path: path.to_path_buf(),
            original,
            written_sha256: sha(written),
        }),
    }
}

/// Points containerd at the mirror. Safe to run again: nothing already in
/// place is added twice.
pub fn install(opts: &Install) -> Result<Report, InstallError> {
    let mut state: State = match read_optional(&state_file(&opts.state_dir))? {
        Some(t) => serde_json::from_str(&t).unwrap_or_default(),
        None => State::default(),
    };
    state.mirror = opts.mirror.clone();
    let mut report = Report::default();

    // containerd's config first: it may name the certs folder.
    let config_text = read_optional(&opts.config)?;
    let mut config_doc = match &config_text {
        Some(t) => parse(&opts.config, t)?,
        None => {
            let mut d = DocumentMut::new();
            d.insert("version", value(2));
            d
        }
    };
    let certs_dir = match configured_certs_dir(&config_doc) {
        Some(dir) if !opts.certs_dir_explicit => PathBuf::from(dir),
        _ => opts.certs_dir.clone(),
    };
    let certs_str = certs_dir.to_string_lossy().to_string();
    if ensure_config_path(&mut config_doc, &certs_str, &opts.config)? {
        let text = config_doc.to_string();
        write_atomic(&opts.config, &text)?;
        record(&mut state, &opts.config, config_text, &text);
        report.changed.push(opts.config.clone());
        report.restart_containerd = true;
    } else {
        report.unchanged.push(opts.config.clone());
    }

    let targets: Vec<String> = if opts.registries.is_empty() {
        vec!["_default".into()]
    } else {
        opts.registries.clone()
    };
    for registry in targets {
        let path = certs_dir.join(&registry).join("hosts.toml");
        let before = read_optional(&path)?;
        let mut doc = match &before {
            Some(t) => parse(&path, t)?,
            None => DocumentMut::new(),
        };
        if !add_mirror(&mut doc, &opts.mirror) {
            report.unchanged.push(path);
            continue;
        }
        let text = doc.to_string();
        let text = text.strip_prefix('\n').unwrap_or(&text).to_string();
        write_atomic(&path, &text)?;
        record(&mut state, &path, before, &text);
        report.changed.push(path);
    }

    let json = serde_json::to_string_pretty(&state).map_err(|e| InstallError::Io {
        path: state_file(&opts.state_dir),
        source: io::Error::other(e),
    })?;
    write_atomic(&state_file(&opts.state_dir), &json)?;
    report.certs_dir = certs_dir;
    Ok(report)
}

/// Undoes `install`: files not edited since get their exact original bytes
/// back (or are removed if they did not exist); edited files lose only the
/// mirror entry. Returns (restored exactly, cleaned surgically).
pub fn uninstall(state_dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>), InstallError> {
    let sf = state_file(state_dir);
    let Some(text) = read_optional(&sf)? else {
        return Ok((Vec::new(), Vec::new()));
    };
    let state: State = serde_json::from_str(&text).map_err(|e| InstallError::Toml {
        path: sf.clone(),
        message: e.to_string(),
    })?;
    let (mut exact, mut surgical) = (Vec::new(), Vec::new());
    for f in &state.files {
        let current = read_optional(&f.path)?;
        let untouched = current.as_deref().map(sha) == Some(f.written_sha256.clone());
        if untouched || current.is_none() {
            match &f.original {
                Some(orig) => write_atomic(&f.path, orig)?,
                None => {
                    if current.is_some() {
                        fs::remove_file(&f.path).map_err(io_err(&f.path))?;
                    }
                    // Remove the registry folder install created, if empty.
                    if let Some(dir) = f.path.parent() {
                        let _ = fs::remove_dir(dir);
                    }
                }
            }
            exact.push(f.path.clone());
        } else if let Some(cur) = current {
            let mut doc = parse(&f.path, &cur)?;
            if f.path.file_name().is_some_and(|n| n == "hosts.toml") {
                remove_mirror(&mut doc, &state.mirror);
            }
            // config_path is left in place: other hosts.toml may rely on it.
            write_atomic(&f.path, &doc.to_string())?;
            surgical.push(f.path.clone());
        }
    }
    fs::remove_file(&sf).map_err(io_err(&sf))?;
    Ok((exact, surgical))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_goes_first_and_comments_stay() {
        let text = "# my registry settings\nserver = \"https://registry-1.docker.io\"\n\n# corp mirror\n[host.\"https://corp.example\"]\n  capabilities = [\"pull\"] # only pull\n";
        let mut doc: DocumentMut = text.parse().unwrap();
        assert!(add_mirror(&mut doc, "http://127.0.0.1:5780"));
        assert!(!add_mirror(&mut doc, "http://127.0.0.1:5780"), "idempotent");
        let out = doc.to_string();
        let ours = out.find("[host.\"http://127.0.0.1:5780\"]").unwrap();
        let theirs = out.find("[host.\"https://corp.example\"]").unwrap();
        assert!(ours < theirs, "{out}");
        for kept in [
            "# my registry settings",
            "# corp mirror",
            "# only pull",
            "server = \"https://registry-1.docker.io\"",
        ] {
            assert!(out.contains(kept), "{out}");
        }
        assert!(remove_mirror(&mut doc, "http://127.0.0.1:5780"));
        assert!(!doc.to_string().contains("127.0.0.1:5780"));
    }

    #[test]
    fn config_path_by_version() {
        for (version, table) in [
            (
                "version = 2\n",
                "[plugins.\"io.containerd.grpc.v1.cri\".registry]",
            ),
            (
                "version = 3\n",
                "[plugins.\"io.containerd.cri.v1.images\".registry]",
            ),
        ] {
            let mut doc: DocumentMut = version.parse().unwrap();
            assert!(
                ensure_config_path(&mut doc, "/etc/containerd/certs.d", Path::new("c")).unwrap()
            );
            let out = doc.to_string();
            assert!(out.contains(table), "{out}");
            assert!(
                out.contains("config_path = \"/etc/containerd/certs.d\""),
                "{out}"
            );
            assert!(
                !ensure_config_path(&mut doc, "/etc/containerd/certs.d/", Path::new("c")).unwrap()
            );
        }
        let mut doc: DocumentMut = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"x\"]\n"
            .parse()
            .unwrap();
        assert!(ensure_config_path(&mut doc, "/c", Path::new("c")).is_err());
        let mut doc: DocumentMut = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/other\"\n"
            .parse()
            .unwrap();
        assert_eq!(configured_certs_dir(&doc).as_deref(), Some("/other"));
        assert!(ensure_config_path(&mut doc, "/c", Path::new("c")).is_err());
    }
}
