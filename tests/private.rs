//! Private content stays with the users allowed to pull it: a namespace
//! with credentials (or `private = true`) is served only to local users
//! that `[server]` allows, identified by the owner of their socket (real
//! unprivileged requests: `runuser -u nobody -- curl`), and content only
//! private namespaces brought in is served under no other namespace, GET
//! or HEAD, until that namespace's own registry confirms it. Where content
//! came from is kept on disk with it.

use http::{Method, StatusCode};
use nodemirror::config::ServerSettings;

use crate::proxy::hosts_toml;
use crate::support::fake::{Behaviour, Fake};
use crate::support::image::{Image, OCI_MANIFEST};
use crate::support::real::require;
use crate::support::{curl_as, request, Daemon};

/// A registry that wants Basic credentials `robot:s3cret`, holding
/// `team/app:v1`, and the auth file that has them.
async fn private_registry(image: &Image) -> (Fake, String) {
    let up = Fake::start(Behaviour {
        basic: Some(("robot".into(), "s3cret".into())),
        ..Behaviour::default()
    })
    .await;
    up.push_image("team/app", "v1", image);
    let auth = format!(
        r#"{{"auths": {{"{}": {{"username": "robot", "password": "s3cret"}}}}}}"#,
        up.addr
    );
    (up, auth)
}

/// What a user gets for GET and HEAD of `path`: their statuses.
fn as_nobody(d: &Daemon, path: &str) -> (u16, u16) {
    let url = d.url(path);
    (
        curl_as("nobody", "GET", &url).0,
        curl_as("nobody", "HEAD", &url).0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_content_is_served_only_to_allowed_users_and_only_under_its_origins() {
    if !require(&["runuser", "curl"]) {
        return;
    }
    let image = Image::build(&[("secret.txt", b"private layer bytes")]);
    let (private, auth) = private_registry(&image).await;
    let public = Fake::start(Behaviour::default()).await;
    let public_blob = public.put_blob("lib/tool", b"a public blob");
    let cache = tempfile::tempdir().unwrap();
    let d = Daemon::builder()
        .hosts("private.test", hosts_toml(&[], Some(&private.url())))
        .hosts("public.test", hosts_toml(&[], Some(&public.url())))
        .hosts("docker.io", hosts_toml(&[], Some(&public.url())))
        .auth(auth.clone())
        .cache_dir(cache.path())
        .start()
        .await;
    let layer = crate::support::sha256(&image.layers[0]);
    let config = crate::support::sha256(&image.config);
    let accept = [("accept", OCI_MANIFEST)];
    // root (allowed by default) pulls through the private namespace.
    let r = request(
        Method::GET,
        &d.url("/v2/team/app/manifests/v1?ns=private.test"),
        &accept,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), image.digest);
    for blob in [&layer, &config] {
        let r = request(
            Method::GET,
            &d.url(&format!("/v2/team/app/blobs/{blob}?ns=private.test")),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{blob}");
    }

    // nobody: the private namespace is refused, whatever the route.
    for path in [
        "/v2/team/app/manifests/v1?ns=private.test".to_string(),
        format!("/v2/team/app/manifests/{}?ns=private.test", image.digest),
        format!("/v2/team/app/blobs/{layer}?ns=private.test"),
        "/v2/team/app/tags/list?ns=private.test".to_string(),
        format!("/v2/private.test/team/app/blobs/{layer}"),
    ] {
        assert_eq!(as_nobody(&d, &path), (403, 403), "{path}");
    }

    // Under another namespace (named, by path prefix, or the default)
    // whose registry does not have it, nobody gets it, GET or HEAD, and
    // neither does root: the cache says nothing of what it holds.
    let elsewhere = |digest: &str, kind: &str| {
        [
            format!("/v2/team/app/{kind}/{digest}?ns=public.test"),
            format!("/v2/public.test/team/app/{kind}/{digest}"),
            format!("/v2/team/app/{kind}/{digest}"),
        ]
    };
    for path in elsewhere(&layer, "blobs")
        .into_iter()
        .chain(elsewhere(&image.digest, "manifests"))
    {
        assert_eq!(as_nobody(&d, &path), (404, 404), "{path}");
        let r = request(Method::GET, &d.url(&path), &accept).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "root: {path}");
        let r = request(Method::HEAD, &d.url(&path), &accept).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "root HEAD: {path}");
    }

    // Once the public registry has the layer, its HEAD is enough: the
    // cached copy is served under it, and that registry sends no body.
    public.put_blob("team/app", &image.layers[0]);
    let before = public.seen().len();
    let path = format!("/v2/team/app/blobs/{layer}?ns=public.test");
    let (status, body) = curl_as("nobody", "GET", &d.url(&path));
    assert_eq!(status, 200);
    assert_eq!(crate::support::sha256(&body), layer);
    let asked: Vec<_> = public.seen()[before..].to_vec();
    assert!(
        asked.iter().all(|s| s.method == Method::HEAD),
        "the public registry was asked for more than a HEAD: {asked:?}"
    );
    assert!(!asked.is_empty());

    // Public content is open to everyone.
    let path = format!("/v2/lib/tool/blobs/{public_blob}?ns=public.test");
    assert_eq!(as_nobody(&d, &path), (200, 200));

    // Where content came from survives a restart: with the private
    // registry down, root still pulls it from the cache under its own
    // namespace, and the config blob (private only) is still hidden
    // elsewhere.
    d.stop().await;
    private.set(|b| b.status = Some(StatusCode::SERVICE_UNAVAILABLE));
    let d = Daemon::builder()
        .hosts("private.test", hosts_toml(&[], Some(&private.url())))
        .hosts("public.test", hosts_toml(&[], Some(&public.url())))
        .auth(auth)
        .cache_dir(cache.path())
        .start()
        .await;
    let r = request(
        Method::GET,
        &d.url(&format!("/v2/team/app/blobs/{config}?ns=private.test")),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let path = format!("/v2/team/app/blobs/{config}?ns=public.test");
    assert_eq!(as_nobody(&d, &path), (404, 404));
    d.stop().await;
}

/// `[server]` lets other users in by uid or by group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_users_and_groups_pull_private_namespaces() {
    if !require(&["runuser", "curl"]) {
        return;
    }
    let image = Image::build(&[("f", b"for the builders")]);
    let (private, auth) = private_registry(&image).await;
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a user named nobody");
    let path = "/v2/team/app/manifests/v1?ns=private.test";
    for server in [
        ServerSettings {
            allowed_uids: vec![0, nobody.uid.as_raw()],
            allowed_gids: Vec::new(),
            ..Default::default()
        },
        ServerSettings {
            allowed_uids: vec![0],
            allowed_gids: vec![nobody.gid.as_raw()],
            ..Default::default()
        },
    ] {
        let d = Daemon::builder()
            .hosts("private.test", hosts_toml(&[], Some(&private.url())))
            .auth(auth.clone())
            .server(server.clone())
            .start()
            .await;
        assert_eq!(as_nobody(&d, path), (200, 200), "{server:?}");
        d.stop().await;
    }
    // `private = true` without credentials is private too.
    let open = Fake::start(Behaviour::default()).await;
    open.push_image("team/app", "v1", &image);
    let d = Daemon::builder()
        .hosts(
            "private.test",
            format!("private = true\n{}", hosts_toml(&[], Some(&open.url()))),
        )
        .start()
        .await;
    assert_eq!(as_nobody(&d, path), (403, 403));
    let r = request(Method::GET, &d.url(path), &[("accept", OCI_MANIFEST)]).await;
    assert_eq!(r.status, StatusCode::OK);
    d.stop().await;
}
