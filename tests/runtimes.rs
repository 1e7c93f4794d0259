//! Every runtime wired right: `nodemirror containerd install` against the
//! default configuration of each containerd version and with the real
//! containerd builds here (bookworm's 1.6, and the 1.7 and 2.x that
//! `scripts/fetch-containerd` unpacks), pulling through a mirror on an IPv6
//! address.

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
        let out = nm_with_path(
            None,
            &[
                "containerd",
                "install",
                "--certs-dir",
                certs.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--state-dir",
                dir.path().join("state").to_str().unwrap(),
                "--mirror",
                "http://[::1]:5780",
                "--containerd-version",
                name,
            ],
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
    let registry = Registry::start().await;
    let image = Image::build(&[("v6.txt", b"through [::1]")]);
    registry.push("team/app", "v1", &image).await;
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[("reg-v6.test", format!("server = \"{}\"\n", registry.url()))],
    );
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
        let out = nm_with_path(
            Some(&b.bin),
            &[
                "containerd",
                "install",
                "--certs-dir",
                certs.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--state-dir",
                dir.path().join("state").to_str().unwrap(),
                "--mirror",
                &mirror,
            ],
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
