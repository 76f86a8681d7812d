//! The shape of the house, checked: which crate may depend on what, no
//! module cycles inside any crate, typed errors in library code.
//!
//! The module graph is read from the sources: an edge `a → b` for every
//! `crate::b` a file of top-level module `a` names in code (comments do not
//! count; tests do, since a test module is part of its module).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

const CRATES: [&str; 5] = ["proto", "policy", "privacy", "audit", "connector"];
const LIBRARIES: [&str; 4] = ["proto", "policy", "privacy", "audit"];

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The file without comments (line comments and doc comments).
fn code(text: &str) -> String {
    text.lines()
        .map(|line| match line.trim_start().starts_with("//") {
            true => "",
            false => line.split(" //").next().unwrap_or(""),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers right after `crate::`, including each item of `crate::{a, b::c}`.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(|item| ident(item.trim())));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| m.starts_with(|c: char| c.is_ascii_lowercase()));
    out
}

/// Top-level module → the top-level modules it names, with the files.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in rust_files(src) {
        let relative = file
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .to_string();
        if relative == "lib.rs" || relative == "main.rs" || relative.starts_with("bin/") {
            continue;
        }
        let module = relative
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        for target in crate_references(&code(&text)) {
            if target != module {
                graph
                    .entry(module.clone())
                    .or_default()
                    .entry(target)
                    .or_default()
                    .insert(relative.clone());
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one (depth-first search).
fn cycle_from(
    graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    start: &str,
) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).map(|e| e.keys()).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn no_crate_has_a_module_cycle() {
    let mut found = Vec::new();
    for krate in CRATES {
        let graph = module_graph(&workspace().join(krate).join("src"));
        let mut reported = BTreeSet::new();
        for module in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, module) {
                let members: BTreeSet<String> = cycle.iter().cloned().collect();
                if !reported.insert(members) {
                    continue;
                }
                let edges: Vec<String> = cycle
                    .iter()
                    .zip(cycle.iter().cycle().skip(1))
                    .map(|(a, b)| format!("{a} → {b} ({:?})", graph[a][b]))
                    .collect();
                found.push(format!("{krate}: {}", edges.join(", ")));
            }
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.rs"), "use crate::b::X; // crate::c\n").unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    std::fs::write(
        dir.path().join("b").join("inner.rs"),
        "fn f() { crate::{a::y, c}; }",
    )
    .unwrap();
    std::fs::write(dir.path().join("c.rs"), "/// crate::a\n").unwrap();
    let graph = module_graph(dir.path());
    assert!(cycle_from(&graph, "a").is_some(), "{graph:?}");
    assert!(cycle_from(&graph, "c").is_none(), "{graph:?}");
}

/// The `[dependencies]` table of a crate's manifest: names only.
fn dependencies(krate: &str) -> BTreeSet<String> {
    let manifest = std::fs::read_to_string(workspace().join(krate).join("Cargo.toml")).unwrap();
    let table: toml::Table = toml::from_str(&manifest).unwrap();
    table
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn libraries_never_reach_up_and_the_audit_crate_stands_alone() {
    let daemon_parts = [
        "sluice",
        "tonic",
        "tonic-prost",
        "tokio",
        "anyhow",
        "datafusion",
    ];
    let audit = dependencies("audit");
    for part in daemon_parts
        .iter()
        .chain(&["sluice-policy", "sluice-privacy", "arrow"])
    {
        assert!(!audit.contains(*part), "audit depends on {part}: {audit:?}");
    }
    let privacy = dependencies("privacy");
    for part in ["sluice", "tonic", "tonic-prost", "anyhow", "sluice-audit"] {
        assert!(
            !privacy.contains(part),
            "privacy depends on {part}: {privacy:?}"
        );
    }
    let policy = dependencies("policy");
    for part in [
        "sluice",
        "tonic",
        "anyhow",
        "sluice-privacy",
        "sluice-audit",
    ] {
        assert!(
            !policy.contains(part),
            "policy depends on {part}: {policy:?}"
        );
    }
    assert!(
        dependencies("connector").is_superset(&BTreeSet::from(
            [
                "sluice-policy",
                "sluice-privacy",
                "sluice-audit",
                "sluice-proto"
            ]
            .map(String::from)
        ))
    );
}

#[test]
fn library_code_returns_typed_errors() {
    let mut found = Vec::new();
    for krate in LIBRARIES.iter().chain(&["connector"]) {
        for file in rust_files(&workspace().join(krate).join("src")) {
            let relative = file
                .strip_prefix(workspace())
                .unwrap()
                .display()
                .to_string();
            let text = code(&std::fs::read_to_string(&file).unwrap());
            for (n, line) in text.lines().enumerate() {
                let string_error = line.contains("Result<")
                    && line.contains(", String>")
                    && !line.contains("HashMap<");
                let anyhow = LIBRARIES.contains(krate) && line.contains("anyhow");
                if string_error || anyhow {
                    found.push(format!("{relative}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "untyped errors:\n{}", found.join("\n"));
}
