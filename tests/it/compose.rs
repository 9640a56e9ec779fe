//! docker-compose.yml passes `docker-compose config -q` (Debian package
//! `docker-compose`; no Docker engine needed) and names only files that
//! exist in the repo, a Dockerfile for what it builds, and no host port twice.

use std::collections::HashSet;
use std::process::Command;

use super::util::root;

#[test]
fn compose_file_is_valid_and_names_only_files_in_the_repo() {
    let root = root();
    let out = Command::new("docker-compose")
        .current_dir(&root)
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run docker-compose (Debian package docker-compose): {e}")
        });
    assert!(
        out.status.success(),
        "docker-compose config -q: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = doc["services"].as_mapping().expect("services");
    for want in [
        "kafka",
        "redis",
        "topics",
        "streamscore",
        "generator",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(want), "service {want} missing");
    }
    let mut host_ports = HashSet::new();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if svc.get("build").is_some() {
            assert!(
                root.join("Dockerfile").is_file(),
                "{name} builds without a Dockerfile"
            );
        } else {
            let image = svc["image"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no image"));
            assert!(image.contains(':'), "{name}: pin the image tag ({image})");
        }
        for v in svc["volumes"]
            .as_sequence()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            assert!(
                src.starts_with("./"),
                "{name}: volume {src} is not a repo path"
            );
            assert!(
                root.join(&src[2..]).exists(),
                "{name}: {src} does not exist"
            );
        }
        for p in svc["ports"]
            .as_sequence()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let host = p.as_str().unwrap().split(':').next().unwrap().to_string();
            assert!(
                host_ports.insert(host.clone()),
                "host port {host} published twice"
            );
        }
    }
}
