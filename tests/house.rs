//! The house rules, checked on the source itself so they stay true:
//! modules import only from the layers below them, and no function in `src/`
//! runs past a screen or two.

use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The layers, top first. A module may use modules of a lower layer (a larger
/// index) and itself, never one of its own layer or above.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["api"],
    &["server"],
    &["store"],
    &["engine"],
    &["project"],
    &["connector", "script"],
    &["template", "run"],
    &["value"],
];

/// The longest a function in `src/` may be, in lines.
const LONGEST_FUNCTION: usize = 150;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources() -> Vec<(String, PathBuf)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(&src).ok()?;
            let first = rel.components().next()?.as_os_str().to_str()?;
            let module = first.trim_end_matches(".rs").to_string();
            (module != "lib" && module != "main").then_some((module, path))
        })
        .collect()
}

/// The top-level modules a file names through `crate::`, including inside
/// `use crate::{a::X, b}` groups, with the line of each.
fn crate_references(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Group may span lines: take the text up to the matching brace.
                let start = text.lines().take(n).map(|l| l.len() + 1).sum::<usize>()
                    + (line.len() - group.len());
                let whole = &text[start..];
                let mut depth = 1;
                let mut top = String::new();
                for ch in whole.chars() {
                    match ch {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        break;
                    }
                    top.push(if depth == 1 { ch } else { ' ' });
                }
                for part in top.split(',') {
                    let name: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((n + 1, name));
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push((n + 1, name));
            }
        }
    }
    found
}

#[test]
fn modules_import_only_from_the_layers_below() {
    let mut wrong = Vec::new();
    for (module, path) in sources() {
        let Some(own) = layer_of(&module) else {
            wrong.push(format!(
                "{}: module `{module}` has no layer in tests/house.rs",
                path.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&path).expect("read source");
        for (line, used) in crate_references(&text) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(theirs) if theirs > own => {}
                Some(_) => wrong.push(format!(
                    "{}:{line}: `{module}` uses `crate::{used}`, a layer at or above its own",
                    path.display()
                )),
                None => {}
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

struct LongFunctions<'a> {
    file: &'a Path,
    found: Vec<String>,
}

impl LongFunctions<'_> {
    fn check(&mut self, name: &syn::Ident, block: &syn::Block) {
        let (open, close) = (
            block.brace_token.span.open(),
            block.brace_token.span.close(),
        );
        let lines = close.start().line - open.start().line + 1;
        if lines > LONGEST_FUNCTION {
            self.found.push(format!(
                "{}:{}: fn {name} is {lines} lines",
                self.file.display(),
                open.start().line
            ));
        }
    }
}

impl<'ast> Visit<'ast> for LongFunctions<'_> {
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.check(&f.sig.ident, &f.block);
        syn::visit::visit_item_fn(self, f);
    }
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.check(&f.sig.ident, &f.block);
        syn::visit::visit_impl_item_fn(self, f);
    }
    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.check(&f.sig.ident, block);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

#[test]
fn no_function_in_src_is_longer_than_150_lines() {
    let mut found = Vec::new();
    for (_, path) in sources() {
        let text = std::fs::read_to_string(&path).expect("read source");
        let file = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", path.display()));
        let mut visitor = LongFunctions {
            file: &path,
            found: Vec::new(),
        };
        visitor.visit_file(&file);
        found.extend(visitor.found);
    }
    assert!(
        found.is_empty(),
        "functions over {LONGEST_FUNCTION} lines:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_reference_scanner_reads_groups_and_paths() {
    let text = "use crate::{api::wire, store::{Store, Role}};\nlet x = crate::value::Value::Null; // crate::cli\n";
    let names: Vec<String> = crate_references(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["api", "store", "value"]);
}
