//! The .deb installs and removes cleanly on this Debian machine (no systemd
//! running: nothing is started, nothing fails), passes lintian, and the
//! .rpm carries the right files, config files and scripts.
//!
//! Installing a package changes the machine, so this runs only in CI (`CI`
//! set) or with NODEMIRROR_PACKAGE_TESTS=1, on packages `scripts/package`
//! built (scripts/test does that first).

use std::path::Path;
use std::process::{Command, Output};

use crate::support::real::require;

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn deb_installs_and_removes_cleanly_and_rpm_is_well_formed() {
    let wanted = std::env::var_os("CI").is_some()
        || std::env::var("NODEMIRROR_PACKAGE_TESTS").is_ok_and(|v| v == "1");
    if !wanted {
        eprintln!("packaging test skipped: it installs a package; set NODEMIRROR_PACKAGE_TESTS=1 (CI sets CI)");
        return;
    }
    if !require(&["dpkg", "rpm", "lintian"]) {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "installing a package needs root"
    );
    let version = env!("CARGO_PKG_VERSION");
    let root = env!("CARGO_MANIFEST_DIR");
    let deb = format!("{root}/target/package/nodemirror_{version}_amd64.deb");
    let rpm = format!("{root}/target/package/nodemirror-{version}-1.x86_64.rpm");
    assert!(
        Path::new(&deb).exists() && Path::new(&rpm).exists(),
        "run scripts/package first"
    );
    assert!(
        !run("dpkg", &["-s", "nodemirror"]).status.success(),
        "nodemirror is already installed here; refusing to touch it"
    );

    ok("lintian", &["--fail-on", "error,warning", &deb]);

    ok("dpkg", &["-i", &deb]);
    let installed = ok("/usr/bin/nodemirror", &["--version"]);
    assert_eq!(installed.trim(), format!("nodemirror {version}"));
    ok("getent", &["passwd", "nodemirror"]);
    let files = ok("dpkg", &["-L", "nodemirror"]);
    for f in [
        "/usr/bin/nodemirror",
        "/lib/systemd/system/nodemirror.service",
        "/lib/systemd/system/nodemirror.socket",
        "/etc/nodemirror/config.toml",
        "/etc/nodemirror/hosts.d/docker.io/hosts.toml",
        "/etc/nodemirror/hosts.d/registry.k8s.io/hosts.toml",
        "/usr/share/doc/nodemirror/README.md",
        "/usr/share/man/man8/nodemirror.8.gz",
        "/usr/share/nodemirror/grafana/nodemirror.json",
        "/usr/share/nodemirror/prometheus/nodemirror-alerts.yml",
        "/usr/share/nodemirror/kubernetes/nodemirror-peers.yaml",
        "/usr/share/nodemirror/kubernetes/node-certs",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} not installed:\n{files}");
    }
    // What was installed is what the monitoring test checked.
    for (installed, source) in [
        (
            "/usr/share/nodemirror/grafana/nodemirror.json",
            "packaging/monitoring/nodemirror-dashboard.json",
        ),
        (
            "/usr/share/nodemirror/prometheus/nodemirror-alerts.yml",
            "packaging/monitoring/nodemirror-alerts.yml",
        ),
    ] {
        assert_eq!(
            std::fs::read(installed).unwrap(),
            std::fs::read(format!("{root}/{source}")).unwrap(),
            "{installed}"
        );
    }
    // The installed defaults are a valid configuration.
    let cache = tempfile::tempdir().unwrap();
    ok(
        "/usr/bin/nodemirror",
        &[
            "check-config",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
    );

    ok("dpkg", &["-r", "nodemirror"]);
    assert!(!Path::new("/usr/bin/nodemirror").exists());
    assert!(
        Path::new("/etc/nodemirror/config.toml").exists(),
        "remove keeps conffiles"
    );
    ok("dpkg", &["-P", "nodemirror"]);
    assert!(
        !Path::new("/etc/nodemirror").exists(),
        "purge removes the configuration"
    );
    assert!(!run("dpkg", &["-s", "nodemirror"]).status.success());

    let info = ok("rpm", &["-qp", "--qf", "%{NAME} %{VERSION} %{ARCH}", &rpm]);
    assert_eq!(info, format!("nodemirror {version} x86_64"));
    let list = ok("rpm", &["-qpl", &rpm]);
    for f in [
        "/usr/bin/nodemirror",
        "/usr/lib/systemd/system/nodemirror.service",
        "/etc/nodemirror/hosts.d/quay.io/hosts.toml",
        "/usr/share/man/man8/nodemirror.8.gz",
        "/usr/share/nodemirror/grafana/nodemirror.json",
        "/usr/share/nodemirror/prometheus/nodemirror-alerts.yml",
        "/usr/share/nodemirror/kubernetes/nodemirror-peers.yaml",
        "/usr/share/nodemirror/kubernetes/node-certs",
    ] {
        assert!(list.lines().any(|l| l == f), "{f} not in rpm:\n{list}");
    }
    let config = ok("rpm", &["-qp", "--configfiles", &rpm]);
    assert!(
        config.lines().any(|l| l == "/etc/nodemirror/config.toml"),
        "{config}"
    );
    let scripts = ok("rpm", &["-qp", "--scripts", &rpm]);
    for s in [
        "useradd -r -g nodemirror",
        "systemctl enable --now nodemirror.service",
        "[ -d /run/systemd/system ]",
    ] {
        assert!(
            scripts.contains(s),
            "{s:?} missing from rpm scripts:\n{scripts}"
        );
    }
}
