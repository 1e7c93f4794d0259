//! Real components started as processes: the nodemirror binary, Debian's
//! docker-registry (distribution 2.8) and containerd. Each is killed when
//! dropped and keeps its log in its temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;

use super::image::Image;
use super::{answers_ok, free_port, wait_for};

/// Fails loudly when a tool the end-to-end tests need is missing, unless
/// the operator opted out with NODEMIRROR_SKIP_E2E=1.
pub fn require(tools: &[&str]) -> bool {
    if std::env::var("NODEMIRROR_SKIP_E2E").is_ok_and(|v| v == "1") {
        eprintln!("NODEMIRROR_SKIP_E2E=1: skipping a test that needs {tools:?}");
        return false;
    }
    for t in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{t} is not installed: run .ci/run (or apt-get install containerd docker-registry podman skopeo), \
             or set NODEMIRROR_SKIP_E2E=1 to skip"
        );
    }
    true
}

/// A child process killed on drop, its output in `log`.
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
    /// Holds the log and the process's state; removed on drop.
    _dir: TempDir,
}

impl Process {
    pub fn spawn(mut cmd: Command, dir: TempDir, name: &str) -> Process {
        let log = dir.path().join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (10 s at most) until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let what = format!("{needle:?} in the log");
        super::wait_until(&what, Duration::from_secs(10), || {
            self.log_text().contains(needle)
        })
        .await;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nodemirror binary, serving on a free loopback port.
pub struct Binary {
    pub proc: Process,
    pub port: u16,
}

impl Binary {
    pub async fn start(hosts_dir: &Path, extra: &[&str]) -> Binary {
        Self::start_in(hosts_dir, None, "", extra).await
    }

    pub async fn start_in(
        hosts_dir: &Path,
        cache: Option<&Path>,
        config: &str,
        extra: &[&str],
    ) -> Binary {
        Self::start_with(hosts_dir, cache, config, extra, &[], None).await
    }

    /// Starts with `cache` (a fresh one if `None`), `config` as the config
    /// file's text, extra environment, and optionally under a wrapper
    /// command: one that listens on its port (systemd-socket-activate), or
    /// with port 0 one that does not (prlimit).
    pub async fn start_with(
        hosts_dir: &Path,
        cache: Option<&Path>,
        config: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        wrapper: Option<(&[&str], u16)>,
    ) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let activated = wrapper.is_some_and(|(_, p)| p != 0);
        let port = match wrapper {
            Some((_, p)) if p != 0 => p,
            _ => free_port(),
        };
        // Our own config file, so a node's /etc/nodemirror cannot leak in.
        let config_file = dir.path().join("config.toml");
        std::fs::write(&config_file, config).unwrap();
        let config = config_file;
        let cache = cache.map_or_else(|| dir.path().join("cache"), Path::to_path_buf);
        let mut cmd = match wrapper {
            Some((w, _)) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg(env!("CARGO_BIN_EXE_nodemirror"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_nodemirror")),
        };
        cmd.envs(env.iter().copied());
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .args([
                "--listen",
                &format!("127.0.0.1:{}", if activated { 1 } else { port }),
            ])
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--hosts-dir")
            .arg(hosts_dir)
            .args(extra);
        let mut proc = Process::spawn(cmd, dir, "nodemirror");
        let url = format!("http://127.0.0.1:{port}/v2/");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = proc.child.try_wait().unwrap() {
                panic!("nodemirror exited with {status}: {}", proc.log_text());
            }
            if answers_ok(&url).await {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nodemirror did not start: {}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Binary { proc, port }
    }

    /// The config file the binary was started with (`--config`).
    pub fn config_file(&self) -> std::path::PathBuf {
        self.proc.log.with_file_name("config.toml")
    }

    /// How many files the process has open now.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.child.id())).map_or(0, |d| d.count())
    }

    /// Peak resident memory so far, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Resident anonymous memory now (the heap and stacks, not the
    /// program's mapped files), from /proc.
    pub fn anon_rss_kib(&self) -> u64 {
        self.status_kib("RssAnon:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/<pid>/status"))
    }
}

/// Debian's docker-registry (distribution 2.8) on a free loopback port.
pub struct Registry {
    _proc: Process,
    pub port: u16,
    /// The Basic credentials it wants (htpasswd), if any.
    basic: Option<String>,
}

impl Registry {
    pub async fn start() -> Registry {
        Self::start_with(None).await
    }

    /// A registry that wants `user`:`password` (htpasswd, bcrypt).
    pub async fn with_htpasswd(user: &str, password: &str) -> Registry {
        Self::start_with(Some((user, password))).await
    }

    async fn start_with(login: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = login {
            let file = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            std::fs::write(&file, out.stdout).unwrap();
            text.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: nodemirror-test\n    path: {}\n",
                file.display()
            ));
        }
        std::fs::write(&config, text).unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let proc = Process::spawn(cmd, dir, "registry");
        let basic = login.map(|(u, p)| {
            use base64::Engine as _;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let url = format!("http://127.0.0.1:{port}/v2/");
        let ready = || {
            let (url, basic) = (url.clone(), basic.clone());
            async move {
                let headers: Vec<(&str, &str)> = basic
                    .iter()
                    .map(|b| ("authorization", b.as_str()))
                    .collect();
                matches!(
                    super::try_request(Method::GET, &url, &headers).await,
                    Ok(r) if r.status == StatusCode::OK
                )
            }
        };
        wait_for("docker-registry to start", Duration::from_secs(20), ready).await;
        Registry {
            _proc: proc,
            port,
            basic,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Pushes `image` as `repo:tag` with the plain HTTP upload API.
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) {
        for blob in image.blobs() {
            self.upload(repo, blob).await;
        }
        let url = format!("{}/v2/{repo}/manifests/{tag}", self.url());
        let (status, _) = send(
            Method::PUT,
            &url,
            Some(&image.media_type),
            image.manifest.clone(),
            self.basic.as_deref(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "manifest push to {url}");
    }

    /// Pushes a manifest (an index, say) as `repo:reference`.
    pub async fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        let (status, _) = send(
            Method::PUT,
            &url,
            Some(media_type),
            body.to_vec(),
            self.basic.as_deref(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "manifest push to {url}");
    }

    async fn upload(&self, repo: &str, blob: &[u8]) {
        let start = format!("{}/v2/{repo}/blobs/uploads/", self.url());
        let (status, location) = send(
            Method::POST,
            &start,
            None,
            Vec::new(),
            self.basic.as_deref(),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "upload start");
        let location = location.expect("upload Location");
        let mut url = if location.starts_with("http") {
            location
        } else {
            format!("{}{location}", self.url())
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={}", super::sha256(blob)));
        let (status, _) = send(
            Method::PUT,
            &url,
            Some("application/octet-stream"),
            blob.to_vec(),
            self.basic.as_deref(),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "blob upload");
    }
}

async fn send(
    method: Method,
    url: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
    authorization: Option<&str>,
) -> (StatusCode, Option<String>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = Request::builder().method(method).uri(url);
    if let Some(ct) = content_type {
        b = b.header("content-type", ct);
    }
    if let Some(a) = authorization {
        b = b.header("authorization", a);
    }
    let resp = client
        .request(b.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let _ = resp.into_body().collect().await;
    (status, location)
}

/// One containerd build: its version and the folder of its `containerd`
/// and `ctr`.
#[derive(Clone, Debug)]
pub struct ContainerdBuild {
    pub version: nodemirror::node::containerd::Version,
    pub bin: PathBuf,
}

/// Every containerd build here: the system's (on PATH: Debian bookworm's
/// 1.6) and those `scripts/fetch-containerd` unpacked (1.7 and 2.x). In CI
/// both major versions must be present.
pub fn containerd_builds() -> Vec<ContainerdBuild> {
    use nodemirror::node::containerd::Version;
    let mut dirs = Vec::new();
    if let Ok(o) = Command::new("sh")
        .args(["-c", "command -v containerd"])
        .output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if let Some(d) = p.parent().filter(|_| o.status.success()) {
            dirs.push(d.to_path_buf());
        }
    }
    let fetched = std::env::var_os("NODEMIRROR_CONTAINERDS").map_or_else(
        || PathBuf::from("/opt/nodemirror-test/containerd"),
        PathBuf::from,
    );
    if let Ok(rd) = std::fs::read_dir(&fetched) {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("usr/bin")).collect();
        more.sort();
        dirs.extend(more);
    }
    let builds: Vec<ContainerdBuild> = dirs
        .into_iter()
        .filter_map(|bin| {
            let version = Version::detect(&bin.join("containerd")).ok()?;
            Some(ContainerdBuild { version, bin })
        })
        .collect();
    if std::env::var_os("CI").is_some() {
        for major in [1, 2] {
            assert!(
                builds.iter().any(|b| b.version.major == major),
                "no containerd {major}.x here ({builds:?}): run scripts/fetch-containerd"
            );
        }
    }
    builds
}

/// A private containerd (as root), its state under a temporary directory.
pub struct Containerd {
    pub proc: Process,
    pub socket: PathBuf,
    /// The folder of the `containerd` and `ctr` used.
    pub bin: Option<PathBuf>,
}

impl Containerd {
    pub async fn start() -> Containerd {
        Self::start_build(None).await
    }

    /// Starts the containerd in `bin` (the one on PATH if `None`).
    pub async fn start_build(bin: Option<&Path>) -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let socket = root.join("containerd.sock");
        let config = root.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n\
                 [debug]\n  address = \"{s}.debug\"\n",
                r = root.display(),
                s = socket.display()
            ),
        )
        .unwrap();
        let mut cmd =
            Command::new(bin.map_or_else(|| "containerd".into(), |b| b.join("containerd")));
        cmd.arg("--config").arg(&config);
        let proc = Process::spawn(cmd, dir, "containerd");
        let c = Containerd {
            proc,
            socket,
            bin: bin.map(Path::to_path_buf),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "containerd did not start: {}",
                c.proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(
            self.bin
                .as_ref()
                .map_or_else(|| "ctr".into(), |b| b.join("ctr")),
        )
        .arg("--address")
        .arg(&self.socket)
        .args(args)
        .output()
        .expect("ctr")
    }
}

/// Waits (20 s at most) until `what` accepts connections on loopback `port`.
async fn listening(what: &str, port: u16) {
    wait_for(
        &format!("{what} to listen"),
        Duration::from_secs(20),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
}

/// Debian's squid on a loopback port: CONNECT to any port but `deny_ports`,
/// with Basic credentials when `login` is given; `access.log` records
/// every CONNECT it was asked for.
pub struct Squid {
    pub proc: Process,
    pub port: u16,
}

impl Squid {
    pub async fn start(login: Option<(&str, &str)>, deny_ports: &[u16]) -> Squid {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        // squid drops to its own user, which writes the logs here.
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let port = free_port();
        let mut conf = format!(
            "http_port 127.0.0.1:{port}\npid_filename {d}/squid.pid\ncache_log {d}/cache.log\n\
             access_log stdio:{d}/access.log\ncache deny all\ncache_mem 8 MB\n\
             dns_nameservers 127.0.0.1\nshutdown_lifetime 0 seconds\npinger_enable off\n",
            d = d.display()
        );
        for p in deny_ports {
            conf.push_str(&format!(
                "acl denied_{p} port {p}\nhttp_access deny denied_{p}\n"
            ));
        }
        match login {
            Some((user, password)) => {
                let out = Command::new("htpasswd")
                    .args(["-bc", &format!("{}/passwd", d.display()), user, password])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "htpasswd: {out:?}");
                std::fs::set_permissions(
                    d.join("passwd"),
                    std::os::unix::fs::PermissionsExt::from_mode(0o644),
                )
                .unwrap();
                conf.push_str(&format!(
                    "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}/passwd\n\
                     auth_param basic realm test\nacl authed proxy_auth REQUIRED\n\
                     http_access allow authed\n",
                    d.display()
                ));
            }
            None => conf.push_str("http_access allow localhost\n"),
        }
        conf.push_str("http_access deny all\n");
        std::fs::write(d.join("squid.conf"), conf).unwrap();
        let mut cmd = Command::new("squid");
        cmd.args(["-N", "-f"]).arg(d.join("squid.conf"));
        let proc = Process::spawn(cmd, dir, "squid");
        listening("squid", port).await;
        Squid { proc, port }
    }

    pub fn url(&self, login: Option<(&str, &str)>) -> String {
        match login {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The CONNECT lines of access.log (squid writes each when its tunnel
    /// closes, so callers wait for what they expect).
    pub fn connects(&self) -> Vec<String> {
        std::fs::read_to_string(self.proc.log.with_file_name("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" CONNECT "))
            .map(str::to_string)
            .collect()
    }
}

/// Dante's SOCKS server on a loopback port, passing connections to
/// `allow_ports` on loopback only and logging each connect it passes or
/// blocks.
pub struct Dante {
    pub proc: Process,
    pub port: u16,
}

impl Dante {
    pub async fn start(allow_ports: &[u16]) -> Dante {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let port = free_port();
        let mut conf = format!(
            "logoutput: {d}/danted.log\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
             clientmethod: none\nsocksmethod: none\nuser.privileged: root\n\
             user.unprivileged: nobody\nclient pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n",
            d = d.display()
        );
        for p in allow_ports {
            conf.push_str(&format!(
                "socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 port = {p} log: connect }}\n"
            ));
        }
        conf.push_str("socks block { from: 0.0.0.0/0 to: 0.0.0.0/0 log: connect error }\n");
        std::fs::write(d.join("danted.conf"), conf).unwrap();
        let mut cmd = Command::new("danted");
        cmd.arg("-f")
            .arg(d.join("danted.conf"))
            .arg("-p")
            .arg(d.join("danted.pid"));
        let proc = Process::spawn(cmd, dir, "dante");
        listening("dante", port).await;
        Dante { proc, port }
    }

    /// What dante logged: `pass` and `block` lines name the target.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.proc.log.with_file_name("danted.log")).unwrap_or_default()
    }
}
