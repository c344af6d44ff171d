//! README's table of connection kinds agrees with the registry and the config
//! types: every registered kind has a row (with the names it answers to),
//! every row is a registered kind, and a row lists exactly the keys of the
//! kind's config struct, each of which has a doc comment. Adding a kind, or
//! a key, without documenting it fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tidepool::connector::KINDS;

/// One row of the table: the kind's names (its own first) and its keys.
#[derive(Debug)]
struct Row {
    names: Vec<String>,
    keys: BTreeSet<String>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The text between backticks, in order.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// `text` without what is in parentheses (explanations, defaults), outside
/// backticks.
fn without_parentheses(text: &str) -> String {
    let (mut out, mut depth, mut quoted) = (String::new(), 0usize, false);
    for c in text.chars() {
        match c {
            '`' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                continue;
            }
            _ => {}
        }
        if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// The rows of README's "Connection kinds" table.
fn readme_rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("### Connection kinds")
        .nth(1)
        .expect("README has a \"### Connection kinds\" section");
    let mut lines = section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    let header = lines.next().expect("the table's header");
    assert!(
        header.starts_with("| kind | keys |"),
        "the table's columns changed: {header}"
    );
    lines
        .skip(1) // |---|---|
        .map(|line| {
            // A cell may hold `|` only inside backticks; none does today.
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
            assert!(cells.len() >= 2, "a row without keys: {line}");
            Row {
                names: backticked(cells[0]),
                keys: backticked(&without_parentheses(cells[1]))
                    .into_iter()
                    .collect(),
            }
        })
        .collect()
}

/// The source file that defines a type, from its path
/// (`tidepool::connector::postgres::config::PostgresConfig`).
fn source_of(type_path: &str) -> (PathBuf, String) {
    let parts: Vec<&str> = type_path.split("::").collect();
    let (name, modules) = parts[1..].split_last().expect("a type path");
    let base = root().join("src").join(modules.join("/"));
    let file = [base.with_extension("rs"), base.join("mod.rs")]
        .into_iter()
        .find(|f| f.exists())
        .unwrap_or_else(|| panic!("no source file for {type_path}"));
    (file, name.to_string())
}

/// A config struct's doc comment and its keys, each with its doc comment.
fn config_keys(type_path: &str) -> (String, Vec<(String, String)>) {
    let (file, name) = source_of(type_path);
    let text = std::fs::read_to_string(&file).expect("read the config's source");
    let parsed = syn::parse_file(&text).expect("parse the config's source");
    let item = parsed
        .items
        .iter()
        .find_map(|i| match i {
            syn::Item::Struct(s) if s.ident == name => Some(s),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{} does not define {name}", file.display()));
    let doc = |attrs: &[syn::Attribute]| -> String {
        attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .filter_map(|a| match &a.meta {
                syn::Meta::NameValue(nv) => match &nv.value {
                    syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) => Some(s.value().trim().to_owned()),
                    _ => None,
                },
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let keys = item
        .fields
        .iter()
        .map(|f| {
            let ident = f.ident.as_ref().expect("a named field").to_string();
            let renamed = f
                .attrs
                .iter()
                .filter(|a| a.path().is_ident("serde"))
                .find_map(|a| {
                    let mut rename = None;
                    let _ = a.parse_nested_meta(|m| {
                        if m.path.is_ident("rename") {
                            rename = Some(m.value()?.parse::<syn::LitStr>()?.value());
                        } else if m.input.peek(syn::Token![=]) {
                            m.value()?.parse::<syn::Expr>()?;
                        }
                        Ok(())
                    });
                    rename
                });
            (renamed.unwrap_or(ident), doc(&f.attrs))
        })
        .collect();
    (doc(&item.attrs), keys)
}

#[test]
fn every_registered_kind_has_a_row_and_every_row_a_kind() {
    let rows = readme_rows();
    let registered: Vec<Vec<String>> = KINDS
        .iter()
        .map(|k| {
            std::iter::once(k.name)
                .chain(k.aliases.iter().copied())
                .map(str::to_owned)
                .collect()
        })
        .collect();
    let documented: Vec<Vec<String>> = rows.iter().map(|r| r.names.clone()).collect();
    assert_eq!(
        documented, registered,
        "README's connection kinds (with their other names, in registry order) differ from connector::KINDS"
    );
}

#[test]
fn each_row_lists_the_keys_of_its_config_with_their_doc_comments() {
    let rows = readme_rows();
    for kind in KINDS {
        let row = rows
            .iter()
            .find(|r| r.names.first().map(String::as_str) == Some(kind.name))
            .unwrap_or_else(|| panic!("README has no row for kind {:?}", kind.name));
        let (doc, keys) = config_keys((kind.config_type)());
        assert!(
            doc.contains(&format!("`kind = \"{}\"`", kind.name)),
            "the doc comment of {} should name `kind = \"{}\"`: {doc:?}",
            (kind.config_type)(),
            kind.name
        );
        for (key, doc) in &keys {
            assert!(
                !doc.is_empty(),
                "key {key:?} of kind {:?} has no doc comment",
                kind.name
            );
        }
        let config: BTreeSet<String> = keys.into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            row.keys,
            config,
            "README's keys for kind {:?} differ from {}'s fields",
            kind.name,
            (kind.config_type)()
        );
    }
}

#[test]
fn the_table_parser_reads_keys_outside_explanations() {
    assert_eq!(
        backticked(&without_parentheses(
            "`path`, `mode` (`overwrite` or `append`), `auth` (`{ bearer = \"…\" }`), `quote` (`\"`), `x` (a (nested) note)"
        )),
        ["path", "mode", "auth", "quote", "x"]
    );
}
