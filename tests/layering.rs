//! The parts of `src/` keep their layering, as their top comments say:
//! no part uses a part that uses it, none uses what it must know nothing
//! of, and within a folder no two files use each other.
//!
//! Read from the source as written (`crate::part` and `super::file`
//! paths), so that a change that breaks a rule fails here with the files
//! that break it named, not in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each part must not use, from its top comment.
const MUST_NOT_USE: &[(&str, &[&str])] = &[
    (
        "config",
        &[
            "bus", "cluster", "delivery", "edge", "node", "plugin", "tenant",
        ],
    ),
    // "Knows nothing of sockets or the bus".
    (
        "plugin",
        &["bus", "cluster", "delivery", "edge", "node", "tenant"],
    ),
    // Engines carry opaque records: no tenant, plugin or cluster logic.
    (
        "bus",
        &["cluster", "delivery", "edge", "node", "plugin", "tenant"],
    ),
    ("tenant", &["bus", "cluster", "delivery", "edge", "node"]),
    ("delivery", &["cluster", "edge", "node"]),
    // "Knows nothing of HTTP, sockets or bus engines".
    ("cluster", &["edge", "node"]),
    ("edge", &["node"]),
    // The protocol's rules: "knows nothing of sockets, the bus or tenants".
    (
        "pusher",
        &[
            "bus", "cluster", "delivery", "edge", "node", "plugin", "tenant",
        ],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The first path segment after each `prefix` in `text` (`crate::bus::X`
/// gives `bus`); a group `prefix{a, b::c}` gives each of its members'.
fn names_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(prefix) {
        rest = &rest[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for member in group[..end].split(',') {
                let name = member.trim().split("::").next().unwrap_or("");
                names.insert(name.to_owned());
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names.retain(|name| !name.is_empty() && name != "self");
    names
}

/// The code of `path`: without its comments (a doc link uses nothing)
/// and its tests (`#[cfg(test)]` onwards, which may use anything).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text,
    };
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which part a file of `src/` belongs to (`edge/ws/mod.rs` → `edge`).
fn part_of(path: &Path) -> String {
    let relative = path.strip_prefix(src()).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_owned()
}

/// A cycle in `graph`, if it has one, as the nodes along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_part_uses_a_part_that_uses_it_nor_one_it_must_know_nothing_of() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let parts: BTreeSet<String> = files.iter().map(|f| part_of(f)).collect();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut where_used: BTreeMap<(String, String), PathBuf> = BTreeMap::new();
    for file in &files {
        let part = part_of(file);
        if part == "main" || part == "lib" {
            continue;
        }
        for used in names_after(&code_of(file), "crate::") {
            if used != part && parts.contains(&used) {
                where_used.insert((part.clone(), used.clone()), file.clone());
                uses.entry(part.clone()).or_default().insert(used);
            }
        }
    }
    assert_eq!(
        find_cycle(&uses),
        None,
        "parts that use each other (in a circle): {uses:#?}"
    );
    let mut broken = Vec::new();
    for (part, forbidden) in MUST_NOT_USE {
        for used in uses.get(*part).into_iter().flatten() {
            if forbidden.contains(&used.as_str()) {
                let file = &where_used[&(part.to_string(), used.clone())];
                broken.push(format!("{part} uses {used} ({})", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn within_a_folder_no_two_files_use_each_other() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut folders: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for file in files {
        folders
            .entry(file.parent().unwrap().to_path_buf())
            .or_default()
            .push(file);
    }
    for (folder, files) in folders {
        // A folder's mod.rs (or lib.rs, main.rs) is its parent, which its
        // files may use and which declares them: not a sibling.
        let siblings: BTreeMap<String, &PathBuf> = files
            .iter()
            .filter_map(|file| {
                let stem = file.file_stem()?.to_string_lossy().into_owned();
                (!["mod", "lib", "main"].contains(&stem.as_str())).then_some((stem, file))
            })
            .collect();
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, file) in &siblings {
            let code = code_of(file);
            let used: BTreeSet<String> = names_after(&code, "super::")
                .into_iter()
                .filter(|used| used != name && siblings.contains_key(used))
                .collect();
            graph.insert(name.clone(), used);
        }
        assert_eq!(
            find_cycle(&graph),
            None,
            "files of {} that use each other: {graph:#?}",
            folder.display()
        );
    }
}

#[test]
fn the_checks_see_a_circle_when_there_is_one() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(n, e)| (n.to_owned(), e.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        names_after("use super::{admission, connection::X};", "super::"),
        ["admission".to_owned(), "connection".to_owned()].into()
    );
}
