//! Every runtime wired right, with the real runtimes: `nodemirror
//! containerd install` against the default configuration of each containerd
//! version and with the containerd builds here (bookworm's 1.6, and the 1.7
//! and 2.x that `scripts/fetch-containerd` unpacks), pulling through a
//! mirror on an IPv6 address; `nodemirror doctor` on a wired node and on
//! each fault; Docker Engine (Debian's docker.io 20.10) with
//! `--registry-mirror`, and what it does when the mirror fails.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nodemirror::node::containerd::{mirror_form, registry_config_path, HostForm, Version};
use toml_edit::DocumentMut;

use crate::support::image::Image;
use crate::support::real::{containerd_builds, require, Containerd, Process, Registry};
use crate::support::{answers_ok, free_port, write_hosts};

fn nm_with_path(path_first: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodemirror"));
    if let Some(dir) = path_first {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", dir.display()));
    }
    cmd.args(args).output().unwrap()
}

/// `nodemirror containerd install` of `mirror` into `config` (and `certs`,
/// else the folder the config names), originals kept in `dir`/state.
fn install(
    path_first: Option<&Path>,
    certs: Option<&Path>,
    config: &Path,
    dir: &Path,
    mirror: &str,
    extra: &[&str],
) -> Output {
    let state = dir.join("state");
    let mut args = vec!["containerd", "install"];
    if let Some(c) = certs {
        args.extend(["--certs-dir", c.to_str().unwrap()]);
    }
    args.extend([
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--mirror",
        mirror,
    ]);
    args.extend_from_slice(extra);
    nm_with_path(path_first, &args)
}

/// A real registry holding `image` as `repo:v1`, and a hosts.d sending
/// `ns` to it.
async fn registry_with(ns: &str, repo: &str, image: &Image) -> (Registry, tempfile::TempDir) {
    let registry = Registry::start().await;
    registry.push(repo, "v1", image).await;
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[(ns, format!("server = \"{}\"\n", registry.url()))],
    );
    (registry, hosts)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The installer on what `containerd config default` prints for 1.6, 1.7,
/// 2.1 and 2.2 (tests/fixtures/containerd): config_path ends up one folder
/// (2.2's two-folder default fixed, with a note), the IPv6 mirror is
/// spelled as that version reads it, and where that containerd build is
/// here it loads the result.
#[test]
fn containerd_install_fits_the_default_config_of_each_version() {
    let builds = containerd_builds();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/containerd");
    for name in ["1.6", "1.7", "2.1", "2.2"] {
        let version = Version::parse(name).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs.d");
        let docker = dir.path().join("docker-certs.d");
        let config = dir.path().join("config.toml");
        let default = std::fs::read_to_string(fixtures.join(format!("{name}-default.toml")))
            .unwrap()
            .replace("/etc/containerd/certs.d", certs.to_str().unwrap())
            .replace("/etc/docker/certs.d", docker.to_str().unwrap());
        std::fs::write(&config, &default).unwrap();
        let out = install(
            None,
            Some(&certs),
            &config,
            dir.path(),
            "http://[::1]:5780",
            &["--containerd-version", name],
        );
        let said = text(&out);
        assert!(out.status.success(), "{name}: {said}");
        assert_eq!(
            said.contains("read as one folder"),
            name == "2.2",
            "{name}: the two-folder config_path is fixed and said: {said}"
        );
        let doc: DocumentMut = std::fs::read_to_string(&config).unwrap().parse().unwrap();
        assert_eq!(
            registry_config_path(&doc).as_deref(),
            certs.to_str(),
            "{name}: {doc}"
        );
        let hosts: DocumentMut = std::fs::read_to_string(certs.join("_default/hosts.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let want = if version.major < 2 {
            HostForm::Dotted
        } else {
            HostForm::Table
        };
        assert_eq!(
            mirror_form(&hosts, "http://[::1]:5780"),
            Some(want),
            "{name}: {hosts}"
        );
        // The same containerd build, where it is here, loads the config.
        if let Some(b) = builds.iter().find(|b| b.version == version) {
            let dump = Command::new(b.bin.join("containerd"))
                .arg("--config")
                .arg(&config)
                .args(["config", "dump"])
                .output()
                .unwrap();
            let shown = String::from_utf8_lossy(&dump.stdout);
            assert!(dump.status.success(), "{name}: {}", text(&dump));
            assert!(
                shown.lines().any(|l| l.trim().starts_with("config_path")
                    && l.contains(&format!("{}", certs.display()))
                    && !l.contains(':')),
                "{name}: containerd {} shows {shown}",
                b.version
            );
        }
    }
}

/// With no way to tell which containerd reads the files, an IPv6 mirror is
/// refused with the way out, and nothing is written.
#[test]
fn an_ipv6_mirror_for_an_unknown_containerd_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "version = 2\n").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .env("PATH", empty.path())
        .args([
            "containerd",
            "install",
            "--certs-dir",
            dir.path().join("certs.d").to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--mirror",
            "http://[::1]:5780",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("--containerd-version"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "version = 2\n");
    assert!(!dir.path().join("certs.d").exists());
}

/// nodemirror listening on [::1]: for each containerd build here, install
/// finds its version itself (`containerd --version` on PATH), and that
/// containerd pulls through the mirror. containerd's only other host is a
/// closed port, so the pull works only if containerd read the mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_containerd_pulls_through_an_ipv6_mirror_it_was_installed_for() {
    if !require(&["containerd", "ctr", "docker-registry"]) {
        return;
    }
    let image = Image::build(&[("v6.txt", b"through [::1]")]);
    let (_registry, hosts) = registry_with("reg-v6.test", "team/app", &image).await;
    let nm = start_on_ipv6(hosts.path()).await;

    let builds = containerd_builds();
    assert!(!builds.is_empty());
    for b in &builds {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs.d");
        write_hosts(
            &certs,
            &[("_default", "server = \"http://127.0.0.1:9\"\n".to_string())],
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "version = 2\n").unwrap();
        let mirror = format!("http://[::1]:{}", nm.1);
        let out = install(
            Some(&b.bin),
            Some(&certs),
            &config,
            dir.path(),
            &mirror,
            &[],
        );
        assert!(out.status.success(), "{}: {}", b.version, text(&out));
        let c = Containerd::start_build(Some(&b.bin)).await;
        let pulled = c.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            certs.to_str().unwrap(),
            "reg-v6.test/team/app:v1",
        ]);
        assert!(
            pulled.status.success(),
            "containerd {} through {mirror}: {}\nhosts.toml:\n{}",
            b.version,
            text(&pulled),
            std::fs::read_to_string(certs.join("_default/hosts.toml")).unwrap()
        );
        let listed = c.ctr(&["images", "ls"]);
        assert!(
            String::from_utf8_lossy(&listed.stdout).contains(&image.digest),
            "{}",
            text(&listed)
        );
    }
}

/// The nodemirror binary listening on [::1] only; (process, port).
async fn start_on_ipv6(hosts_dir: &Path) -> (Process, u16) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodemirror"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("[::1]:{port}")])
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--hosts-dir")
        .arg(hosts_dir);
    let mut proc = Process::spawn(cmd, dir, "nodemirror");
    let url = format!("http://[::1]:{port}/v2/");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !answers_ok(&url).await {
        if let Some(status) = proc.child.try_wait().unwrap() {
            panic!("nodemirror exited with {status}: {}", proc.log_text());
        }
        assert!(std::time::Instant::now() < deadline, "{}", proc.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (proc, port)
}

/// `nodemirror doctor` on a node wired by the installers (a real
/// containerd's `config dump`, real config files, a running daemon in front
/// of a real registry): every line ok and exit 0, and the real containerd
/// pulls through what doctor passed. Then one fault at a time, each failing
/// its own line with exit 1: the daemon down, a per-registry hosts.toml
/// without the mirror, an IPv6 mirror in a table header for containerd
/// 1.x, a two-folder config_path for containerd 2.x, the drop-in missing
/// or overridden, registries.yaml without the mirror, an unknown tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_node_end_to_end() {
    if !require(&["containerd", "ctr", "docker-registry"]) {
        return;
    }
    let image = Image::build(&[("doctor.txt", b"healthy")]);
    let (registry, hosts) = registry_with("reg.test", "team/app", &image).await;
    let nm = crate::support::real::Binary::start(hosts.path(), &[]).await;
    let server = format!("http://127.0.0.1:{}", nm.port);

    // The node: containerd (the system's), the drop-in, k3s.
    let node = tempfile::tempdir().unwrap();
    let certs = node.path().join("certs.d");
    write_hosts(
        &certs,
        &[("_default", "server = \"http://127.0.0.1:9\"\n".to_string())],
    );
    let config = node.path().join("config.toml");
    std::fs::write(&config, "version = 2\n").unwrap();
    let state = node.path().join("state");
    let crio_dir = node.path().join("containers/registries.conf.d");
    std::fs::create_dir_all(&crio_dir).unwrap();
    let k3s = node.path().join("rancher/k3s/registries.yaml");
    std::fs::create_dir_all(k3s.parent().unwrap()).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for args in [
        vec![
            "containerd".to_string(),
            "install".into(),
            "--certs-dir".into(),
            s(&certs),
            "--config".into(),
            s(&config),
            "--state-dir".into(),
            s(&state),
            "--mirror".into(),
            server.clone(),
        ],
        vec![
            "crio".into(),
            "install".into(),
            "--dir".into(),
            s(&crio_dir),
            "--state-dir".into(),
            s(&state),
            "--mirror".into(),
            server.clone(),
            "--config".into(),
            "/dev/null".into(),
            "--hosts-dir".into(),
            s(hosts.path()),
        ],
        vec![
            "k3s-registries".into(),
            "--merge".into(),
            s(&k3s),
            "--mirror".into(),
            server.clone(),
        ],
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = nm_with_path(None, &a);
        assert!(out.status.success(), "{a:?}: {}", text(&out));
    }
    let doctor = |server: &str, config: &Path, bin: Option<&Path>, image: &str| {
        let mut a = vec![
            "doctor".to_string(),
            "--config".into(),
            "/dev/null".into(),
            "--server".into(),
            server.to_string(),
            "--containerd-config".into(),
            s(config),
            "--crio-dir".into(),
            s(&crio_dir),
            "--registries-yaml".into(),
            s(&k3s),
            "--image".into(),
            image.to_string(),
        ];
        if let Some(b) = bin {
            a.extend(["--containerd".into(), s(&b.join("containerd"))]);
        }
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        nm_with_path(None, &a)
    };
    let line = |out: &Output, name: &str| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l[6..].starts_with(name))
            .unwrap_or_else(|| panic!("no {name} line: {}", text(out)))
            .to_string()
    };
    let fails = |out: &Output, name: &str, says: &str| {
        assert_eq!(out.status.code(), Some(1), "{}", text(out));
        let l = line(out, name);
        assert!(
            l.starts_with("FAIL") && l.contains(says) && l.contains("fix: "),
            "{l}"
        );
    };

    // All well.
    let image_ref = "reg.test/team/app:v1";
    let out = doctor(&server, &config, None, image_ref);
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.lines().all(|l| l.starts_with("ok")), "{said}");
    for name in [
        "daemon",
        "containerd config_path",
        "hosts.toml _default",
        "manifest",
        "containers/image drop-in",
        "registries.yaml",
    ] {
        line(&out, name);
    }
    assert!(line(&out, "manifest").contains(&image.digest), "{said}");
    let c = Containerd::start().await;
    let pulled = c.ctr(&["images", "pull", "--hosts-dir", &s(&certs), image_ref]);
    assert!(pulled.status.success(), "{}", text(&pulled));

    // The daemon down.
    let closed = format!("http://127.0.0.1:{}", free_port());
    fails(
        &doctor(&closed, &config, None, image_ref),
        "daemon",
        "no answer",
    );

    // An unknown tag: the registry's 404 said.
    let out = doctor(&server, &config, None, "reg.test/team/app:missing");
    fails(&out, "manifest", "404");

    // A registry with a hosts.toml of its own that leaves the mirror out.
    write_hosts(
        &certs,
        &[("reg.test", format!("server = \"{}\"\n", registry.url()))],
    );
    fails(
        &doctor(&server, &config, None, image_ref),
        "hosts.toml reg.test",
        "bypass the mirror",
    );
    std::fs::remove_dir_all(certs.join("reg.test")).unwrap();

    // An IPv6 mirror in a table header, for containerd 1.x.
    let default = certs.join("_default/hosts.toml");
    let good = std::fs::read_to_string(&default).unwrap();
    std::fs::write(
        &default,
        "server = \"http://127.0.0.1:9\"\n[host.\"http://[::1]:5780\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
    )
    .unwrap();
    let out = doctor(&server, &config, None, image_ref);
    if containerd_builds()
        .first()
        .is_some_and(|b| b.version.major == 1)
    {
        fails(&out, "hosts.toml _default", "cannot parse");
    }
    std::fs::write(&default, &good).unwrap();

    // containerd 2.x with a two-folder config_path (2.2's default).
    if let Some(two) = containerd_builds()
        .into_iter()
        .find(|b| b.version.major == 2)
    {
        let v3 = node.path().join("config-v3.toml");
        std::fs::write(
            &v3,
            format!(
                "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '{}:{}'\n",
                certs.display(),
                node.path().join("docker-certs.d").display()
            ),
        )
        .unwrap();
        fails(
            &doctor(&server, &v3, Some(&two.bin), image_ref),
            "containerd config_path",
            "one folder",
        );
        // Fixed by install, and then doctor is content with 2.x too.
        let out = install(
            Some(&two.bin),
            None,
            &v3,
            &node.path().join("v3"),
            &server,
            &[],
        );
        assert!(out.status.success(), "{}", text(&out));
        let out = doctor(&server, &v3, Some(&two.bin), image_ref);
        assert!(out.status.success(), "{}", text(&out));
    }

    // The drop-in overridden by a later one, then missing.
    let later = crio_dir.join("90-late.conf");
    std::fs::write(
        &later,
        "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n",
    )
    .unwrap();
    fails(
        &doctor(&server, &config, None, image_ref),
        "containers/image drop-in",
        "replaces its entry for docker.io",
    );
    std::fs::remove_file(&later).unwrap();
    std::fs::remove_file(crio_dir.join("50-nodemirror.conf")).unwrap();
    fails(
        &doctor(&server, &config, None, image_ref),
        "containers/image drop-in",
        "pull without the mirror",
    );

    // registries.yaml without the mirror.
    std::fs::write(
        &k3s,
        "mirrors:\n  \"*\":\n    endpoint:\n      - \"https://elsewhere.test\"\n",
    )
    .unwrap();
    fails(
        &doctor(&server, &config, None, image_ref),
        "registries.yaml",
        "not the daemon",
    );
}

/// A private Docker Engine (Debian's docker.io, dockerd 20.10) whose
/// Docker Hub names (registry-1.docker.io and the rest) point at a closed
/// loopback port in its own mount namespace (/etc/hosts and resolv.conf
/// bound over), so nothing it does reaches the machine's resolver.
struct Dockerd {
    proc: Process,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Dockerd {
    async fn start(mirror: &str) -> Dockerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let hosts = d.join("hosts");
        std::fs::write(
            &hosts,
            "127.0.0.1 localhost\n127.0.0.1 registry-1.docker.io index.docker.io docker.io \
             auth.docker.io registry.docker.io production.cloudflare.docker.com\n",
        )
        .unwrap();
        let resolv = d.join("resolv.conf");
        std::fs::write(
            &resolv,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        let socket = d.join("docker.sock");
        let script = format!(
            "mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && \
             exec dockerd --data-root {d}/data --exec-root {d}/exec --pidfile {d}/docker.pid \
             -H unix://{socket} --iptables=false --ip6tables=false --bridge=none \
             --storage-driver=vfs --registry-mirror {mirror}",
            hosts = hosts.display(),
            resolv = resolv.display(),
            d = d.display(),
            socket = socket.display(),
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
        let log_dir = tempfile::tempdir().unwrap();
        let mut proc = Process::spawn(cmd, log_dir, "dockerd");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = proc.child.try_wait().unwrap() {
                panic!("dockerd exited with {status}: {}", proc.log_text());
            }
            let ok = Command::new(DOCKER)
                .args(["-H", &format!("unix://{}", socket.display()), "version"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "dockerd did not start: {}",
                proc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Dockerd {
            proc,
            socket,
            _dir: dir,
        }
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .args(["-H", &format!("unix://{}", self.socket.display())])
            .args(args)
            .output()
            .unwrap()
    }
}

/// Debian's docker.io client (another `docker` may come first on PATH).
const DOCKER: &str = "/usr/bin/docker";

/// Docker Engine with `--registry-mirror`: Docker Hub images come through
/// nodemirror (the digest is the registry's), and again from its cache
/// with the registry gone. When the mirror fails (down, or it has not the
/// image), Docker goes on to Docker Hub itself: here Hub is a closed
/// loopback port, so the pull fails naming registry-1.docker.io.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_engine_pulls_docker_hub_images_through_the_mirror() {
    if !require(&["dockerd", "unshare", "docker-registry", "containerd"]) {
        return;
    }
    let image = Image::build_docker(&[("hub.txt", b"from docker hub, via the node")]);
    // docker.io's hosts.d folder sends Docker Hub to the local registry.
    let (registry, hosts) = registry_with("docker.io", "library/hello", &image).await;
    let nm = crate::support::real::Binary::start(hosts.path(), &[]).await;
    let mirror = format!("http://127.0.0.1:{}", nm.port);
    let dockerd = Dockerd::start(&mirror).await;

    let pulled = dockerd.docker(&["pull", "hello:v1"]);
    let said = text(&pulled);
    assert!(
        pulled.status.success(),
        "{said}\n{}",
        dockerd.proc.log_text()
    );
    assert!(
        said.contains(&format!("Digest: {}", image.digest)),
        "{said}"
    );
    let log = nm.proc.log_text();
    assert!(log.contains("blob cached"), "through the mirror: {log}");

    // An image the registry has not: the mirror says 404, and Docker
    // tries Docker Hub itself.
    let missing = dockerd.docker(&["pull", "absent:v1"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("https://registry-1.docker.io/v2/"),
        "{}",
        text(&missing)
    );
    let log = dockerd.proc.log_text();
    assert!(
        log.contains("Attempting next endpoint for pull after error: manifest unknown"),
        "{log}"
    );

    // The registry gone: Docker still pulls, from the mirror's cache.
    drop(registry);
    let removed = dockerd.docker(&["rmi", "hello:v1"]);
    assert!(removed.status.success(), "{}", text(&removed));
    let again = dockerd.docker(&["pull", "hello:v1"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains(&image.digest));
    // ... and what is not cached gets a 503, after which Docker asks Hub.
    let uncached = dockerd.docker(&["pull", "other:v1"]);
    assert!(!uncached.status.success());
    assert!(text(&uncached).contains("https://registry-1.docker.io/v2/"));
    assert!(dockerd.proc.log_text().contains(
        "Attempting next endpoint for pull after error: received unexpected HTTP status: 503"
    ));

    // The mirror down: Docker goes on to Docker Hub.
    drop(nm);
    let _ = dockerd.docker(&["rmi", "hello:v1"]);
    let down = dockerd.docker(&["pull", "hello:v1"]);
    assert!(!down.status.success());
    assert!(
        text(&down).contains("https://registry-1.docker.io/v2/"),
        "{}",
        text(&down)
    );
    let log = dockerd.proc.log_text();
    assert!(
        log.contains(&format!(
            "Attempting next endpoint for pull after error: Get \\\"{mirror}/v2/\\\""
        )),
        "{log}"
    );
}
