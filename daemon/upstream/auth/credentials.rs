//! Upstream credentials from a docker `config.json`-format file, found the
//! way `docker login` and `podman login` write them, and credential helpers
//! run the way docker runs them.
//!
//! An endpoint's credential is looked up by its `host:port`, then, for the
//! namespace's own server (not its mirrors), by the registry's name (what
//! `docker login REGISTRY` writes; `https://index.docker.io/v1/` stands for
//! docker.io). For each key, `credHelpers` names a helper program, `auths`
//! holds a credential; `credsStore` is the helper for everything else.
//!
//! A helper is `docker-credential-<name>` on the `PATH`, run as `get`
//! with the server on its standard input, answering
//! `{"ServerURL": ..., "Username": ..., "Secret": ...}` (docker's protocol).
//! It gets [`HELPER_TIMEOUT`] and at most [`HELPER_OUTPUT`] bytes of
//! output; what it answers is kept for the life of the tokens it yields
//! (`Auth`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use http::HeaderValue;
use url::Url;

use crate::reference::Namespace;

/// A username and password for one registry host.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.username)
    }
}

impl Credential {
    pub(super) fn basic_header(&self) -> Option<HeaderValue> {
        let raw = format!("{}:{}", self.username, self.password);
        let enc = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::try_from(format!("Basic {enc}")).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

/// The credentials file: `auths`, `credHelpers` and `credsStore`.
#[derive(Debug, Default)]
pub struct Credentials {
    /// By registry host ([`host_key`]).
    auths: HashMap<String, Credential>,
    /// Helper names by registry host.
    helpers: HashMap<String, String>,
    /// The helper for registries with no entry of their own.
    store: Option<String>,
}

/// Where an endpoint's credential comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Static(Credential),
    /// `docker-credential-<helper> get`, asked about `server`.
    Helper {
        helper: String,
        server: String,
    },
}

/// One `auths` entry of a docker config.json.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    /// Written by `docker login`; not used here.
    #[serde(default, rename = "email")]
    _email: Option<String>,
    #[serde(default, rename = "identitytoken")]
    _identity_token: Option<String>,
}

/// Reduces `https://index.docker.io/v1/`, `registry-1.docker.io` and the
/// like to the host a credential is for.
fn host_key(s: &str) -> String {
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let host = s.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// What a helper is asked about for a registry host: docker's own name for
/// Docker Hub, else the host.
fn helper_server(key: &str) -> String {
    if key == "docker.io" {
        "https://index.docker.io/v1/".into()
    } else {
        key.to_string()
    }
}

/// A helper name must be a plain name (it becomes a program's name).
fn valid_helper(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Credentials {
    /// Errors carry the line (0 when it is about the file as a whole).
    pub fn load(path: &Path) -> Result<Self, (usize, String)> {
        let text = crate::config::read_config_file(path).map_err(|e| (0, e))?;
        Self::parse_at(&text)
    }

    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_at(text).map_err(|(line, e)| format!("line {line}: {e}"))
    }

    /// A docker `config.json`: an object whose `auths` (if any) maps
    /// registries to objects with `auth` (base64 `user:password`) or
    /// `username` and `password`; `credHelpers` maps registries to helper
    /// names, `credsStore` names one helper for the rest. Other keys docker
    /// writes are ignored.
    fn parse_at(text: &str) -> Result<Self, (usize, String)> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| (e.line(), format!("invalid docker config.json: {e}")))?;
        let Some(top) = value.as_object() else {
            return Err((
                0,
                "a docker config.json is a JSON object: {\"auths\": {\"registry\": {...}}}".into(),
            ));
        };
        let mut out = Credentials::default();
        let object = |key: &str| -> Result<
            Option<&serde_json::Map<String, serde_json::Value>>,
            (usize, String),
        > {
            match top.get(key) {
                None => Ok(None),
                Some(serde_json::Value::Object(m)) => Ok(Some(m)),
                Some(_) => Err((
                    line_of_key(text, key),
                    format!("`{key}` must be an object of registries"),
                )),
            }
        };
        for (key, entry) in object("auths")?.into_iter().flatten() {
            let at = line_of_key(text, key);
            let a: DockerAuth = serde_json::from_value(entry.clone())
                .map_err(|e| (at, format!("auths.{key}: {e}")))?;
            let cred = credential(key, a).map_err(|e| (at, e))?;
            out.auths.insert(host_key(key), cred);
        }
        for (key, helper) in object("credHelpers")?.into_iter().flatten() {
            let at = line_of_key(text, key);
            let name = helper.as_str().filter(|n| valid_helper(n)).ok_or_else(|| {
                (
                    at,
                    format!("credHelpers.{key} must name a helper, like \"ecr-login\""),
                )
            })?;
            out.helpers.insert(host_key(key), name.to_string());
        }
        if let Some(store) = top.get("credsStore") {
            let name = store.as_str().filter(|n| valid_helper(n)).ok_or_else(|| {
                (
                    line_of_key(text, "credsStore"),
                    "credsStore must name a helper, like \"secretservice\"".to_string(),
                )
            })?;
            out.store = Some(name.to_string());
        }
        Ok(out)
    }

    /// The keys an endpoint's credential is looked up by: its `host:port`,
    /// then, for the namespace's own server, the registry's name.
    fn keys(ns: &Namespace, endpoint: &Url, server: bool) -> Vec<String> {
        let mut keys = Vec::new();
        match (endpoint.host_str(), endpoint.port()) {
            (Some(h), Some(p)) => keys.push(host_key(&format!("{h}:{p}"))),
            (Some(h), None) => keys.push(host_key(h)),
            _ => {}
        }
        if server {
            let name = host_key(ns.as_str());
            if !keys.contains(&name) {
                keys.push(name);
            }
        }
        keys
    }

    /// Where the credential of `endpoint` (of namespace `ns`; `server`
    /// when it is the namespace's own server, not a mirror) comes from.
    pub fn source(&self, ns: &Namespace, endpoint: &Url, server: bool) -> Option<Source> {
        let keys = Credentials::keys(ns, endpoint, server);
        for key in &keys {
            if let Some(helper) = self.helpers.get(key) {
                return Some(Source::Helper {
                    helper: helper.clone(),
                    server: helper_server(key),
                });
            }
            if let Some(c) = self.auths.get(key) {
                return Some(Source::Static(c.clone()));
            }
        }
        let store = self.store.as_ref()?;
        let key = keys.last()?;
        Some(Source::Helper {
            helper: store.clone(),
            server: helper_server(key),
        })
    }

    /// Whether the file names a credential for the endpoint (an `auths` or
    /// `credHelpers` entry; `credsStore` alone, asked about every registry,
    /// does not say which ones it has).
    pub fn configured_for(&self, ns: &Namespace, endpoint: &Url, server: bool) -> bool {
        Credentials::keys(ns, endpoint, server)
            .iter()
            .any(|k| self.auths.contains_key(k) || self.helpers.contains_key(k))
    }
}

/// The credential of one `auths` entry.
fn credential(key: &str, a: DockerAuth) -> Result<Credential, String> {
    match (a.auth, a.username, a.password) {
        (Some(auth), _, _) if !auth.is_empty() => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| format!("auths.{key}.auth is not base64: {e}"))?;
            let raw =
                String::from_utf8(raw).map_err(|_| format!("auths.{key}.auth is not UTF-8"))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| format!("auths.{key}.auth is not user:password"))?;
            Ok(Credential {
                username: u.into(),
                password: p.into(),
            })
        }
        (_, Some(username), Some(password)) => Ok(Credential { username, password }),
        _ => Err(format!(
            "auths.{key} has neither auth nor username/password"
        )),
    }
}

/// The line where the object key `key` first appears in a JSON text (1
/// when it cannot be found).
fn line_of_key(text: &str, key: &str) -> usize {
    let quoted = serde_json::to_string(key).unwrap_or_default();
    let mut from = 0;
    while let Some(i) = text[from..].find(&quoted) {
        let at = from + i;
        let after = text[at + quoted.len()..].trim_start();
        if after.starts_with(':') {
            return text[..at].matches('\n').count() + 1;
        }
        from = at + quoted.len();
    }
    1
}

/// How long a credential helper may take.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// The most a helper may print.
const HELPER_OUTPUT: usize = 64 << 10;

/// What a helper answers.
#[derive(serde::Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Runs `docker-credential-<helper> get` for `server`: the credential, or
/// none when the helper has none for it.
pub async fn run_helper(helper: &str, server: &str) -> Result<Option<Credential>, String> {
    run_program(&format!("docker-credential-{helper}"), server).await
}

/// Runs a helper program (a name on the `PATH`, or a path).
async fn run_program(program: &str, server: &str) -> Result<Option<Credential>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let work = async {
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(server.as_bytes()).await;
        }
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            stdout
                .take(HELPER_OUTPUT as u64)
                .read_to_end(&mut out)
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut err = Vec::new();
        if let Some(stderr) = child.stderr.take() {
            let _ = stderr
                .take(HELPER_OUTPUT as u64)
                .read_to_end(&mut err)
                .await;
        }
        let status = child.wait().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, out, err))
    };
    let (status, out, err) = tokio::time::timeout(HELPER_TIMEOUT, work)
        .await
        .map_err(|_| format!("{program} get gave no answer within {HELPER_TIMEOUT:?}"))??;
    if !status.success() {
        let said = String::from_utf8_lossy(if out.is_empty() { &err } else { &out }).to_string();
        if said.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        return Err(format!("{program} get failed ({status}): {}", said.trim()));
    }
    let a: HelperAnswer = serde_json::from_slice(&out)
        .map_err(|e| format!("{program} get answered no credential: {e}"))?;
    Ok(Some(Credential {
        username: a.username,
        password: a.secret,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> Namespace {
        s.parse().unwrap()
    }

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn keyed_by_endpoint_or_by_registry_name_as_docker_login_writes_them() {
        let creds = Credentials::parse(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                "127.0.0.1:5001": {"username": "u2", "password": "p:2"},
                "registry.corp.example": {"username": "robot", "password": "x"}
            }}"#,
        )
        .unwrap();
        let get = |n: &str, url: &str, server: bool| match creds.source(&ns(n), &u(url), server) {
            Some(Source::Static(c)) => Some(c.username),
            _ => None,
        };
        // Docker Hub by docker's own key.
        assert_eq!(
            get("docker.io", "https://registry-1.docker.io/v2", true).as_deref(),
            Some("user")
        );
        // By the endpoint's host:port.
        assert_eq!(
            get("x.test", "http://127.0.0.1:5001/v2", false).as_deref(),
            Some("u2")
        );
        // By the registry's name, for its own server at another address.
        assert_eq!(
            get("registry.corp.example", "http://10.0.0.5:5000/v2", true).as_deref(),
            Some("robot")
        );
        // ... but not for a mirror of it.
        assert_eq!(
            get("registry.corp.example", "http://10.0.0.6:5000/v2", false),
            None
        );
        assert!(creds.configured_for(
            &ns("registry.corp.example"),
            &u("http://10.0.0.5:5000/v2"),
            true
        ));
        assert_eq!(get("other.test", "http://127.0.0.1:5002/v2", true), None);
        let hub = creds.auths.get("docker.io").unwrap();
        assert!(format!("{hub:?}").contains("redacted"));
    }

    #[test]
    fn helpers_and_the_store() {
        let creds = Credentials::parse(
            r#"{"auths": {"a.test": {"auth": "dTpw"}}, "credHelpers": {"b.test": "corp", "docker.io": "hub"}, "credsStore": "secretservice"}"#,
        )
        .unwrap();
        let s = |n: &str, url: &str| creds.source(&ns(n), &u(url), true);
        assert!(matches!(
            s("a.test", "https://a.test/v2"),
            Some(Source::Static(_))
        ));
        assert_eq!(
            s("b.test", "https://b.test/v2"),
            Some(Source::Helper {
                helper: "corp".into(),
                server: "b.test".into()
            })
        );
        assert_eq!(
            s("docker.io", "https://registry-1.docker.io/v2"),
            Some(Source::Helper {
                helper: "hub".into(),
                server: "https://index.docker.io/v1/".into()
            })
        );
        // The store for the rest, asked about the registry's name.
        assert_eq!(
            s("c.test", "https://10.0.0.5/v2"),
            Some(Source::Helper {
                helper: "secretservice".into(),
                server: "c.test".into()
            })
        );
        assert!(
            !creds.configured_for(&ns("c.test"), &u("https://10.0.0.5/v2"), true),
            "the store alone"
        );
        assert!(Credentials::parse(r#"{"credHelpers": {"x": "../bin/sh"}}"#).is_err());
        assert!(Credentials::parse(r#"{"credsStore": 5}"#).is_err());
    }

    #[test]
    fn bad_docker_config() {
        assert!(Credentials::parse(r#"{"auths": {"x": {"auth": "!!"}}}"#).is_err());
        assert!(Credentials::parse(r#"{"auths": {"x": {}}}"#).is_err());
        let e = Credentials::parse("{\n  \"auths\": [\n").unwrap_err();
        assert!(e.starts_with("line "), "{e}");
        // Shapes, with the line of the entry at fault.
        let e = Credentials::parse("[]").unwrap_err();
        assert!(
            e.starts_with("line 0: a docker config.json is a JSON object"),
            "{e}"
        );
        let e = Credentials::parse("{\n\"auths\": []\n}").unwrap_err();
        assert!(e.starts_with("line 2: `auths` must be an object"), "{e}");
        let text = "{\"auths\": {\n  \"a.test\": {\"auth\": \"dTpw\"},\n  \"b.test\": {\"auth\": \"!!\"}\n}}";
        let e = Credentials::parse(text).unwrap_err();
        assert!(
            e.starts_with("line 3: auths.b.test.auth is not base64"),
            "{e}"
        );
        let e = Credentials::parse("{\"auths\": {\n\"c.test\": 5}}").unwrap_err();
        assert!(e.starts_with("line 2: auths.c.test"), "{e}");
        let e =
            Credentials::parse("{\"auths\": {\n\"c.test\": {\"usernme\": \"u\"}}}").unwrap_err();
        assert!(e.contains("unknown field `usernme`"), "{e}");
        // What docker itself writes beside auths is fine.
        let ok = r#"{"auths": {"d.test": {"auth": "dTpw", "email": "x@y"}}, "credsStore": "desktop", "HttpHeaders": {}}"#;
        assert!(Credentials::parse(ok).is_ok());
    }

    #[tokio::test]
    async fn a_helper_program_answers_or_has_nothing_or_runs_out_of_time() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str| {
            let p = dir.path().join(format!("docker-credential-{name}"));
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        write(
            "ok",
            r#"read s; echo "{\"ServerURL\":\"$s\",\"Username\":\"u-$s\",\"Secret\":\"p\"}""#,
        );
        write(
            "none",
            "echo 'credentials not found in native keychain'; exit 1",
        );
        write("broken", "echo 'boom' >&2; exit 3");
        let at = |name: &str| {
            dir.path()
                .join(format!("docker-credential-{name}"))
                .display()
                .to_string()
        };
        let c = run_program(&at("ok"), "reg.test").await.unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("u-reg.test", "p")
        );
        assert_eq!(run_program(&at("none"), "reg.test").await.unwrap(), None);
        let e = run_program(&at("broken"), "reg.test").await.unwrap_err();
        assert!(e.contains("boom"), "{e}");
        assert!(run_helper("missing-helper-of-nodemirror", "reg.test")
            .await
            .is_err());
    }
}
