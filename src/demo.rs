//! The bundled demo data: written into the data dir and registered by `serve --demo`.

use anyhow::{Context, Result};
use artiflight_server::Server;

include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));

/// The hive-partitioned folder, registered as one artifact as in lamindb's docs.
const SHARDED: &str = "sharded_parquet";

/// The demo AnnData and SpatialData stores, registered under their file names.
const ARRAY_STORES: [(&str, &str); 3] = [
    (
        "pbmc68k.h5ad",
        "pbmc68k reduced, subsampled to 70 cells (lamindb's fixture)",
    ),
    (
        "pbmc68k.zarr",
        "pbmc68k reduced, subsampled to 70 cells (lamindb's fixture)",
    ),
    (
        "blobs.zarr",
        "spatialdata's blobs sample; its table has a 'clone' column",
    ),
];

/// Writes the demo files under `DATA_DIR/demo` and registers them; idempotent.
pub(crate) async fn install(server: &Server) -> Result<()> {
    let dir = server.planner().storage().data_dir().join("demo");
    for (rel, bytes) in DEMO_FILES {
        let path = dir.join(rel);
        if std::fs::read(&path).ok().as_deref() == Some(*bytes) {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let registry = server.registry();
    let folder = dir.join(SHARDED);
    let folder = folder.to_str().context("demo path is not UTF-8")?;
    registry
        .register(
            folder,
            SHARDED,
            Some("pbmc68k obs, sharded by louvain".into()),
            true,
        )
        .await?;
    // Two single shards and a collection of them, as lamindb's "stream datasets" guide does.
    let mut members = Vec::new();
    for (n, shard) in ["louvain=0", "louvain=1"].iter().enumerate() {
        let key = format!("sharded_parquet_shard{}", n + 1);
        let file = std::fs::read_dir(dir.join(SHARDED).join(shard))
            .with_context(|| format!("listing demo shard {shard}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "parquet"))
            .with_context(|| format!("demo shard {shard} has no parquet file"))?;
        registry
            .register(
                file.to_str().context("demo path is not UTF-8")?,
                &key,
                None,
                true,
            )
            .await?;
        members.push(key);
    }
    registry
        .create_collection("sharded_parquet_collection", members, None)
        .await?;
    for (name, description) in ARRAY_STORES {
        let path = dir.join(name);
        registry
            .register(
                path.to_str().context("demo path is not UTF-8")?,
                name,
                Some(description.into()),
                true,
            )
            .await?;
    }
    Ok(())
}
