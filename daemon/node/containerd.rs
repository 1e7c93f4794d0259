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
    /// The containerd that reads the files, as the operator said: an IPv6
    /// mirror is written differently for 1.x and 2.x.
    pub version: Option<Version>,
    /// What `containerd --version` said, used when neither the operator
    /// nor the config (version 3 is 2.x's) tells.
    pub detected: Option<Version>,
}

/// A containerd release, major and minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl Version {
    /// `1.6.20~ds1`, `v2.1.4`, `2.1.9+unknown`, `2.2`.
    pub fn parse(text: &str) -> Option<Version> {
        let t = text.trim().trim_start_matches('v');
        let mut parts = t.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Version { major, minor })
    }

    /// The version in `containerd --version`'s output:
    /// `containerd github.com/containerd/containerd/v2 v2.1.4 <commit>`.
    pub fn from_output(text: &str) -> Option<Version> {
        let line = text.lines().next()?;
        line.split_whitespace().skip(2).find_map(Version::parse)
    }

    /// Asks `program --version` (10 s at most).
    pub fn detect(program: &Path) -> Result<Version, String> {
        let out = run_bounded(program, &["--version"], std::time::Duration::from_secs(10))?;
        Version::from_output(&out)
            .ok_or_else(|| format!("{}: no version in {:?}", program.display(), out.trim()))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Runs a program and returns its standard output, killing it after
/// `limit`.
pub(crate) fn run_bounded(
    program: &Path,
    args: &[&str],
    limit: std::time::Duration,
) -> Result<String, String> {
    use std::io::Read as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = (&mut stdout).take(1 << 20).read_to_end(&mut buf);
        buf
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer within {} s",
                    program.display(),
                    limit.as_secs()
                ));
            }
            Err(e) => return Err(format!("{}: {e}", program.display())),
        }
    };
    let out = String::from_utf8_lossy(&reader.join().unwrap_or_default()).into_owned();
    if !status.success() {
        return Err(format!(
            "{} {}: {status}",
            program.display(),
            args.join(" ")
        ));
    }
    Ok(out)
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
    /// What was fixed on the way, one line each.
    pub notes: Vec<String>,
}

const MARK: &str =
    "# Added by `nodemirror containerd install`: pulls try the node-local mirror first.\n";

/// How a `[host]` entry is spelled in hosts.toml.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostForm {
    /// `[host."URL"]`: what containerd 2.x reads (it orders hosts by these
    /// tables and ignores any other spelling).
    Table,
    /// `host."URL".capabilities = [...]` before the first table: what
    /// containerd 1.x reads for an IPv6 mirror, whose `]` its TOML parser
    /// refuses inside a table header.
    Dotted,
}

/// Whether the URL's host is an IPv6 literal (`http://[::1]:5780`).
pub fn is_ipv6_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.starts_with('[')
}

/// The spelling a containerd of `version` reads for `mirror`.
pub fn host_form(mirror: &str, version: Option<Version>) -> Result<HostForm, String> {
    if !is_ipv6_url(mirror) {
        return Ok(HostForm::Table);
    }
    match version {
        Some(v) if v.major < 2 => Ok(HostForm::Dotted),
        Some(_) => Ok(HostForm::Table),
        None => Err(format!(
            "{mirror} is an IPv6 address, which containerd 1.x reads only as a dotted key and \
             2.x only as a [host] table, and which containerd this is could not be told \
             (no `containerd` on PATH); pass --containerd-version, or point containerd at an \
             IPv4 listen address"
        )),
    }
}

/// How `mirror` is spelled in `doc` now, if it is there.
pub fn mirror_form(doc: &DocumentMut, mirror: &str) -> Option<HostForm> {
    let t = doc.get("host")?.as_table_like()?.get(mirror)?;
    match t.as_table() {
        Some(t) if t.is_dotted() => Some(HostForm::Dotted),
        _ => Some(HostForm::Table),
    }
}

fn dotted_line(mirror: &str) -> String {
    let key = toml_edit::Key::new(mirror).display_repr().into_owned();
    format!("host.{key}.capabilities = [\"pull\", \"resolve\"]")
}

/// hosts.toml text with the mirror as its first host, in `form`; `None`
/// when it is already there in that form.
pub fn with_mirror(
    path: &Path,
    before: Option<&str>,
    mirror: &str,
    form: HostForm,
) -> Result<Option<String>, InstallError> {
    let refuse = |message: String| InstallError::Refused {
        path: path.to_path_buf(),
        message,
    };
    let mut text = before.unwrap_or("").to_string();
    let doc = parse(path, &text)?;
    if doc.get("host").is_some_and(|h| !h.is_table()) {
        return Err(refuse(
            "`host` is not a table; write each host as [host.\"URL\"]".into(),
        ));
    }
    match mirror_form(&doc, mirror) {
        Some(f) if f == form => return Ok(None),
        Some(_) => text = without_mirror(path, &text, mirror)?,
        None => {}
    }
    let out = match form {
        HostForm::Table => {
            let mut doc = parse(path, &text)?;
            add_mirror(&mut doc, mirror);
            let out = doc.to_string();
            out.strip_prefix('\n').unwrap_or(&out).to_string()
        }
        HostForm::Dotted => {
            let explicit = doc
                .get("host")
                .and_then(Item::as_table)
                .is_some_and(|t| !t.is_implicit() && !t.is_dotted());
            if explicit {
                return Err(refuse(
                    "has a bare [host] table, beside which containerd 1.x cannot be given an \
                     IPv6 mirror; write its hosts as [host.\"URL\"] tables"
                        .into(),
                ));
            }
            format!("{MARK}{}\n{text}", dotted_line(mirror))
        }
    };
    // What is written must parse, and name the mirror first.
    let check = parse(path, &out)?;
    if mirror_form(&check, mirror) != Some(form) {
        return Err(refuse(format!(
            "could not add {mirror} in a form containerd reads"
        )));
    }
    Ok(Some(out))
}

/// hosts.toml text without the mirror (and the line install put above it).
pub fn without_mirror(path: &Path, text: &str, mirror: &str) -> Result<String, InstallError> {
    let dotted = dotted_line(mirror);
    if text.lines().any(|l| l.trim() == dotted) {
        let mut out = String::with_capacity(text.len());
        let mut lines = text.split_inclusive('\n').peekable();
        while let Some(line) = lines.next() {
            let next_is_ours = lines.peek().is_some_and(|n| n.trim() == dotted);
            if line.trim() == dotted || (line.trim() == MARK.trim() && next_is_ours) {
                continue;
            }
            out.push_str(line);
        }
        return Ok(out);
    }
    let mut doc = parse(path, text)?;
    remove_mirror(&mut doc, mirror);
    Ok(doc.to_string())
}

/// Adds the mirror as the first `[host]` table of a hosts.toml document.
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

/// The transfer service's own `config_path` (containerd 1.7 and 2.x).
const TRANSFER: [&str; 2] = ["plugins", "io.containerd.transfer.v1.local"];

/// containerd's configured `config_path` (the first folder of a list), if
/// set and not empty.
pub fn configured_certs_dir(doc: &DocumentMut) -> Option<String> {
    registry_config_path(doc).map(|s| s.split(':').next().unwrap_or(&s).to_string())
}

/// The CRI registry's `config_path` as written, if set and not empty.
pub fn registry_config_path(doc: &DocumentMut) -> Option<String> {
    let [a, b, c] = registry_path(doc);
    doc.get(a)?
        .get(b)?
        .get(c)?
        .get("config_path")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// Whether a folder has anything in it (a missing folder has not).
fn has_entries(dir: &str) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

fn same_dir(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// A `config_path` that lists several folders, made the one `certs_dir`:
/// containerd 2.1 and later read it as a single folder in transfer-service
/// mode (their default), so a list (2.2's default) silently disables every
/// hosts.toml. `Ok(None)` when it is a single folder already.
fn one_folder(
    current: &str,
    certs_dir: &str,
    refuse: &dyn Fn(String) -> InstallError,
) -> Result<Option<String>, InstallError> {
    let folders: Vec<&str> = current.split(':').filter(|f| !f.is_empty()).collect();
    if folders.len() < 2 {
        return Ok(None);
    }
    if !folders.iter().any(|f| same_dir(f, certs_dir)) {
        return Err(refuse(format!(
            "config_path is {current:?}, which does not name {certs_dir}; run again with \
             --certs-dir {}",
            folders[0]
        )));
    }
    if let Some(full) = folders
        .iter()
        .find(|f| !same_dir(f, certs_dir) && has_entries(f))
    {
        return Err(refuse(format!(
            "config_path is {current:?}: containerd 2.1 and later read it as one folder in \
             transfer-service mode and would ignore every hosts.toml in it; {full} is not \
             empty, so move its contents into {certs_dir} and run again"
        )));
    }
    Ok(Some(format!(
        "config_path was {current:?}, which containerd 2.1 and later read as one folder that \
         does not exist (mirrors silently ignored); it is now {certs_dir:?}"
    )))
}

/// Sets `config_path` when missing, and makes a list of folders the one
/// `certs_dir`. Returns whether the document changed; `notes` says what
/// was fixed.
pub fn ensure_config_path(
    doc: &mut DocumentMut,
    certs_dir: &str,
    path: &Path,
    notes: &mut Vec<String>,
) -> Result<bool, InstallError> {
    let [a, b, c] = registry_path(doc);
    let refuse = |message: String| InstallError::Refused {
        path: path.to_path_buf(),
        message,
    };
    let mut changed = false;
    // The transfer service's own config_path, when it is a list.
    if let Some(t) = doc
        .get_mut(TRANSFER[0])
        .and_then(|p| p.get_mut(TRANSFER[1]))
        .and_then(Item::as_table_like_mut)
    {
        if let Some(current) = t.get("config_path").and_then(Item::as_str) {
            if let Some(note) = one_folder(current, certs_dir, &refuse)? {
                t.insert("config_path", value(certs_dir));
                notes.push(format!("[{}.\"{}\"] {note}", TRANSFER[0], TRANSFER[1]));
                changed = true;
            }
        }
    }
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
    // containerd refuses config_path beside mirrors, or beside configs
    // with tls; the empty tables of `containerd config default` are fine.
    let mirrors = table
        .get("mirrors")
        .and_then(Item::as_table_like)
        .is_some_and(|t| !t.is_empty());
    let tls = table
        .get("configs")
        .and_then(Item::as_table_like)
        .is_some_and(|t| {
            t.iter()
                .any(|(_, c)| c.as_table_like().is_some_and(|c| c.contains_key("tls")))
        });
    if mirrors || tls {
        return Err(refuse(format!(
            "[{a}.\"{b}\".{c}] uses the deprecated `mirrors` or `configs.tls`, which containerd \
             refuses together with config_path; move them to {certs_dir}/<registry>/hosts.toml \
             first"
        )));
    }
    match table.get("config_path").and_then(Item::as_str) {
        Some(p) if same_dir(p, certs_dir) => Ok(changed),
        Some(p) if p.contains(':') => {
            let note = one_folder(p, certs_dir, &refuse)?.unwrap_or_default();
            table.insert("config_path", value(certs_dir));
            notes.push(format!("[{a}.\"{b}\".{c}] {note}"));
            Ok(true)
        }
        Some(p) if !p.is_empty() => Err(refuse(format!(
            "config_path is {p:?}; run again with --certs-dir {p}"
        ))),
        _ => {
            // Set even where the version's default would do: containerd
            // 2.2's default is a list of two folders (see one_folder).
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
    // containerd 2.x reads only version 3 configs' own tables, and a
    // version 3 config is read by nothing older.
    let version = opts
        .version
        .or_else(|| {
            (config_doc.get("version").and_then(Item::as_integer) == Some(3)).then(|| {
                opts.detected
                    .filter(|v| v.major >= 2)
                    .unwrap_or(Version { major: 2, minor: 0 })
            })
        })
        .or(opts.detected);
    let form = host_form(&opts.mirror, version).map_err(|message| InstallError::Refused {
        path: opts.config.clone(),
        message,
    })?;
    if let (HostForm::Dotted, Some(v)) = (form, version) {
        report.notes.push(format!(
            "containerd {v} cannot read an IPv6 address in a [host] table header, so the mirror              is written as a dotted key, which containerd 2.x ignores: run install again after              upgrading containerd to 2.x (`nodemirror doctor` tells)"
        ));
    }
    if ensure_config_path(&mut config_doc, &certs_str, &opts.config, &mut report.notes)? {
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
        let Some(text) = with_mirror(&path, before.as_deref(), &opts.mirror, form)? else {
            report.unchanged.push(path);
            continue;
        };
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
            // config_path is left in place: other hosts.toml may rely on it.
            if f.path.file_name().is_some_and(|n| n == "hosts.toml") {
                write_atomic(&f.path, &without_mirror(&f.path, &cur, &state.mirror)?)?;
            }
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
            assert!(ensure_config_path(
                &mut doc,
                "/etc/containerd/certs.d",
                Path::new("c"),
                &mut vec![]
            )
            .unwrap());
            let out = doc.to_string();
            assert!(out.contains(table), "{out}");
            assert!(
                out.contains("config_path = \"/etc/containerd/certs.d\""),
                "{out}"
            );
            assert!(!ensure_config_path(
                &mut doc,
                "/etc/containerd/certs.d/",
                Path::new("c"),
                &mut vec![]
            )
            .unwrap());
        }
        let mut doc: DocumentMut = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"x\"]\n"
            .parse()
            .unwrap();
        assert!(ensure_config_path(&mut doc, "/c", Path::new("c"), &mut vec![]).is_err());
        let mut doc: DocumentMut = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/other\"\n"
            .parse()
            .unwrap();
        assert_eq!(configured_certs_dir(&doc).as_deref(), Some("/other"));
        assert!(ensure_config_path(&mut doc, "/c", Path::new("c"), &mut vec![]).is_err());
    }

    #[test]
    fn versions_as_containerd_prints_them() {
        let v = |major, minor| Some(Version { major, minor });
        for (out, want) in [
            ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", v(1, 6)),
            ("containerd github.com/containerd/containerd/v2 2.1.9+unknown ", v(2, 1)),
            ("containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da", v(1, 7)),
            ("containerd github.com/containerd/containerd/v2 v2.2.0 1c4457e00facac03ce1d75f7b6777a7a851e5c41", v(2, 2)),
            ("something else", None),
        ] {
            assert_eq!(Version::from_output(out), want, "{out}");
        }
    }

    #[test]
    fn an_ipv6_mirror_is_spelled_for_the_containerd_that_reads_it() {
        let p = Path::new("hosts.toml");
        let m = "http://[::1]:5780";
        let theirs = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://corp.example\"]\n  capabilities = [\"pull\"]\n";
        let v1 = Some(Version { major: 1, minor: 6 });
        let v2 = Some(Version { major: 2, minor: 1 });
        assert_eq!(host_form(m, v1), Ok(HostForm::Dotted));
        assert_eq!(host_form(m, v2), Ok(HostForm::Table));
        assert_eq!(
            host_form("http://127.0.0.1:5780", None),
            Ok(HostForm::Table)
        );
        assert!(host_form(m, None)
            .unwrap_err()
            .contains("--containerd-version"));

        let one = with_mirror(p, Some(theirs), m, HostForm::Dotted)
            .unwrap()
            .unwrap();
        assert!(
            one.starts_with(&format!("{MARK}host.\"http://[::1]:5780\".capabilities")),
            "{one}"
        );
        assert!(one.ends_with(theirs), "{one}");
        assert_eq!(
            with_mirror(p, Some(&one), m, HostForm::Dotted).unwrap(),
            None
        );
        // containerd upgraded to 2.x: the same mirror, now as a table.
        let two = with_mirror(p, Some(&one), m, HostForm::Table)
            .unwrap()
            .unwrap();
        assert!(!two.contains(".capabilities = "), "{two}");
        let ours = two.find("[host.\"http://[::1]:5780\"]").unwrap();
        assert!(ours < two.find("corp.example").unwrap(), "{two}");
        assert_eq!(
            with_mirror(p, Some(&two), m, HostForm::Table).unwrap(),
            None
        );
        // Back again, and removed.
        let back = with_mirror(p, Some(&two), m, HostForm::Dotted)
            .unwrap()
            .unwrap();
        assert_eq!(without_mirror(p, &back, m).unwrap(), theirs);
        assert_eq!(without_mirror(p, &one, m).unwrap(), theirs);

        // Beside a bare [host] table no dotted key can be written.
        let bare = "[host]\n[host.\"https://corp.example\"]\n";
        assert!(with_mirror(p, Some(bare), m, HostForm::Dotted).is_err());
        assert!(with_mirror(p, Some("host = 1\n"), m, HostForm::Table).is_err());
    }

    #[test]
    fn a_list_of_folders_becomes_one() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs.d");
        let docker = dir.path().join("docker-certs.d");
        let certs_s = certs.to_str().unwrap();
        let list = format!("{}:{}", certs_s, docker.display());
        let text = format!(
            "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '{list}'\n\
             [plugins.'io.containerd.transfer.v1.local']\n  config_path = '{list}'\n"
        );
        let mut doc: DocumentMut = text.parse().unwrap();
        assert_eq!(configured_certs_dir(&doc).as_deref(), Some(certs_s));
        let mut notes = vec![];
        assert!(ensure_config_path(&mut doc, certs_s, Path::new("c"), &mut notes).unwrap());
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(registry_config_path(&doc).as_deref(), Some(certs_s));
        assert!(!doc.to_string().contains(&list), "{doc}");

        // A second folder with something in it is not silently dropped.
        std::fs::create_dir_all(docker.join("reg.test")).unwrap();
        let mut doc: DocumentMut = text.parse().unwrap();
        let e = ensure_config_path(&mut doc, certs_s, Path::new("c"), &mut vec![]).unwrap_err();
        assert!(e.to_string().contains("move its contents"), "{e}");
    }

    #[test]
    fn empty_mirrors_tables_are_no_obstacle() {
        let text = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"\"\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.configs]\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.configs.\"reg.test\".auth]\n    username = \"u\"\n  [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors]\n";
        let mut doc: DocumentMut = text.parse().unwrap();
        assert!(ensure_config_path(&mut doc, "/c", Path::new("c"), &mut vec![]).unwrap());
        let tls = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.\"reg.test\".tls]\n  insecure_skip_verify = true\n";
        let mut doc: DocumentMut = tls.parse().unwrap();
        assert!(ensure_config_path(&mut doc, "/c", Path::new("c"), &mut vec![]).is_err());
    }
}
