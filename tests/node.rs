//! Running as a node service: the systemd notify protocol (READY, STATUS,
//! WATCHDOG, RELOADING, STOPPING) over a real datagram socket, socket
//! activation, hosts.d changes applied without a signal, and the unit files
//! checked by systemd-analyze.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::fake::{Behaviour, Fake};
use crate::support::image::Image;
use crate::support::real::{require, Binary};
use crate::support::{answers_ok, free_port, get, wait_for, wait_until, write_hosts};

/// Collects notify messages until one contains `want` or time runs out.
fn expect(sock: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l == want || l.starts_with(want));
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {want:?} from the daemon; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let hosts = tempfile::tempdir().unwrap();
    let mut bin = Binary::start_with(
        hosts.path(),
        None,
        "",
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
        None,
    )
    .await;
    let mut seen = Vec::new();
    expect(&sock, "READY=1", &mut seen);
    let ready = seen.last().unwrap().clone();
    assert!(
        ready.contains(&format!(
            "STATUS=serving on 127.0.0.1:{}; counting the cache",
            bin.port
        )),
        "{ready}"
    );
    // The count of the cache runs beside serving, and says when done.
    expect(
        &sock,
        &format!("STATUS=serving on 127.0.0.1:{}; 0 blobs", bin.port),
        &mut seen,
    );
    expect(&sock, "WATCHDOG=1", &mut seen);
    expect(&sock, "WATCHDOG=1", &mut seen);

    let pid = Pid::from_raw(bin.proc.child.id() as i32);
    kill(pid, Signal::SIGHUP).unwrap();
    expect(&sock, "RELOADING=1", &mut seen);
    assert!(seen.last().unwrap().contains("MONOTONIC_USEC="), "{seen:?}");
    expect(&sock, "READY=1", &mut seen);

    kill(pid, Signal::SIGTERM).unwrap();
    expect(&sock, "STOPPING=1", &mut seen);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = bin.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not exit after STOPPING");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_a_socket_passed_by_systemd() {
    if !require(&["systemd-socket-activate"]) {
        return;
    }
    let hosts = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // The daemon's own --listen is 127.0.0.1:1, which it could not bind:
    // answering on `port` proves it used the passed socket.
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "",
        &[],
        &[],
        Some((&["systemd-socket-activate", "-l", &listen, "--"], port)),
    )
    .await;
    assert!(answers_ok(&format!("http://{listen}/v2/")).await);
    assert!(bin
        .proc
        .log_text()
        .contains("using the socket passed by systemd"));
}

#[tokio::test]
async fn hosts_d_edits_apply_without_a_signal() {
    let up = Fake::start(Behaviour::default()).await;
    let img = Image::build(&[("f", b"inotify")]);
    up.push_image("app", "v1", &img);
    let hosts = tempfile::tempdir().unwrap();
    let bin = Binary::start(hosts.path(), &[]).await;
    let url = format!(
        "http://127.0.0.1:{}/v2/app/manifests/v1?ns=reg.test",
        bin.port
    );
    assert_ne!(get(&url).await.status, StatusCode::OK);

    write_hosts(
        hosts.path(),
        &[("reg.test", format!("server = \"{}\"\n", up.url()))],
    );
    wait_for(
        "the new hosts.toml to apply",
        Duration::from_secs(10),
        || answers_ok(&url),
    )
    .await;

    let file = hosts.path().join("reg.test").join("hosts.toml");
    std::fs::write(
        &file,
        format!(
            "server = \"{}\"\n\n[host.\"http://x\"]\nbogus = 1\n",
            up.url()
        ),
    )
    .unwrap();
    let expected = format!("{}:4: unknown key `bogus`", file.display());
    bin.proc.wait_for_log(&expected).await;
    assert_eq!(
        get(&url).await.status,
        StatusCode::OK,
        "last good config stays"
    );
}

/// The shipped units pass `systemd-analyze verify`, the service's
/// exposure under `systemd-analyze security` stays at or below 1.1 (as it
/// was), and it denies the cloud metadata addresses and bounds memory.
#[test]
fn unit_files_pass_systemd_analyze() {
    if !require(&["systemd-analyze"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let unit = std::fs::read_to_string(format!("{root}/systemd/nodemirror.service")).unwrap();
    // verify checks that ExecStart exists: point it at the built binary.
    let unit = unit.replace("/usr/bin/nodemirror", env!("CARGO_BIN_EXE_nodemirror"));
    std::fs::write(dir.path().join("nodemirror.service"), unit).unwrap();
    std::fs::copy(
        format!("{root}/systemd/nodemirror.socket"),
        dir.path().join("nodemirror.socket"),
    )
    .unwrap();
    let verify = Command::new("systemd-analyze")
        .args(["verify", "nodemirror.service", "nodemirror.socket"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success(), "{out}");
    assert!(
        !out.contains("nodemirror.s"),
        "systemd-analyze verify complained: {out}"
    );

    let security = Command::new("systemd-analyze")
        .args([
            "security",
            "--offline=true",
            "--threshold=11",
            "nodemirror.service",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&security.stdout);
    assert!(security.status.success(), "exposure above 1.1:\n{text}");
    let deny = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "nodemirror.service"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let deny = String::from_utf8_lossy(&deny.stdout);
    assert!(
        deny.contains("Overall exposure level for nodemirror.service: 1.1"),
        "{deny}"
    );
    let unit = std::fs::read_to_string(dir.path().join("nodemirror.service")).unwrap();
    let value = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing"))
            .to_string()
    };
    for addr in ["169.254.169.254", "fd00:ec2::254"] {
        assert!(
            value("IPAddressDeny").split_whitespace().any(|a| a == addr),
            "{addr}"
        );
    }
    assert_eq!(value("MemoryMax"), "1536M");
    assert!(
        text.contains("Overall exposure level for nodemirror.service"),
        "{text}"
    );
}

/// `/metrics`, `/healthz`, `/readyz`, and JSON logs with one line per
/// request, from the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_json_logs() {
    let up = Fake::start(Behaviour::default()).await;
    let img = Image::build(&[("f", b"metrics")]);
    up.push_image("app", "v1", &img);
    let dead = free_port();
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[(
            "reg.test",
            format!(
                "server = \"{}\"\n[host.\"http://127.0.0.1:{dead}\"]\n",
                up.url()
            ),
        )],
    );
    let bin = Binary::start_with(
        hosts.path(),
        None,
        "",
        &[],
        &[("NODEMIRROR_LOG_FORMAT", "json")],
        None,
    )
    .await;
    let base = format!("http://127.0.0.1:{}", bin.port);
    let layer = crate::support::sha256(&img.layers[0]);
    let blob = format!("{base}/v2/app/blobs/{layer}?ns=reg.test");
    assert_eq!(
        get(&format!("{base}/v2/app/manifests/v1?ns=reg.test"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(get(&blob).await.status, StatusCode::OK);
    wait_for("the blob to be cached", Duration::from_secs(10), || {
        let u = format!("{base}/metrics");
        async move {
            get(&u)
                .await
                .bytes()
                .windows(24)
                .any(|w| w == b"nodemirror_cache_blobs 1")
        }
    })
    .await;
    assert_eq!(get(&blob).await.status, StatusCode::OK);

    let r = get(&format!("{base}/metrics")).await;
    assert!(r
        .header("content-type")
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8_lossy(r.bytes()).to_string();
    let dead_ep = format!("http://127.0.0.1:{dead}/v2");
    for line in [
        "nodemirror_requests_total{ns=\"reg.test\",kind=\"manifest\",status=\"200\"} 1".to_string(),
        "nodemirror_requests_total{ns=\"reg.test\",kind=\"blob\",status=\"200\"} 2".to_string(),
        "nodemirror_cache_requests_total{kind=\"blob\",result=\"miss\"} 1".to_string(),
        "nodemirror_cache_requests_total{kind=\"blob\",result=\"hit\"} 1".to_string(),
        "nodemirror_cache_requests_total{kind=\"tag\",result=\"miss\"} 1".to_string(),
        format!("nodemirror_upstream_errors_total{{endpoint=\"{dead_ep}\",reason=\"connect\"}} 1"),
        format!("nodemirror_upstream_fallbacks_total{{endpoint=\"{dead_ep}\"}} 1"),
        format!(
            "nodemirror_served_bytes_total{{source=\"cache\"}} {}",
            img.layers[0].len()
        ),
        format!(
            "nodemirror_upstream_fetched_bytes_total {}",
            img.layers[0].len()
        ),
        "nodemirror_cache_blobs 1".to_string(),
        "nodemirror_inflight_fetches 0".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    assert_eq!(get(&format!("{base}/healthz")).await.status, StatusCode::OK);
    assert_eq!(get(&format!("{base}/readyz")).await.status, StatusCode::OK);

    // One JSON object per line; one "served" line per request.
    let log = bin.proc.log_text();
    let served: Vec<serde_json::Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))
        })
        .filter(|v| v["fields"]["message"] == "served")
        .collect();
    let blob_lines = served
        .iter()
        .filter(|v| {
            v["span"]["path"]
                .as_str()
                .is_some_and(|p| p.contains("/blobs/"))
        })
        .count();
    assert_eq!(blob_lines, 2, "{log}");
    assert!(served
        .iter()
        .all(|v| v["fields"]["status"].is_u64() && v["span"]["method"].is_string()));
    assert!(
        served.iter().any(|v| v["span"]["ns"] == "reg.test"),
        "{log}"
    );
}

fn nm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodemirror"))
        .args(args)
        .output()
        .unwrap()
}

/// install edits real files (keeping comments and hosts, mirror first),
/// containerd accepts the result, a second install changes nothing, and
/// uninstall restores the exact bytes.
#[test]
fn containerd_install_and_uninstall_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let config = dir.path().join("config.toml");
    let state = dir.path().join("state");
    let hub = certs.join("docker.io/hosts.toml");
    let config_text = "# node config\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\" # keep\n";
    let hub_text = "# corp setup\nserver = \"https://registry-1.docker.io\"\n\n[host.\"https://corp.example\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
    std::fs::create_dir_all(hub.parent().unwrap()).unwrap();
    std::fs::write(&config, config_text).unwrap();
    std::fs::write(&hub, hub_text).unwrap();
    let args = |extra: &[&str]| {
        let mut v = vec![
            "containerd",
            "install",
            "--certs-dir",
            certs.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--mirror",
            "http://127.0.0.1:5780",
        ];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| nm(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let out = run(args(&[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(args(&["--registry", "docker.io"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let default = std::fs::read_to_string(certs.join("_default/hosts.toml")).unwrap();
    assert!(
        default.contains("[host.\"http://127.0.0.1:5780\"]"),
        "{default}"
    );
    let hub_now = std::fs::read_to_string(&hub).unwrap();
    let (ours, theirs) = (
        hub_now.find("127.0.0.1:5780").unwrap(),
        hub_now.find("corp.example").unwrap(),
    );
    assert!(ours < theirs, "mirror first:\n{hub_now}");
    assert!(
        hub_now.contains("# corp setup")
            && hub_now.contains("server = \"https://registry-1.docker.io\"")
    );
    let cfg_now = std::fs::read_to_string(&config).unwrap();
    assert!(
        cfg_now.contains("# node config") && cfg_now.contains("# keep"),
        "{cfg_now}"
    );
    assert!(
        cfg_now.contains(&format!("config_path = \"{}\"", certs.display())),
        "{cfg_now}"
    );

    // The edited files parse as what they claim to be: nodemirror reads the
    // hosts.toml files, and containerd itself reads the config.
    let check = nm(&[
        "check-config",
        "--config",
        "/dev/null",
        "--hosts-dir",
        certs.to_str().unwrap(),
        "--cache-dir",
        dir.path().join("cache").to_str().unwrap(),
    ]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    if require(&["containerd"]) {
        let dump = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .args(["config", "dump"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&dump.stdout);
        assert!(
            dump.status.success(),
            "{}",
            String::from_utf8_lossy(&dump.stderr)
        );
        assert!(
            text.contains(&format!("config_path = \"{}\"", certs.display())),
            "{text}"
        );
        assert!(text.contains("sandbox_image = \"registry.k8s.io/pause:3.9\""));
    }

    // Idempotent.
    let again = run(args(&[]));
    assert!(String::from_utf8_lossy(&again.stdout)
        .lines()
        .all(|l| l.starts_with("unchanged")));

    let out = nm(&[
        "containerd",
        "uninstall",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), config_text);
    assert_eq!(std::fs::read_to_string(&hub).unwrap(), hub_text);
    assert!(
        !certs.join("_default").exists(),
        "created files and folders removed"
    );
}

/// A file edited after install keeps the edit; only the mirror goes.
#[test]
fn uninstall_keeps_later_edits() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let config = dir.path().join("config.toml");
    let state = dir.path().join("state");
    let out = nm(&[
        "containerd",
        "install",
        "--certs-dir",
        certs.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--mirror",
        "http://127.0.0.1:5780",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = certs.join("_default/hosts.toml");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("\n# added by the operator later\n[host.\"https://later.example\"]\n");
    std::fs::write(&file, &text).unwrap();
    let out = nm(&[
        "containerd",
        "uninstall",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let left = std::fs::read_to_string(&file).unwrap();
    assert!(!left.contains("127.0.0.1:5780"), "{left}");
    assert!(
        left.contains("later.example") && left.contains("# added by the operator later"),
        "{left}"
    );
    assert!(
        !config.exists(),
        "config.toml did not exist before: removed"
    );
}

#[test]
fn registries_yaml_prints_and_merges() {
    let out = nm(&["k3s-registries", "--mirror", "http://127.0.0.1:5780"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mirrors:\n  \"*\":\n    endpoint:\n      - \"http://127.0.0.1:5780\""),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registries.yaml");
    let original = "mirrors:\n  docker.io:\n    endpoint:\n      - \"https://corp.example\"\n";
    std::fs::write(&file, original).unwrap();
    let out = nm(&[
        "rke2-registries",
        "--mirror",
        "http://127.0.0.1:5780",
        "--merge",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged = std::fs::read_to_string(&file).unwrap();
    assert!(
        merged.contains("http://127.0.0.1:5780") && merged.contains("corp.example"),
        "{merged}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("registries.yaml.nodemirror-orig")).unwrap(),
        original
    );
    let out = nm(&[
        "rke2-registries",
        "--mirror",
        "http://127.0.0.1:5780",
        "--merge",
        file.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("unchanged"));
}

/// Rotated registry credentials take effect on reload (SIGHUP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_picks_up_new_credentials() {
    let up = Fake::start(Behaviour {
        basic: Some(("robot".into(), "new-secret".into())),
        ..Default::default()
    })
    .await;
    let img = Image::build(&[("f", b"rotated")]);
    up.push_image("app", "v1", &img);
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[("reg.test", format!("server = \"{}\"\n", up.url()))],
    );
    // A folder of its own (watched too; SIGHUP applies it at once).
    let secrets = tempfile::tempdir().unwrap();
    let auth = secrets.path().join("auth.json");
    let creds = |p: &str| {
        format!(
            r#"{{"auths": {{"{}": {{"username": "robot", "password": "{p}"}}}}}}"#,
            up.addr
        )
    };
    std::fs::write(&auth, creds("old-secret")).unwrap();
    let bin = Binary::start(hosts.path(), &["--auth-file", auth.to_str().unwrap()]).await;
    let url = format!(
        "http://127.0.0.1:{}/v2/app/manifests/v1?ns=reg.test",
        bin.port
    );
    assert_eq!(
        get(&url).await.status,
        StatusCode::FORBIDDEN,
        "old password refused, and said so"
    );

    std::fs::write(&auth, creds("new-secret")).unwrap();
    kill(Pid::from_raw(bin.proc.child.id() as i32), Signal::SIGHUP).unwrap();
    wait_for(
        "the new password to be used",
        Duration::from_secs(10),
        || answers_ok(&url),
    )
    .await;
}

/// Edits to config.toml apply without a restart (inotify on its folder);
/// a broken edit is reported with file and line and changes nothing; flags
/// still win over the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_toml_edits_apply_without_a_restart() {
    let a = Fake::start(Behaviour::default()).await;
    let b = Fake::start(Behaviour::default()).await;
    let (img_a, img_b) = (
        Image::build(&[("f", b"from a")]),
        Image::build(&[("f", b"from b")]),
    );
    a.push_image("app", "v1", &img_a);
    b.push_image("app", "v1", &img_b);
    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[
            ("a.test", format!("server = \"{}\"\n", a.url())),
            ("b.test", format!("server = \"{}\"\n", b.url())),
        ],
    );
    let bin = Binary::start_in(hosts.path(), None, "default_namespace = \"a.test\"\n", &[]).await;
    let config = bin.config_file();
    let url = format!("http://127.0.0.1:{}/v2/app/manifests/v1", bin.port);
    assert_eq!(
        get(&url).await.header("docker-content-digest"),
        img_a.digest
    );

    std::fs::write(&config, "default_namespace = \"b.test\"\n").unwrap();
    let want_b = img_b.digest.clone();
    wait_for("the new default namespace", Duration::from_secs(10), || {
        let (url, want) = (url.clone(), want_b.clone());
        async move { get(&url).await.header("docker-content-digest") == want }
    })
    .await;

    std::fs::write(
        &config,
        "default_namespace = \"b.test\"\n\n[cache]\ntag_tll = \"5s\"\n",
    )
    .unwrap();
    let expected = format!("{}:4: unknown key `tag_tll`", config.display());
    bin.proc.wait_for_log(&expected).await;
    assert_eq!(
        get(&url).await.header("docker-content-digest"),
        img_b.digest,
        "last good config stays"
    );

    // Flags win on reload too: a listen in the file does not displace --listen.
    let reloads = |log: String| log.matches("configuration reloaded").count();
    let before = reloads(bin.proc.log_text());
    std::fs::write(
        &config,
        "default_namespace = \"b.test\"\nlisten = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    wait_until("the next reload", Duration::from_secs(10), || {
        reloads(bin.proc.log_text()) > before
    })
    .await;
    assert!(
        !bin.proc.log_text().contains("listen changed"),
        "the --listen flag wins"
    );
    assert_eq!(get(&url).await.status, StatusCode::OK);
}
