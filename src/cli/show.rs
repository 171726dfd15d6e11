//! `artiflight show`: a record, its structure as anndata's repr, and a folder's file tree.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::backend::Backend;
use super::{Global, print_json};

/// Prints the record of `key` (or one version) and what it holds.
pub(crate) async fn run(global: &Global, key: &str, version: Option<String>) -> Result<()> {
    let backend = Backend::open(global).await?;
    let record = backend
        .action("describe", json!({"key": key, "version": version}))
        .await?;
    print_json(&record)?;
    if let Some(structure) = record.get("structure") {
        print!("{}", structure_repr(structure));
        return Ok(());
    }
    // An artifact's folder: the tree of its files, when the storage is at hand.
    if let (Backend::Local(server), Some(path)) = (&backend, record["path"].as_str()) {
        let url = url::Url::parse(path)?;
        let located = server.planner().storage().locate(&url).await?;
        if located.is_folder {
            let paths: Vec<&str> = located.files.iter().map(|f| located.relative(f)).collect();
            print!("{}", file_tree(&paths));
        }
    }
    Ok(())
}

/// Renders an artifact's structure: AnnData as anndata's repr, SpatialData's tables, or the tree of
/// a generic HDF5/zarr store with shapes, dtypes and chunks.
fn structure_repr(structure: &serde_json::Value) -> String {
    use std::fmt::Write;
    let names = |v: Option<&serde_json::Value>| -> Vec<String> {
        match v {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(|s| format!("'{s}'")))
                .collect(),
            Some(serde_json::Value::Object(o)) => o.keys().map(|k| format!("'{k}'")).collect(),
            _ => Vec::new(),
        }
    };
    let anndata = |a: &serde_json::Value, indent: &str| -> String {
        let shape = a.get("shape").and_then(|s| s.as_array());
        let dim = |i: usize| {
            shape
                .and_then(|s| s.get(i))
                .and_then(|v| v.as_u64())
                .map_or("?".to_string(), |n| n.to_string())
        };
        let mut out = format!(
            "AnnData object with n_obs × n_vars = {} × {}\n",
            dim(0),
            dim(1)
        );
        for kind in [
            "obs", "var", "uns", "obsm", "varm", "layers", "obsp", "varp",
        ] {
            let keys = names(a.get(kind));
            if !keys.is_empty() {
                let _ = writeln!(out, "{indent}    {kind}: {}", keys.join(", "));
            }
        }
        out
    };
    match structure.get("otype").and_then(|o| o.as_str()) {
        Some("AnnData") => anndata(structure, ""),
        Some("SpatialData") => {
            let mut out = String::from("SpatialData object\n");
            if let Some(tables) = structure.get("tables").and_then(|t| t.as_object()) {
                for (name, table) in tables {
                    let _ = write!(out, "  table '{name}': {}", anndata(table, "  "));
                }
            }
            if let Some(elements) = structure.get("elements").and_then(|e| e.as_object()) {
                for (kind, keys) in elements {
                    let keys = names(Some(keys));
                    if !keys.is_empty() {
                        let _ = writeln!(out, "  {kind}: {}", keys.join(", "));
                    }
                }
            }
            out
        }
        _ => {
            let mut out = String::new();
            for node in structure
                .get("tree")
                .and_then(|t| t.as_array())
                .into_iter()
                .flatten()
            {
                let path = node.get("path").and_then(|p| p.as_str()).unwrap_or("");
                let depth = path.matches('/').count();
                let name = path.rsplit('/').next().unwrap_or(path);
                let indent = "    ".repeat(depth);
                match node.get("kind").and_then(|k| k.as_str()) {
                    Some("group") => {
                        let _ = writeln!(out, "{indent}{name}/");
                    }
                    _ => {
                        let _ = writeln!(
                            out,
                            "{indent}{name}  shape={} dtype={} chunks={}",
                            node.get("shape").unwrap_or(&serde_json::Value::Null),
                            node.get("dtype").and_then(|d| d.as_str()).unwrap_or("?"),
                            node.get("chunks").unwrap_or(&serde_json::Value::Null),
                        );
                    }
                }
            }
            out
        }
    }
}

/// Renders relative paths (in path order) as a tree, like lamindb's `view_tree`.
fn file_tree(paths: &[&str]) -> String {
    #[derive(Default)]
    struct Node<'a> {
        children: Vec<(&'a str, Node<'a>)>,
    }
    fn render(node: &Node<'_>, prefix: &str, out: &mut String) {
        for (i, (name, child)) in node.children.iter().enumerate() {
            let last = i + 1 == node.children.len();
            let slash = if child.children.is_empty() { "" } else { "/" };
            out.push_str(&format!(
                "{prefix}{}{name}{slash}\n",
                if last { "└── " } else { "├── " }
            ));
            render(
                child,
                &format!("{prefix}{}", if last { "    " } else { "│   " }),
                out,
            );
        }
    }
    let mut root = Node::default();
    for path in paths {
        let mut node = &mut root;
        for part in path.split('/') {
            let at = match node.children.iter().position(|(n, _)| *n == part) {
                Some(at) => at,
                None => {
                    node.children.push((part, Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[at].1;
        }
    }
    let dirs: std::collections::BTreeSet<&str> = paths
        .iter()
        .flat_map(|p| p.match_indices('/').map(move |(i, _)| &p[..i]))
        .collect();
    let suffixes: std::collections::BTreeSet<String> = paths
        .iter()
        .filter_map(|p| {
            Path::new(p)
                .extension()
                .map(|e| format!("'.{}'", e.to_string_lossy()))
        })
        .collect();
    let mut out = format!(
        "{} sub-directories & {} files with suffixes {}\n",
        dirs.len(),
        paths.len(),
        suffixes.into_iter().collect::<Vec<_>>().join(", ")
    );
    render(&root, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::file_tree;

    #[test]
    fn tree_like_lamindb() {
        let tree = file_tree(&["louvain=0/a.parquet", "louvain=1/a.parquet"]);
        assert_eq!(
            tree,
            "2 sub-directories & 2 files with suffixes '.parquet'\n├── louvain=0/\n│   └── a.parquet\n└── louvain=1/\n    └── a.parquet\n"
        );
    }
}
