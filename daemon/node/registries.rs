//! rke2/k3s `registries.yaml`: a `"*"` mirror sends every registry to
//! nodemirror (rke2/k3s write containerd's hosts.toml from it).

use std::io;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

/// Why a registries.yaml could not be merged.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// What [`merge_file`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Merged {
    /// The mirror was already the first `"*"` endpoint.
    Unchanged,
    /// The file was written; the original, if any, is kept at `backup`
    /// (the first original: a later merge does not overwrite it).
    Updated { backup: Option<PathBuf> },
}

/// Adds `mirror` to the registries.yaml at `path` (creating it), keeping
/// the first original beside it as `registries.yaml.nodemirror-orig`.
pub fn merge_file(path: &Path, mirror: &str) -> Result<Merged, MergeError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MergeError::Io { path, source }
    };
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(path)(e)),
    };
    let merged = if existing.is_empty() {
        Some(render(mirror))
    } else {
        merge(&existing, mirror).map_err(|message| MergeError::Invalid {
            path: path.to_path_buf(),
            message,
        })?
    };
    let Some(text) = merged else {
        return Ok(Merged::Unchanged);
    };
    let backup = path.with_extension("yaml.nodemirror-orig");
    let kept = if existing.is_empty() {
        None
    } else {
        if !backup.exists() {
            crate::atomic::write(&backup, existing.as_bytes()).map_err(io_err(&backup))?;
        }
        Some(backup)
    };
    crate::atomic::write(path, text.as_bytes()).map_err(io_err(path))?;
    Ok(Merged::Updated { backup: kept })
}

/// The registries.yaml that points every registry at `mirror`.
pub fn render(mirror: &str) -> String {
    format!(
        "# Every registry goes through the node-local mirror first (nodemirror).\n\
         mirrors:\n  \"*\":\n    endpoint:\n      - \"{mirror}\"\n"
    )
}

/// Adds `mirror` as the first `"*"` endpoint of an existing registries.yaml,
/// keeping every other setting (YAML comments are not kept). `None` when it
/// is already there.
pub fn merge(existing: &str, mirror: &str) -> Result<Option<String>, String> {
    let mut doc: Value = if existing.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_yaml_ng::from_str(existing).map_err(|e| e.to_string())?
    };
    let root = doc
        .as_mapping_mut()
        .ok_or("the top level is not a mapping")?;
    let mirrors = root
        .entry(Value::from("mirrors"))
        .or_insert_with(|| Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or("`mirrors` is not a mapping")?;
    let star = mirrors
        .entry(Value::from("*"))
        .or_insert_with(|| Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or("`mirrors.\"*\"` is not a mapping")?;
    let endpoints = star
        .entry(Value::from("endpoint"))
        .or_insert_with(|| Value::Sequence(Vec::new()))
        .as_sequence_mut()
        .ok_or("`mirrors.\"*\".endpoint` is not a list")?;
    if endpoints.iter().any(|e| e.as_str() == Some(mirror)) {
        return Ok(None);
    }
    endpoints.insert(0, Value::from(mirror));
    serde_yaml_ng::to_string(&doc)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_first_and_keeps_the_rest() {
        let existing = "mirrors:\n  docker.io:\n    endpoint:\n      - \"https://corp.example\"\n  \"*\":\n    endpoint:\n      - \"https://fallback.example\"\nconfigs:\n  corp.example:\n    auth:\n      username: u\n";
        let out = merge(existing, "http://127.0.0.1:5780").unwrap().unwrap();
        let v: Value = serde_yaml_ng::from_str(&out).unwrap();
        let star = &v["mirrors"]["*"]["endpoint"];
        assert_eq!(star[0].as_str(), Some("http://127.0.0.1:5780"));
        assert_eq!(star[1].as_str(), Some("https://fallback.example"));
        assert_eq!(
            v["mirrors"]["docker.io"]["endpoint"][0].as_str(),
            Some("https://corp.example")
        );
        assert_eq!(
            v["configs"]["corp.example"]["auth"]["username"].as_str(),
            Some("u")
        );
        assert_eq!(
            merge(&out, "http://127.0.0.1:5780").unwrap(),
            None,
            "idempotent"
        );
    }

    #[test]
    fn merging_a_file_keeps_the_first_original() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("registries.yaml");
        assert_eq!(
            merge_file(&p, "http://m:1").unwrap(),
            Merged::Updated { backup: None }
        );
        assert_eq!(merge_file(&p, "http://m:1").unwrap(), Merged::Unchanged);
        let first = std::fs::read_to_string(&p).unwrap();
        let backup = dir.path().join("registries.yaml.nodemirror-orig");
        assert_eq!(
            merge_file(&p, "http://m:2").unwrap(),
            Merged::Updated {
                backup: Some(backup.clone())
            }
        );
        merge_file(&p, "http://m:3").unwrap();
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), first);
        std::fs::write(&p, "- not a mapping\n").unwrap();
        assert!(matches!(
            merge_file(&p, "http://m:4"),
            Err(MergeError::Invalid { .. })
        ));
    }

    #[test]
    fn empty_and_rendered_files_agree() {
        let merged = merge("", "http://127.0.0.1:5780").unwrap().unwrap();
        let a: Value = serde_yaml_ng::from_str(&merged).unwrap();
        let b: Value = serde_yaml_ng::from_str(&render("http://127.0.0.1:5780")).unwrap();
        assert_eq!(a, b);
        assert!(merge("- a list", "x").is_err());
    }
}
