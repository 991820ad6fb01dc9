//! Tidy: the repository's structural invariants, checked on every `make test` (the model is
//! rust-analyzer's `tidy` test). Each rule reads the source tree as text; a rule broken by a
//! change fails here with the file and the reason, instead of drifting until a review.
//!
//! - `async_nats` is used only in `origin/src/{store,bus,bridge}/` and the start-up wiring
//!   (`server.rs`): handlers see the `KvStore` and `Bus` traits, never a NATS client.
//! - `reqwest` is used only by the NoETL client (`noetl.rs`), the JWKS fetcher
//!   (`auth/jwks.rs`) and the OTLP exporter's client (`otel.rs`): one pool and one timeout
//!   policy per upstream.
//! - Only the composition root (`app.rs`) and start-up (`server.rs`, `main.rs`) import the
//!   `app` and `state` modules: a handler module gets its own substate and nothing else.
//! - No import cycle among the origin's top-level modules (`crate::x` references in code).
//! - Every Rust file starts with a `//!` module doc.
//! - Every file under a crate's `src/` is declared as a module (no orphan file), and the
//!   module map in each `lib.rs` doc names exactly the modules it declares.
//! - ARCHITECTURE.md's code map names exactly the origin's, shared's and the edge's source
//!   files: each as a backticked path relative to its crate's `src/`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The workspace root (this crate is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, as paths relative to `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(base, &p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p.strip_prefix(base).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

/// A file's code with every `//` comment (doc comments included) removed.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            // Keep `://` inside string literals such as URLs.
            Some(i) if !line[..i].ends_with(':') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// True if `code` names `ident` as a whole path segment.
fn mentions(code: &str, ident: &str) -> bool {
    code.match_indices(ident).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + ident.len()..].chars().next();
        let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        boundary(before) && boundary(after)
    })
}

/// The top-level module of an origin source file (`auth/caller.rs` → `auth`).
fn top_module(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules a piece of code refers to through `crate::` paths, including
/// `use crate::{a, b::c}` groups.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue; // e.g. `gateway_crate::`
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            let mut at_item_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        at_item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 && at_item_start {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        refs.insert(std::mem::take(&mut item));
                        at_item_start = false;
                    }
                }
            }
            if !item.is_empty() {
                refs.insert(item);
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                refs.insert(ident);
            }
        }
    }
    refs
}

/// The origin's source files with their code (comments removed), relative to `origin/src`.
fn origin_sources() -> Vec<(PathBuf, String)> {
    let src = root().join("origin/src");
    rust_files(&src)
        .into_iter()
        .map(|rel| {
            let text = fs::read_to_string(src.join(&rel)).unwrap();
            (rel, code_of(&text))
        })
        .collect()
}

/// Files (relative to `origin/src`) that use `ident` in code but are not under `allowed`
/// (a directory prefix ending in `/`, or a file).
fn used_outside(ident: &str, allowed: &[&str]) -> Vec<String> {
    origin_sources()
        .into_iter()
        .filter(|(_, code)| mentions(code, ident))
        .map(|(rel, _)| rel.to_string_lossy().into_owned())
        .filter(|rel| {
            !allowed
                .iter()
                .any(|a| rel == a || (a.ends_with('/') && rel.starts_with(a)))
        })
        .collect()
}

#[test]
fn async_nats_stays_in_the_store_the_bus_the_bridge_and_start_up() {
    let offenders = used_outside("async_nats", &["store/", "bus/", "bridge/", "server.rs"]);
    assert!(
        offenders.is_empty(),
        "async_nats used outside store/, bus/, bridge/ and server.rs: {offenders:?} — \
         handlers and services take the KvStore/Bus traits"
    );
}

#[test]
fn reqwest_stays_in_the_noetl_client_and_the_jwks_fetcher() {
    // upstream.rs: the registered backend services' clients (one pool per service), the
    // generic proxy's and the question outcomes' only way out.
    // otel.rs: the OTLP exporter's HTTP client is the third upstream (the trace collector).
    // Giving it the origin's reqwest keeps one HTTP client version and TLS stack in the
    // binary (the exporter's own reqwest client is another major version); it talks to the
    // collector only, never to NoETL.
    let offenders = used_outside(
        "reqwest",
        &["noetl.rs", "auth/jwks.rs", "otel.rs", "upstream.rs"],
    );
    assert!(
        offenders.is_empty(),
        "reqwest used outside noetl.rs, auth/jwks.rs, otel.rs and upstream.rs: {offenders:?} — \
         call NoETL through NoetlClient and services through upstream::ServiceClient"
    );
}

#[test]
fn only_the_composition_root_and_start_up_import_app_and_state() {
    let mut offenders = Vec::new();
    for (rel, code) in origin_sources() {
        let rel_s = rel.to_string_lossy().into_owned();
        let refs = crate_refs(&code);
        for module in ["app", "state"] {
            let allowed = matches!(
                rel_s.as_str(),
                "app.rs" | "server.rs" | "main.rs" | "lib.rs"
            ) || rel_s == format!("{module}.rs");
            let via_lib = mentions(&code, &format!("origin::{module}"));
            if !allowed && (refs.contains(module) || via_lib) {
                offenders.push(format!("{rel_s} imports {module}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "handler modules must not import app or state (take your own substate): {offenders:?}"
    );
}

/// The cycles of a directed graph (each as the list of nodes of one strongly connected
/// component with more than one node), by Tarjan's algorithm.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    component.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.out.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// The origin's module graph: top-level module → the top-level modules its code names.
fn origin_module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let sources = origin_sources();
    let modules: BTreeSet<String> = sources
        .iter()
        .map(|(rel, _)| top_module(rel))
        .filter(|m| m != "lib" && m != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for (rel, code) in &sources {
        let from = top_module(rel);
        if !modules.contains(&from) {
            continue;
        }
        for to in crate_refs(code) {
            if to != from && modules.contains(&to) {
                graph.get_mut(&from).unwrap().insert(to);
            }
        }
    }
    graph
}

#[test]
fn the_origin_modules_form_no_import_cycle() {
    let graph = origin_module_graph();
    assert!(
        graph.len() > 10 && graph["app"].contains("auth") && graph["server"].contains("app"),
        "the graph was read: {graph:?}"
    );
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "import cycles among origin modules (each list is one strongly connected set): \
         {found:?}\nthe graph: {graph:#?}"
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    g.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    g.insert("d".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycles(&g), vec![vec!["a", "b", "c"]]);
    g.get_mut("c").unwrap().clear();
    assert!(cycles(&g).is_empty());
    assert_eq!(
        crate_refs("use crate::{auth::{self, Caller}, error::AppError};\nlet x = crate::hub::Hub;"),
        BTreeSet::from(["auth".to_owned(), "error".to_owned(), "hub".to_owned()])
    );
}

/// The crates whose sources the documentation rules cover: (crate dir, its roots).
const CRATES: [(&str, &[&str]); 4] = [
    ("origin/src", &["lib.rs", "main.rs"]),
    ("shared/src", &["lib.rs"]),
    ("edge-worker/src", &["lib.rs"]),
    ("tests/src", &["lib.rs"]),
];

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let root = root();
    let mut missing = Vec::new();
    let dirs = [
        "origin/src",
        "origin/tests",
        "shared/src",
        "edge-worker/src",
        "tests/src",
        "tests/tests",
    ];
    for dir in dirs {
        let base = root.join(dir);
        if !base.exists() {
            continue;
        }
        for rel in rust_files(&base) {
            let text = fs::read_to_string(base.join(&rel)).unwrap();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            if !first.starts_with("//!") {
                missing.push(format!("{dir}/{}", rel.display()));
            }
        }
    }
    assert!(missing.is_empty(), "files without a `//!` doc: {missing:?}");
}

/// The modules a file declares (`mod x;` / `pub mod x;` / `pub(crate) mod x;`, not inline
/// `mod x { … }`).
fn declared_modules(text: &str) -> BTreeSet<String> {
    code_of(text)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub(crate) ")
                .or_else(|| l.strip_prefix("pub "))
                .unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_owned())
        })
        .collect()
}

#[test]
fn every_source_file_is_a_declared_module() {
    let root = root();
    let mut orphans = Vec::new();
    for (dir, roots) in CRATES {
        let base = root.join(dir);
        for rel in rust_files(&base) {
            let rel_s = rel.to_string_lossy().into_owned();
            if roots.contains(&rel_s.as_str()) || rel_s.starts_with("bin/") {
                continue; // crate roots and binaries (each its own root)
            }
            let parent_dir = rel.parent().unwrap();
            let stem = rel.file_stem().unwrap().to_string_lossy().into_owned();
            let (declaring, name): (Vec<PathBuf>, String) = if stem == "mod" {
                let name = parent_dir
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                let up = parent_dir.parent().unwrap();
                (parents_of(up, roots), name)
            } else {
                (parents_of(parent_dir, roots), stem)
            };
            let declared = declaring.iter().any(|p| {
                fs::read_to_string(base.join(p))
                    .map(|t| declared_modules(&t).contains(&name))
                    .unwrap_or(false)
            });
            if !declared {
                orphans.push(format!("{dir}/{rel_s}"));
            }
        }
    }
    assert!(
        orphans.is_empty(),
        "files no module declares (dead code): {orphans:?}"
    );
}

/// The files that may declare a module living in `dir` (relative to a crate's src).
fn parents_of(dir: &Path, roots: &[&str]) -> Vec<PathBuf> {
    if dir.as_os_str().is_empty() {
        roots.iter().map(PathBuf::from).collect()
    } else if dir.starts_with("bin") {
        // A directory binary: `bin/name/main.rs` declares its siblings.
        vec![dir.join("main.rs")]
    } else {
        vec![dir.join("mod.rs"), dir.with_extension("rs")]
    }
}

/// The names of the intra-doc links (`[`name`]`, first path segment) in a file's `//!` doc.
fn module_map_links(text: &str) -> BTreeSet<String> {
    let doc: String = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    for (i, _) in doc.match_indices("[`") {
        let rest = &doc[i + 2..];
        let Some(end) = rest.find("`]") else { continue };
        let name = &rest[..end];
        let first = name.split("::").next().unwrap_or("");
        if !first.is_empty()
            && first
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            out.insert(first.to_owned());
        }
    }
    out
}

#[test]
fn each_lib_rs_module_map_names_exactly_its_modules() {
    let root = root();
    let mut problems = Vec::new();
    for lib in [
        "origin/src/lib.rs",
        "shared/src/lib.rs",
        "edge-worker/src/lib.rs",
    ] {
        let text = fs::read_to_string(root.join(lib)).unwrap();
        let declared = declared_modules(&text);
        let linked = module_map_links(&text);
        for m in declared.difference(&linked) {
            problems.push(format!("{lib}: module `{m}` is not in the module map"));
        }
        for m in linked.difference(&declared) {
            problems.push(format!(
                "{lib}: the module map names `{m}`, which is not a module"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The backticked `…rs` paths in one bullet of ARCHITECTURE.md's code map.
fn code_map_paths(architecture: &str, bullet: &str) -> BTreeSet<String> {
    let section = architecture
        .split("\n## ")
        .find(|s| s.starts_with("Code map"))
        .expect("ARCHITECTURE.md has a `## Code map` section");
    let start = section
        .find(&format!("- `{bullet}`"))
        .unwrap_or_else(|| panic!("the code map has a `- `{bullet}`` bullet"));
    let rest = &section[start + 2..];
    let end = rest.find("\n- ").unwrap_or(rest.len());
    let text = &rest[..end];
    let mut out = BTreeSet::new();
    let mut parts = text.split('`');
    parts.next();
    while let Some(inside) = parts.next() {
        if inside.ends_with(".rs") {
            out.insert(inside.to_owned());
        }
        parts.next();
    }
    out
}

#[test]
fn architecture_code_map_names_exactly_the_source_files() {
    let root = root();
    let architecture = fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut problems = Vec::new();
    for dir in ["origin/src", "shared/src", "edge-worker/src"] {
        let bullet = format!("{dir}/");
        let named = code_map_paths(&architecture, &bullet);
        let on_disk: BTreeSet<String> = rust_files(&root.join(dir))
            .into_iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        for f in on_disk.difference(&named) {
            problems.push(format!("{dir}/{f} is not in ARCHITECTURE.md's code map"));
        }
        for f in named.difference(&on_disk) {
            problems.push(format!(
                "ARCHITECTURE.md's code map names {dir}/{f}, which does not exist"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
