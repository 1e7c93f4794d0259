//! Replacing a file so that a crash at any moment leaves either the old
//! content or the new, never a mix: write a temporary file, keep the
//! target's mode and owner, fsync it, rename it over the target, fsync the
//! folder. Every file the daemon and its installers write goes through here.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` atomically and durably, the temporary file
/// beside it. Creates the folder when missing.
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_via(parent(path), path, bytes)
}

/// Like [`write`], with the temporary file in `temp_dir` (which must be on
/// the same filesystem): the cache keeps every unfinished file in its
/// `tmp/`, which it empties at start.
pub fn write_via(temp_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(temp_dir)?;
    let (mut file, tmp) = temp_file(temp_dir, path)?;
    let written = (|| {
        if let Ok(meta) = fs::metadata(path) {
            keep_mode_and_owner(&file, &meta)?;
        }
        file.write_all(bytes)?;
        file.sync_all()
    })();
    match written {
        Ok(()) => rename(&tmp, path),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Moves a complete, synced file into place (creating the folder) and
/// syncs the folder, so the entry survives a crash once this returns. On
/// failure `tmp` is removed.
pub fn rename(tmp: &Path, dest: &Path) -> io::Result<()> {
    let dir = parent(dest);
    let result = fs::create_dir_all(dir).and_then(|_| fs::rename(tmp, dest));
    if let Err(e) = result {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    File::open(dir).and_then(|d| d.sync_all())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A new file in `dir`, named after `target` and unique in this process.
fn temp_file(dir: &Path, target: &Path) -> io::Result<(File, PathBuf)> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    Ok((file, tmp))
}

fn keep_mode_and_owner(file: &File, meta: &fs::Metadata) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    match std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid())) {
        // Only root may give a file away; a user rewriting a file they may
        // write but do not own keeps their own ownership.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_keeping_the_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/conf.toml");
        write(&p, b"one").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
        let left: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the target remains");
    }

    #[test]
    fn temp_file_elsewhere_and_failures_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        let p = dir.path().join("a/b");
        write_via(&tmp, &p, b"x").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"x");
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
        // The target is a folder: the rename fails and the temp file goes.
        fs::create_dir_all(dir.path().join("c/d")).unwrap();
        fs::write(dir.path().join("c/d/f"), b"").unwrap();
        assert!(write_via(&tmp, &dir.path().join("c/d"), b"y").is_err());
        assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
    }
}
