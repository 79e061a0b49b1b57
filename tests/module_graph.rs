//! The workspace's import graph, read from the sources: imports run one way down the layers that
//! docs/ARCHITECTURE.md draws, and no files import each other, directly or round a longer cycle.
//! Review misses a `use` that goes the wrong way; this does not.
//!
//! File A depends on file B when code in A names an item defined in B: through `use`, or a path
//! (`crate::x::y`, `super::y`, `child::y`). Re-exports are followed to the file that defines the
//! item, and a `pub use` counts for its own file only when that file's code uses the name: a module
//! root that re-exports its children does not thereby depend on them.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The library's top-level modules from top to bottom: a module may import only ones below it.
/// `lib.rs` (the crate root: re-exports and the logging set-up) sits above them all.
const LAYERS: &[&str] = &[
    "",
    "ffi",
    "engine",
    "transport",
    "cuda",
    "ncclnet",
    "sys",
    "threads",
    "config",
    "trace",
    "error",
    "proto",
    "host_memory",
];

#[test]
fn imports_run_down_the_layers() {
    let graph = Graph::of_crate(&root().join("src"));
    let rank = |file: &str| {
        let top = graph.top_module(file);
        LAYERS.iter().position(|l| *l == top).unwrap_or_else(|| panic!("{file}: module {top:?} has no layer"))
    };
    let upward: Vec<String> =
        graph.edges().filter(|(from, to)| rank(from) > rank(to)).map(|(from, to)| format!("{from} -> {to}")).collect();
    assert!(upward.is_empty(), "imports that run up the layers of docs/ARCHITECTURE.md:\n{}", upward.join("\n"));
}

/// The modules the crate root makes public: the C ABI and the workspace's own `internal` (hidden,
/// no API). Every other module is `pub(crate)` and reaches users only as the items the root
/// re-exports, so the API stays what docs/ARCHITECTURE.md lists; a new public module, or a root
/// `pub use` of a whole module, widens it and must be agreed here first.
const PUBLIC_MODULES: &[&str] = &["ffi", "internal"];

#[test]
fn the_crate_root_exposes_only_the_agreed_modules() {
    let toks = lex(&std::fs::read_to_string(root().join("src/lib.rs")).unwrap());
    let pub_at = |i: usize| i > 0 && toks[i - 1] == Tok::Ident("pub".to_owned());
    let mut public = Vec::new();
    let mut re_exported = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => depth -= 1,
            Tok::Ident(w) if depth == 0 && w == "mod" && pub_at(i) => {
                let Some(Tok::Ident(name)) = toks.get(i + 1) else { panic!("lib.rs: `pub mod` without a name") };
                public.push(name.clone());
            }
            Tok::Ident(w) if depth == 0 && w == "use" && pub_at(i) => {
                let mut names = Vec::new();
                i = use_tree(&toks, i + 1, Vec::new(), &mut names);
                re_exported.extend(names);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    public.sort();
    assert_eq!(public, PUBLIC_MODULES, "src/lib.rs: the public modules changed");
    // A glob, or a path that names one of the crate's modules, re-exports a whole module.
    let graph = Graph::of_crate(&root().join("src"));
    let whole: Vec<String> = re_exported
        .iter()
        .filter(|(path, name)| {
            let path: Vec<String> = path.iter().skip_while(|s| *s == "crate" || *s == "self").cloned().collect();
            name.is_none() || graph.modules.contains_key(&path)
        })
        .map(|(path, name)| format!("{}{}", path.join("::"), if name.is_none() { "::*" } else { "" }))
        .collect();
    assert!(whole.is_empty(), "src/lib.rs re-exports whole modules: {whole:?}");
}

/// Knobs read anywhere but `config.rs` would escape its checks and error messages. The plugin's
/// environment defaults are the exception: they must see the live environment right before the
/// plugin reads it.
#[test]
fn only_this_module_reads_the_environment() {
    fn scan(dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                scan(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                if ["env::var(", "env::var_os(", "env::vars(", "getenv("].iter().any(|call| text.contains(call)) {
                    out.push(path.to_string_lossy().into_owned());
                }
            }
        }
    }
    let src = root().join("src");
    let mut readers = Vec::new();
    scan(&src, &mut readers);
    readers.sort();
    let expected: Vec<String> = ["config.rs", "transport/plugin/profile.rs"]
        .iter()
        .map(|f| src.join(f).to_string_lossy().into_owned())
        .collect();
    assert_eq!(readers, expected);
}

#[test]
fn no_files_import_each_other() {
    let mut cycles = Vec::new();
    for dir in ["src", "crates/fake-tcpx/src", "crates/bench/src", "crates/testkit/src"] {
        let graph = Graph::of_crate(&root().join(dir));
        cycles.extend(graph.cycles().into_iter().map(|c| format!("{dir}: {c}")));
    }
    assert!(cycles.is_empty(), "files that import each other:\n{}", cycles.join("\n"));
}

/// The same-host paths are a wing of the engine (`engine/same_host/`): they never import the
/// network path's connection (`engine/conn/`), which reaches them through their seams only. In
/// `conn/`, the connection state hands the sub-state its messages and lends it its network path
/// (`state.rs`, `state/seam.rs`), the connection implements what the wing's I/O needs of it
/// (`same_host_io.rs`), and the connection's root and its callers' calls (`mod.rs`, `api.rs`,
/// `pieces.rs`) call the wing's entry points; no other file of `conn/` (tests aside) names the wing.
const CONN_FILES_AT_THE_SEAM: &[&str] = &[
    "engine/conn/mod.rs",
    "engine/conn/api.rs",
    "engine/conn/pieces.rs",
    "engine/conn/state.rs",
    "engine/conn/state/seam.rs",
    "engine/conn/same_host_io.rs",
];

#[test]
fn the_same_host_wing_and_the_network_path_meet_only_at_the_seam() {
    let graph = Graph::of_crate(&root().join("src"));
    let is_test = |file: &str| file.contains("/tests/") || file.ends_with("/tests.rs");
    let crossing: Vec<String> = graph
        .edges()
        .filter(|(from, to)| {
            let wing_to_conn = from.starts_with("engine/same_host/") && to.starts_with("engine/conn/");
            let conn_to_wing = from.starts_with("engine/conn/")
                && to.starts_with("engine/same_host/")
                && !is_test(from)
                && !CONN_FILES_AT_THE_SEAM.contains(from);
            wing_to_conn || conn_to_wing
        })
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(
        crossing.is_empty(),
        "imports between engine/same_host/ and engine/conn/ off the seam:\n{}",
        crossing.join("\n")
    );
    // The connection state's own file knows the sub-state and nothing else of the wing.
    let state_reaches: BTreeSet<&str> =
        graph.edges().filter(|(from, _)| *from == "engine/conn/state.rs").map(|(_, to)| to).collect();
    let wing: Vec<&&str> = state_reaches.iter().filter(|to| to.starts_with("engine/same_host/")).collect();
    assert!(
        wing.iter().all(|to| to.starts_with("engine/same_host/state")),
        "conn/state.rs reaches into the wing past its sub-state: {wing:?}"
    );
    assert!(!wing.is_empty(), "the scan no longer sees the connection state own the sub-state");
}

/// Where a peer runs (`Locality`, `LocalLink`) is the engine's answer, which the route, the
/// connection and the crate root read as well as the same-host wing that proves it: it sits in
/// `engine/locality.rs`, which imports nothing of the engine, and those readers take it from there,
/// not from the wing. The route and the crate root name nothing of the wing at all.
#[test]
fn where_a_peer_runs_is_read_from_its_own_module_not_the_wing() {
    let graph = Graph::of_crate(&root().join("src"));
    let from_locality: Vec<&str> = graph
        .edges()
        .filter(|(from, to)| *from == "engine/locality.rs" && to.starts_with("engine/"))
        .map(|(_, to)| to)
        .collect();
    assert!(from_locality.is_empty(), "engine/locality.rs imports from the engine: {from_locality:?}");
    let readers: BTreeSet<&str> =
        graph.edges().filter(|(_, to)| *to == "engine/locality.rs").map(|(from, _)| from).collect();
    for reader in ["engine/route.rs", "engine/conn/mod.rs", "engine/same_host/registry.rs"] {
        assert!(readers.contains(reader), "the scan no longer sees {reader} read engine/locality.rs: {readers:?}");
    }
    let into_wing: Vec<String> = graph
        .edges()
        .filter(|(from, to)| *from == "engine/route.rs" && to.starts_with("engine/same_host/"))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(into_wing.is_empty(), "the route reaches into the same-host wing:\n{}", into_wing.join("\n"));
    // The crate root's re-exports are no edges of the graph (nothing in lib.rs uses them): read
    // the root's own words.
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).unwrap();
    assert!(lib.contains("pub use engine::locality::Locality;"), "lib.rs re-exports Locality from elsewhere");
    assert!(!lib.contains("same_host"), "lib.rs names the same-host wing");
}

/// The engine asks `transport/open.rs` for a transport and gets a `Net`: no other file names the
/// concrete ones (`SocketNet`, `PluginNet`, `StagedNet`) or reaches into their modules, but the
/// implementations themselves and tests, which build them by hand.
#[test]
fn only_the_transport_opener_names_the_concrete_transports() {
    const CONCRETE: [&str; 3] = ["socket", "plugin", "staged"];
    fn scan(dir: &Path, src: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(src).unwrap().to_string_lossy().replace('\\', "/");
            if path.is_dir() {
                let inside = CONCRETE.iter().any(|c| rel == format!("transport/{c}"));
                if !inside && !rel.ends_with("/tests") {
                    scan(&path, src, out);
                }
                continue;
            }
            let exempt = ["transport/open.rs", "transport/testutil.rs"].contains(&rel.as_str())
                || rel.ends_with("/tests.rs")
                || rel.ends_with("_tests.rs");
            if exempt || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // A file's own test module comes last; what it builds by hand is no route of the engine's.
            let code = text.find("\n#[cfg(test)]\nmod ").map_or(text.as_str(), |at| &text[..at]);
            let toks = lex(code);
            for (i, tok) in toks.iter().enumerate() {
                let Tok::Ident(word) = tok else { continue };
                let named = ["SocketNet", "PluginNet", "StagedNet"].contains(&word.as_str())
                    || (word == "transport"
                        && toks.get(i + 1) == Some(&Tok::Sep)
                        && matches!(toks.get(i + 2), Some(Tok::Ident(m)) if CONCRETE.contains(&m.as_str())));
                if named {
                    out.push(format!("{rel}: {word}"));
                }
            }
        }
    }
    let src = root().join("src");
    let mut naming = Vec::new();
    scan(&src, &src, &mut naming);
    assert!(
        naming.is_empty(),
        "files other than transport/open.rs that name a concrete transport:\n{}",
        naming.join("\n")
    );
    let open = std::fs::read_to_string(src.join("transport/open.rs")).unwrap();
    assert!(["SocketNet", "PluginNet", "StagedNet"].iter().all(|n| open.contains(n)), "the scan lost its anchor");
}

/// The socket transport's bookkeeping (`transport/socket/pure/`: wire, window, acknowledgements,
/// failover, counts) does no I/O: it imports nothing of the transport's I/O part (the rest of
/// `socket/`), and its code names no socket, thread, file descriptor or syscall layer; its tests
/// drive it without sockets. The I/O part drives it, so a second backend (io_uring beside epoll)
/// reuses it as it is.
#[test]
fn the_socket_transports_bookkeeping_does_no_io() {
    const PURE: &str = "transport/socket/pure/";
    let graph = Graph::of_crate(&root().join("src"));
    let into_io: Vec<String> = graph
        .edges()
        .filter(|(from, to)| from.starts_with(PURE) && to.starts_with("transport/socket/") && !to.starts_with(PURE))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(into_io.is_empty(), "the socket bookkeeping imports its I/O part:\n{}", into_io.join("\n"));
    let from_io = graph.edges().filter(|(from, to)| !from.starts_with(PURE) && to.starts_with(PURE)).count();
    assert!(from_io > 0, "the scan no longer sees the I/O part use the bookkeeping");
    const IO: [&str; 10] =
        ["TcpStream", "TcpListener", "UdpSocket", "thread", "libc", "socket2", "sys", "RawFd", "File", "epoll"];
    let mut naming = Vec::new();
    for entry in std::fs::read_dir(root().join("src").join(PURE)).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.find("\n#[cfg(test)]\nmod ").map_or(text.as_str(), |at| &text[..at]);
        for tok in lex(code) {
            if let Tok::Ident(word) = tok
                && IO.contains(&word.as_str())
            {
                naming.push(format!("{name}: {word}"));
            }
        }
    }
    assert!(naming.is_empty(), "the socket bookkeeping names I/O:\n{}", naming.join("\n"));
}

/// The scanner sees what it must: a cycle and an upward import planted in a small tree are found.
#[test]
fn the_scanner_finds_planted_cycles_and_follows_re_exports() {
    let dir = std::env::temp_dir().join(format!("module-graph-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let files = [
        ("lib.rs", "pub mod a;\npub mod b;\nmod c;\n"),
        (
            "a/mod.rs",
            "mod inner;\npub use inner::Thing;\n// crate::b::Other in a comment\nfn f() -> &'static str { \"crate::b::Other\" }\n",
        ),
        ("a/inner.rs", "pub struct Thing;\nfn g() { let _ = crate::b::Other; let _c = 'x'; }\n"),
        ("b.rs", "use crate::a::Thing;\npub struct Other;\n"),
        ("c.rs", "#[cfg(test)]\nmod tests {\n    use super::*;\n    use crate::b::{self, Other as O};\n}\n"),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let graph = Graph::of_crate(&dir);
    let edges: BTreeSet<(String, String)> = graph.edges().map(|(a, b)| (a.to_owned(), b.to_owned())).collect();
    let expected: BTreeSet<(String, String)> = [("a/inner.rs", "b.rs"), ("b.rs", "a/inner.rs"), ("c.rs", "b.rs")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(edges, expected);
    assert_eq!(graph.cycles(), vec!["a/inner.rs -> b.rs -> a/inner.rs".to_owned()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
    /// `::`
    Sep,
}

/// Identifiers and punctuation, without comments, literals and lifetimes.
fn lex(src: &str) -> Vec<Tok> {
    let s: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let ident_char = |c: char| c.is_alphanumeric() || c == '_';
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            loop {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&s, i);
        } else if c == '\'' {
            if next == Some('\\') {
                i += 2;
                while s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if s.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                // A lifetime or label.
                i += 1;
                while i < s.len() && ident_char(s[i]) {
                    i += 1;
                }
            }
        } else if ident_char(c) {
            let start = i;
            while i < s.len() && ident_char(s[i]) {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let at = s.get(i).copied();
            if matches!(word.as_str(), "r" | "br" | "cr") && matches!(at, Some('"' | '#')) && raw_string_at(&s, i) {
                i = skip_raw_string(&s, i);
            } else if matches!(word.as_str(), "b" | "c") && at == Some('"') {
                i = skip_string(&s, i);
            } else if word == "b" && at == Some('\'') {
                i += 1;
                if s[i] == '\\' {
                    i += 1;
                }
                i += 1;
                while s[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if word == "r" && at == Some('#') {
                // A raw identifier.
                i += 1;
                let start = i;
                while i < s.len() && ident_char(s[i]) {
                    i += 1;
                }
                out.push(Tok::Ident(s[start..i].iter().collect()));
            } else {
                out.push(Tok::Ident(word));
            }
        } else if c == ':' && next == Some(':') {
            out.push(Tok::Sep);
            i += 2;
        } else {
            out.push(Tok::Punct(c));
            i += 1;
        }
    }
    out
}

fn skip_string(s: &[char], mut i: usize) -> usize {
    i += 1;
    while s[i] != '"' {
        i += if s[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

fn raw_string_at(s: &[char], mut i: usize) -> bool {
    while s.get(i) == Some(&'#') {
        i += 1;
    }
    s.get(i) == Some(&'"')
}

fn skip_raw_string(s: &[char], mut i: usize) -> usize {
    let mut hashes = 0;
    while s[i] == '#' {
        hashes += 1;
        i += 1;
    }
    i += 1;
    loop {
        if s[i] == '"' && (1..=hashes).all(|k| s.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
}

/// One name a `use` brings into a module: `name` is `None` for a glob.
#[derive(Debug)]
struct UseDecl {
    public: bool,
    path: Vec<String>,
    name: Option<String>,
    /// The module whose code wrote it (relative paths start there).
    at: Vec<String>,
}

#[derive(Default, Debug)]
struct Module {
    file: usize,
    items: HashSet<String>,
    uses: Vec<UseDecl>,
}

/// A path written in code (not in a `use`), as written, with the module it was written in.
struct Ref {
    file: usize,
    at: Vec<String>,
    path: Vec<String>,
}

struct Graph {
    files: Vec<String>,
    modules: HashMap<Vec<String>, Module>,
    refs: Vec<Ref>,
    /// Identifiers each file's code uses outside its `use` declarations.
    idents: Vec<HashSet<String>>,
}

impl Graph {
    /// Scans the crate whose root (`lib.rs` or `main.rs`) is in `dir`; `bin/` holds other crates.
    fn of_crate(dir: &Path) -> Graph {
        let mut paths = Vec::new();
        collect(dir, dir, &mut paths);
        paths.sort();
        let mut graph = Graph { files: Vec::new(), modules: HashMap::new(), refs: Vec::new(), idents: Vec::new() };
        for rel in &paths {
            let module = module_path(rel);
            let file = graph.files.len();
            graph.files.push(rel.clone());
            graph.idents.push(HashSet::new());
            graph.modules.insert(module, Module { file, ..Module::default() });
        }
        for (file, rel) in paths.iter().enumerate() {
            let text = std::fs::read_to_string(dir.join(rel)).unwrap();
            assert!(!text.contains("#[path"), "{rel}: #[path] modules are not understood here");
            graph.parse(file, module_path(rel), &lex(&text));
        }
        graph
    }

    fn parse(&mut self, file: usize, base: Vec<String>, toks: &[Tok]) {
        let ident = |i: usize| match toks.get(i) {
            Some(Tok::Ident(s)) => Some(s.as_str()),
            _ => None,
        };
        // Inline modules open at this file position: (name, brace depth of their body).
        let mut scopes: Vec<(String, i32)> = Vec::new();
        let mut depth = 0;
        let mut i = 0;
        while i < toks.len() {
            let here: Vec<String> = base.iter().cloned().chain(scopes.iter().map(|(n, _)| n.clone())).collect();
            let item_level = depth == scopes.last().map_or(0, |s| s.1);
            match &toks[i] {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth -= 1;
                    if scopes.last().is_some_and(|s| depth < s.1) {
                        scopes.pop();
                    }
                }
                Tok::Ident(w) if w == "mod" && toks.get(i + 2) == Some(&Tok::Punct('{')) => {
                    let name = ident(i + 1).unwrap().to_owned();
                    let mut path = here.clone();
                    path.push(name.clone());
                    self.modules.insert(path, Module { file, ..Module::default() });
                    scopes.push((name, depth + 1));
                    i += 2;
                    continue;
                }
                Tok::Ident(w) if w == "use" => {
                    let public = is_public(toks, i);
                    let mut decls = Vec::new();
                    let end = use_tree(toks, i + 1, Vec::new(), &mut decls);
                    for (path, name) in decls {
                        let decl = UseDecl { public, path, name, at: here.clone() };
                        if item_level {
                            self.modules.get_mut(&here).unwrap().uses.push(decl);
                        } else {
                            self.refs.push(Ref { file, at: decl.at, path: decl.path });
                        }
                    }
                    i = end;
                    continue;
                }
                Tok::Ident(w) if item_level && is_item_keyword(w) => {
                    let name = if ident(i + 1) == Some("mut") { ident(i + 2) } else { ident(i + 1) };
                    let name = if w == "macro_rules" { ident(i + 2) } else { name };
                    if let Some(name) = name {
                        self.modules.get_mut(&here).unwrap().items.insert(name.to_owned());
                    }
                }
                Tok::Ident(w) => {
                    let starts_path =
                        toks.get(i + 1) == Some(&Tok::Sep) && i.checked_sub(1).map(|p| &toks[p]) != Some(&Tok::Sep);
                    let child = || {
                        let mut p = here.clone();
                        p.push(w.clone());
                        self.modules.contains_key(&p) && self.modules[&p].file != file
                    };
                    if starts_path && (matches!(w.as_str(), "crate" | "super" | "self") || child()) {
                        let mut path = vec![w.clone()];
                        let mut j = i + 1;
                        while toks.get(j) == Some(&Tok::Sep) {
                            let Some(seg) = ident(j + 1) else { break };
                            path.push(seg.to_owned());
                            j += 2;
                        }
                        self.refs.push(Ref { file, at: here.clone(), path });
                        i = j;
                        continue;
                    }
                    self.idents[file].insert(w.clone());
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// `path` as written in module `at`, made absolute; `None` for another crate's path.
    fn absolute(&self, at: &[String], path: &[String]) -> Option<Vec<String>> {
        let mut module = at.to_vec();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                module.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    module.pop();
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                let mut child = at.to_vec();
                child.push(first.to_owned());
                let local = &self.modules[at];
                let known = self.modules.contains_key(&child)
                    || local.items.contains(first)
                    || local.uses.iter().any(|u| u.name.as_deref() == Some(first));
                if !known {
                    return None;
                }
            }
            None => return None,
        }
        module.extend(rest.iter().cloned());
        Some(module)
    }

    /// The file defining what absolute `path` names, and whether a definition was found (rather
    /// than the innermost module the path reaches).
    fn resolve(&self, path: &[String], hops: usize) -> (usize, bool) {
        let mut module: Vec<String> = Vec::new();
        for (k, seg) in path.iter().enumerate() {
            let mut next = module.clone();
            next.push(seg.clone());
            if self.modules.contains_key(&next) {
                module = next;
                continue;
            }
            let m = &self.modules[&module];
            if m.items.contains(seg) || hops > 16 {
                return (m.file, true);
            }
            if let Some(u) = m.uses.iter().find(|u| u.name.as_deref() == Some(seg.as_str())) {
                return match self.absolute(&u.at, &u.path) {
                    Some(mut target) => {
                        target.extend(path[k + 1..].iter().cloned());
                        self.resolve(&target, hops + 1)
                    }
                    None => (m.file, true),
                };
            }
            for glob in m.uses.iter().filter(|u| u.name.is_none()) {
                if let Some(mut target) = self.absolute(&glob.at, &glob.path) {
                    target.extend(path[k..].iter().cloned());
                    let found = self.resolve(&target, hops + 1);
                    if found.1 {
                        return found;
                    }
                }
            }
            return (m.file, false);
        }
        (self.modules[&module].file, true)
    }

    /// Every dependency between two different files, once.
    fn edges(&self) -> impl Iterator<Item = (&str, &str)> {
        let mut set = BTreeSet::new();
        let mut add = |from: usize, at: &[String], path: &[String]| {
            if let Some(abs) = self.absolute(at, path) {
                let to = self.resolve(&abs, 0).0;
                if to != from {
                    set.insert((from, to));
                }
            }
        };
        for r in &self.refs {
            add(r.file, &r.at, &r.path);
        }
        for m in self.modules.values() {
            for u in &m.uses {
                let used_here = u.name.as_ref().is_some_and(|n| self.idents[m.file].contains(n));
                if !u.public || used_here {
                    add(m.file, &u.at, &u.path);
                }
            }
        }
        set.into_iter().map(|(a, b)| (self.files[a].as_str(), self.files[b].as_str()))
    }

    /// The library's top-level module a file belongs to ("" for the crate root).
    fn top_module(&self, file: &str) -> String {
        module_path(file).first().cloned().unwrap_or_default()
    }

    /// One line per cycle of files: its shortest round trip from its first file.
    fn cycles(&self) -> Vec<String> {
        let mut out: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (a, b) in self.edges() {
            next.entry(a).or_default().push(b);
        }
        for &start in next.keys() {
            // Breadth-first from `start` back to itself.
            let mut prev: HashMap<&str, &str> = HashMap::new();
            let mut queue = std::collections::VecDeque::from([start]);
            let mut found = false;
            while let Some(at) = queue.pop_front() {
                for &to in next.get(at).into_iter().flatten() {
                    if to == start {
                        prev.insert(start, at);
                        found = true;
                        break;
                    }
                    if !prev.contains_key(to) {
                        prev.insert(to, at);
                        queue.push_back(to);
                    }
                }
                if found {
                    break;
                }
            }
            if found {
                let mut cycle = vec![start];
                let mut at = prev[start];
                while at != start {
                    cycle.push(at);
                    at = prev[at];
                }
                cycle.reverse();
                cycle.insert(0, start);
                // Each cycle once, named from its smallest file.
                let min = cycle[..cycle.len() - 1].iter().min().unwrap();
                let pos = cycle.iter().position(|f| f == min).unwrap();
                let mut canon: Vec<&str> = cycle[pos..cycle.len() - 1].to_vec();
                canon.extend_from_slice(&cycle[..pos]);
                canon.push(min);
                out.entry(canon.join(" -> ")).or_insert(canon);
            }
        }
        out.into_keys().collect()
    }
}

fn is_item_keyword(w: &str) -> bool {
    matches!(w, "fn" | "struct" | "enum" | "const" | "static" | "type" | "trait" | "union" | "macro_rules")
}

/// Whether the `use` at `i` is `pub` or `pub(...)`.
fn is_public(toks: &[Tok], i: usize) -> bool {
    match i.checked_sub(1).map(|p| &toks[p]) {
        Some(Tok::Ident(w)) => w == "pub",
        Some(Tok::Punct(')')) => {
            let open = toks[..i].iter().rposition(|t| *t == Tok::Punct('(')).unwrap();
            open > 0 && toks[open - 1] == Tok::Ident("pub".to_owned())
        }
        _ => false,
    }
}

/// Parses the use tree starting at `i` (after `use`, or inside braces); returns where it ends
/// (after the `;` at the top level).
fn use_tree(
    toks: &[Tok],
    mut i: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, Option<String>)>,
) -> usize {
    if toks.get(i) == Some(&Tok::Sep) {
        i += 1;
    }
    loop {
        match &toks[i] {
            Tok::Ident(w) => {
                i += 1;
                if toks.get(i) == Some(&Tok::Sep) {
                    prefix.push(w.clone());
                    i += 1;
                    continue;
                }
                let mut name = w.clone();
                let path = if w == "self" {
                    name = prefix.last().cloned().unwrap_or_default();
                    prefix.clone()
                } else {
                    let mut p = prefix.clone();
                    p.push(w.clone());
                    p
                };
                if toks.get(i) == Some(&Tok::Ident("as".to_owned())) {
                    if let Some(Tok::Ident(alias)) = toks.get(i + 1) {
                        name = alias.clone();
                    }
                    i += 2;
                }
                if name != "_" {
                    out.push((path, Some(name)));
                } else {
                    out.push((path, None));
                }
                break;
            }
            Tok::Punct('*') => {
                out.push((prefix.clone(), None));
                i += 1;
                break;
            }
            Tok::Punct('{') => {
                i += 1;
                while toks[i] != Tok::Punct('}') {
                    i = use_tree(toks, i, prefix.clone(), out);
                    if toks[i] == Tok::Punct(',') {
                        i += 1;
                    }
                }
                i += 1;
                break;
            }
            other => panic!("unexpected {other:?} in a use tree"),
        }
    }
    if toks.get(i) == Some(&Tok::Punct(';')) {
        i += 1;
    }
    i
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if rel != "bin" {
                collect(root, &path, out);
            }
        } else if rel.ends_with(".rs") {
            out.push(rel);
        }
    }
}

/// `a/b.rs` and `a/b/mod.rs` are module `a::b`; `lib.rs` and `main.rs` the crate root.
fn module_path(rel: &str) -> Vec<String> {
    let stem = rel.strip_suffix(".rs").unwrap();
    let mut parts: Vec<String> = stem.split('/').map(str::to_owned).collect();
    if matches!(parts.last().map(String::as_str), Some("mod")) || matches!(stem, "lib" | "main") {
        parts.pop();
    }
    parts
}
