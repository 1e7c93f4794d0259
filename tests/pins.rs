//! `nodemirror pin`: pinned images survive every collection, restarts,
//! and follow their tag.

use std::path::Path;
use std::time::Duration;

use crate::support::fake::{Behaviour, Fake};
use crate::support::image::{index, Image, OCI_INDEX};
use crate::support::real::Binary;
use crate::support::{blob_path, get, write_hosts};

/// Runs the nodemirror tool beside the daemon listening on `port`.
fn tool(port: u16, cache: &Path, args: &[&str]) -> (Option<i32>, String) {
    crate::support::tool(&format!("127.0.0.1:{port}"), cache, args)
}

fn ok(port: u16, cache: &Path, args: &[&str]) -> String {
    let (code, text) = tool(port, cache, args);
    assert_eq!(code, Some(0), "nodemirror {args:?}: {text}");
    text
}

fn cached(cache: &Path, image: &Image) -> bool {
    image
        .blobs()
        .all(|b| blob_path(cache, &crate::support::sha256(b)).exists())
}

/// Waits until the pulled blobs of `images` are stored: a fetch commits a
/// blob just after its last byte has reached the client.
async fn landed(cache: &Path, images: &[&Image]) {
    crate::support::wait_until("the pulled blobs stored", Duration::from_secs(10), || {
        images.iter().all(|i| cached(cache, i))
    })
    .await;
}

fn none_cached(cache: &Path, image: &Image) -> bool {
    image
        .blobs()
        .all(|b| !blob_path(cache, &crate::support::sha256(b)).exists())
}

/// A two-platform image pinned by tag, beside an unpinned one: a
/// collection down to nothing (through the running daemon) keeps every
/// platform's manifest and blobs and the tag, and the pinned image is
/// still pulled by tag with its upstream gone; the pin survives a restart;
/// when a revalidation moves the tag, the pin follows it (the new image is
/// kept, the old one goes); once unpinned, it is evicted like the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_images_are_never_evicted_and_follow_their_tag() {
    let up = Fake::start(Behaviour::default()).await;
    let amd = Image::build(&[("amd64", &b"amd64 layer"[..])]);
    let arm = Image::build(&[("arm64", &b"arm64 layer"[..])]);
    for i in [&amd, &arm] {
        for b in i.blobs() {
            up.put_blob("app", b);
        }
        up.put_manifest("app", None, &i.media_type, &i.manifest);
    }
    let (list, list_digest) = index(OCI_INDEX, &[&amd, &arm]);
    up.put_manifest("app", Some("v1"), OCI_INDEX, &list);
    let other = Image::build(&[("other", &b"not pinned"[..])]);
    up.push_image("other", "v1", &other);

    let hosts = tempfile::tempdir().unwrap();
    write_hosts(
        hosts.path(),
        &[("reg.test", format!("server = \"{}\"\n", up.url()))],
    );
    let cache = tempfile::tempdir().unwrap();
    let config = "[cache]\nverify_rate = 0\ntag_ttl = \"0s\"\n";
    let bin = Binary::start_in(hosts.path(), Some(cache.path()), config, &[]).await;
    let port = bin.port;
    let c = cache.path();

    let text = ok(port, c, &["pin", "add", "reg.test/app:v1"]);
    assert!(text.contains("pinned reg.test/app:v1"), "{text}");
    landed(c, &[&amd, &arm]).await;
    ok(port, c, &["prefetch", "reg.test/other:v1"]);
    landed(c, &[&other]).await;
    let text = ok(port, c, &["pin", "ls"]);
    assert!(
        text.contains("reg.test/app:v1") && text.contains(&list_digest),
        "{text}"
    );
    assert!(
        text.contains("7 cached") && text.contains("0 missing"),
        "{text}"
    );

    let text = ok(port, c, &["cache", "gc", "--max-size", "0"]);
    let kept: u64 = text
        .split_once(" pinned kept")
        .and_then(|(before, _)| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(kept >= 8, "7 manifests and blobs and the tag: {text}");
    assert!(
        cached(c, &amd) && cached(c, &arm),
        "pinned blobs kept: {text}"
    );
    assert!(none_cached(c, &other), "unpinned blobs evicted: {text}");

    // With the upstream refusing everything, the pinned tag still pulls.
    up.set(|b| b.status = Some(http::StatusCode::SERVICE_UNAVAILABLE));
    let r = get(&format!(
        "http://127.0.0.1:{port}/v2/app/manifests/v1?ns=reg.test"
    ))
    .await;
    assert_eq!(r.status, http::StatusCode::OK, "offline by tag");
    assert_eq!(r.header("docker-content-digest"), list_digest);
    up.set(|b| b.status = None);

    // A restart keeps the pins.
    drop(bin);
    let bin = Binary::start_in(hosts.path(), Some(cache.path()), config, &[]).await;
    let port = bin.port;
    ok(port, c, &["cache", "gc", "--max-size", "0"]);
    assert!(cached(c, &amd) && cached(c, &arm), "kept across a restart");

    // The tag moves upstream; a pull revalidates it; the pin follows.
    let next = Image::build(&[("next", &b"v1 rebuilt"[..])]);
    up.push_image("app", "v1", &next);
    ok(port, c, &["prefetch", "reg.test/app:v1"]);
    landed(c, &[&next]).await;
    let text = ok(port, c, &["cache", "gc", "--max-size", "0"]);
    assert!(cached(c, &next), "the tag's new image is kept: {text}");
    assert!(
        none_cached(c, &amd) && none_cached(c, &arm),
        "the old one is not pinned any more: {text}"
    );

    let text = ok(port, c, &["pin", "rm", "reg.test/app:v1"]);
    assert!(text.contains("unpinned"), "{text}");
    ok(port, c, &["cache", "gc", "--max-size", "0"]);
    assert!(none_cached(c, &next), "evicted once unpinned");
    let (code, text) = tool(port, c, &["pin", "rm", "reg.test/app:v1"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("is not pinned"), "{text}");
}
