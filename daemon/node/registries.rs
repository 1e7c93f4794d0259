//! rke2/k3s `registries.yaml`: a `"*"` mirror sends every registry to
//! nodemirror (rke2/k3s write containerd's hosts.toml from it).

use serde_yaml_ng::{Mapping, Value};

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
    fn empty_and_rendered_files_agree() {
        let merged = merge("", "http://127.0.0.1:5780").unwrap().unwrap();
        let a: Value = serde_yaml_ng::from_str(&merged).unwrap();
        let b: Value = serde_yaml_ng::from_str(&render("http://127.0.0.1:5780")).unwrap();
        assert_eq!(a, b);
        assert!(merge("- a list", "x").is_err());
    }
}
