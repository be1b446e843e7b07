//! The layout of `src/` as `docs/ARCHITECTURE.md` describes it: no two modules of the library
//! use each other, directly or through others, so each layer reads top to bottom.
//!
//! A module's uses are the `crate::`, `super::` and `self::` paths in its file, and the child
//! modules it names in a `use`; unit tests at the end of a file (`#[cfg(test)] mod tests`) are
//! left out, as they are modules of their own. The `dedupe` binary is a crate of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module of the library, by its path, with its file's text.
fn modules() -> Result<BTreeMap<Module, String>, std::io::Error> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<Module, String>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name != "bin") {
                    walk(&path, base, out)?;
                }
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path.strip_prefix(base).unwrap_or(&path).with_extension("");
            let mut module: Module = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module
                .last()
                .is_some_and(|last| last == "mod" || last == "lib")
            {
                module.pop();
            }
            // A unit-test file of a module (`rules/tests.rs`) is that module's test module.
            if module.last().is_some_and(|last| last == "tests") {
                continue;
            }
            out.insert(module, std::fs::read_to_string(&path)?);
        }
        Ok(())
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&src, &src, &mut out)?;
    Ok(out)
}

/// The code of a file without comments and without its unit tests.
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let test_module = (trimmed.starts_with("#[cfg(test)]")
            || trimmed.starts_with("#[cfg(all(test"))
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"));
        if test_module {
            break;
        }
        let line = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The longest prefix of `path` that names a module.
fn resolve(modules: &BTreeMap<Module, String>, path: &[String]) -> Option<Module> {
    (0..=path.len())
        .rev()
        .map(|len| path[..len].to_vec())
        .find(|prefix| modules.contains_key(prefix))
}

/// The modules `module` uses.
fn uses(modules: &BTreeMap<Module, String>, module: &Module, text: &str) -> BTreeSet<Module> {
    let code = code(text);
    let mut used = BTreeSet::new();
    for (at, _) in code.match_indices("::") {
        // Only a path's first `::` counts: the one after `crate`, `super` or `self`. The path
        // runs on through identifiers and `::`, and one level of `{a, b::c}`.
        let start = code[..at]
            .rfind(|c: char| !(is_ident(c) || c == ':'))
            .map_or(0, |i| i + 1);
        let head = &code[start..at];
        if !matches!(head, "crate" | "super" | "self") {
            continue;
        }
        let base: Module = match head {
            "crate" => Vec::new(),
            "super" => module[..module.len().saturating_sub(1)].to_vec(),
            _ => module.clone(),
        };
        let rest = &code[at + 2..];
        let end = rest
            .find(|c: char| !(is_ident(c) || c == ':'))
            .unwrap_or(rest.len());
        let mut path = base.clone();
        path.extend(
            rest[..end]
                .split("::")
                .filter(|part| !part.is_empty())
                .map(String::from),
        );
        if let Some(group) = rest[end..].strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let first = item.trim().split("::").next().unwrap_or("").trim();
                let first = first.split_whitespace().next().unwrap_or("");
                if first.is_empty() || first == "self" {
                    continue;
                }
                let mut item_path = path.clone();
                item_path.push(first.to_string());
                used.extend(resolve(modules, &item_path));
            }
        }
        used.extend(resolve(modules, &path));
    }
    // `use child::...` of a child module declared in this one.
    for line in code.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix("pub ").unwrap_or(line);
        let line = line.strip_prefix("pub(crate) ").unwrap_or(line);
        if let Some(rest) = line.strip_prefix("use ") {
            let first = rest.split("::").next().unwrap_or("");
            let mut child = module.clone();
            child.push(first.to_string());
            if modules.contains_key(&child) {
                used.insert(child);
            }
        }
    }
    used.remove(module);
    used.remove(&Vec::new());
    used
}

/// A cycle among `graph`'s modules, if there is one.
fn find_cycle(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        state: &mut BTreeMap<Module, bool>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        match state.get(node) {
            Some(true) => {
                let from = stack.iter().position(|m| m == node).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(node.clone());
                return Some(cycle);
            }
            Some(false) => return None,
            None => {}
        }
        state.insert(node.clone(), true);
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, state, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        state.insert(node.clone(), false);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(node, graph, &mut state, &mut stack) {
            return Some(cycle);
        }
    }
    None
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_string()
    } else {
        module.join("::")
    }
}

#[test]
fn no_two_modules_use_each_other() -> Result<(), Box<dyn std::error::Error>> {
    let modules = modules()?;
    assert!(modules.len() > 20, "found only {} modules", modules.len());
    let graph: BTreeMap<Module, BTreeSet<Module>> = modules
        .iter()
        .map(|(module, text)| (module.clone(), uses(&modules, module, text)))
        .collect();
    // The checker sees what it should: the store uses the rules, and the engine its storage.
    let store: Module = vec!["store".into()];
    assert!(graph[&store].contains(&vec!["rules".to_string(), "ops".to_string()]));
    let engine: Module = vec!["redb".into()];
    assert!(graph[&engine].contains(&vec!["redb".to_string(), "storage".to_string()]));
    if let Some(cycle) = find_cycle(&graph) {
        let path: Vec<String> = cycle.iter().map(name).collect();
        return Err(format!("modules use each other: {}", path.join(" -> ")).into());
    }
    Ok(())
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let a: Module = vec!["a".into()];
    let b: Module = vec!["b".into()];
    let c: Module = vec!["c".into()];
    let mut graph = BTreeMap::from([
        (a.clone(), BTreeSet::from([b.clone()])),
        (b.clone(), BTreeSet::from([c.clone()])),
        (c.clone(), BTreeSet::new()),
    ]);
    assert_eq!(find_cycle(&graph), None);
    graph.insert(c.clone(), BTreeSet::from([a.clone()]));
    assert_eq!(find_cycle(&graph), Some(vec![a.clone(), b, c, a]));
}
