//! Embeds the demo data (`demo/`) in the binary, so `artiflight serve --demo` works from anywhere.

use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("demo");
    println!("cargo:rerun-if-changed=demo");
    let mut files = Vec::new();
    if root.is_dir() {
        walk(&root, &mut files)?;
    }
    files.sort();
    let mut code = String::from(
        "/// Demo files: (path relative to demo/, bytes).\npub(crate) static DEMO_FILES: &[(&str, &[u8])] = &[\n",
    );
    for file in files {
        let rel = file
            .strip_prefix(&root)?
            .to_string_lossy()
            .replace('\\', "/");
        if rel.ends_with(".py") || rel.ends_with(".md") {
            continue;
        }
        // Relative to the manifest at compile time, not this checkout's absolute path: a target
        // directory shared between two checkouts may reuse this script's output.
        code.push_str(&format!(
            "    ({rel:?}, include_bytes!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {:?}))),\n",
            format!("/demo/{rel}")
        ));
    }
    code.push_str("];\n");
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR")?).join("demo_files.rs"),
        code,
    )?;
    Ok(())
}
