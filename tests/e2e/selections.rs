//! One true answer for matrix selections, whatever the path: column subsets read only the column
//! chunks they need, SQL name predicates reach the matrix read, `count(*)` is the number of rows a
//! full read returns, and a ticket plans the same on a server with other cores.

use std::sync::Arc;

use arrow::array::{Array, AsArray, FixedSizeListArray, RecordBatch};
use arrow::datatypes::{Float32Type, Int64Type};
use artiflight_server::query::{Command, SqlPlanner, Statement};
use artiflight_server::registry::Registry;
use datafusion::physical_plan::display::DisplayableExecutionPlan;
use datafusion::physical_plan::{ExecutionPlan, collect};
use serde_json::json;

use crate::common::*;

fn shown(plan: &Arc<dyn ExecutionPlan>) -> String {
    DisplayableExecutionPlan::with_metrics(plan.as_ref())
        .indent(true)
        .to_string()
}

async fn sql(
    registry: &Registry,
    query: &str,
) -> Result<(Vec<RecordBatch>, Arc<dyn ExecutionPlan>), Box<dyn std::error::Error + Send + Sync>> {
    let planned = SqlPlanner::new(registry.planner().clone())
        .plan(&Statement::new(query))
        .await?
        .planned;
    let plan: Arc<dyn ExecutionPlan> = planned.plan.clone();
    let batches = collect(plan.clone(), planned.task.clone()).await?;
    Ok((batches, plan))
}

/// X's rows as `Vec<f32>` each, from the dense layout.
fn dense_rows(batches: &[RecordBatch]) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    for batch in batches {
        let x = batch
            .column_by_name("X")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .expect("X is a fixed-size list");
        for i in 0..x.len() {
            rows.push(x.value(i).as_primitive::<Float32Type>().values().to_vec());
        }
    }
    rows
}

/// 100 cells x 1,000 genes, X[r, c] = r * 1000 + c, in chunks of 10 rows x 100 columns.
async fn column_chunked(
    dir: &std::path::Path,
) -> Result<Registry, Box<dyn std::error::Error + Send + Sync>> {
    let store = write_zarr_anndata_chunked(&dir.join("cols.zarr"), 100, 1000, [10, 100]);
    let registry = registry_with(&dir.join("data"), default_config());
    registry
        .register(store.to_str().unwrap_or_default(), "cols.zarr", None, true)
        .await?;
    Ok(registry)
}

#[tokio::test]
async fn rows_far_apart_in_a_chunk_are_decoded_alone_and_right() -> TestResult {
    let dir = tempfile::tempdir()?;
    // Chunks of 50 rows x 100 columns: rows 0 and 37 share a chunk, 74 is in the next one; the
    // variables span three column chunks, in an order of their own.
    let store = write_zarr_anndata_chunked(&dir.path().join("rows.zarr"), 100, 1000, [50, 100]);
    check_scattered_rows(dir.path(), &store, "n % 37 = 0", &[0, 37, 74]).await?;
    // Blosc in blocks of 32 KiB (8 rows of 1,000 float32): rows 0 and 5 share a block, 10 and 15
    // the next one; each block is decoded once and the rows are picked out of it.
    let store = write_zarr_anndata_blosc(
        &dir.path().join("blosc.zarr"),
        100,
        1000,
        [50, 1000],
        Some(32 << 10),
    );
    let every_fifth: Vec<u64> = (0..100).step_by(5).collect();
    check_scattered_rows(dir.path(), &store, "n % 5 = 0", &every_fifth).await
}

/// The rows `filter` selects from X (`X[r, c] = r * 1000 + c`) are `want_rows`, with every
/// column and with a few columns in an order of their own.
async fn check_scattered_rows(
    dir: &std::path::Path,
    store: &std::path::Path,
    filter: &str,
    want_rows: &[u64],
) -> TestResult {
    let key = store
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("a store name")?;
    let registry = registry_with(&dir.join(format!("data-{key}")), default_config());
    register_path(&registry, store, key).await?;
    for var_names in [json!(["gene999", "gene0", "gene150", "gene0"]), json!(null)] {
        let mut command = json!({"key": key, "element": ["X"], "filter": filter});
        if !var_names.is_null() {
            command["var_names"] = var_names.clone();
        }
        let (batches, _) = run(&registry, command).await?;
        let rows = dense_rows(&batches);
        let cols: Vec<u64> = match var_names.as_array() {
            Some(names) => names
                .iter()
                .filter_map(|n| n.as_str()?.strip_prefix("gene")?.parse().ok())
                .collect(),
            None => (0..1000).collect(),
        };
        let want: Vec<Vec<f32>> = want_rows
            .iter()
            .map(|&r| cols.iter().map(|&c| (r * 1000 + c) as f32).collect())
            .collect();
        assert_eq!(rows, want, "var_names {var_names}");
    }
    Ok(())
}

#[tokio::test]
async fn a_sparse_column_selection_reads_only_its_column_chunks() -> TestResult {
    let dir = tempfile::tempdir()?;
    let registry = column_chunked(dir.path()).await?;
    // The first and the last gene, the last one twice and first: the bounding box would be every
    // column chunk; the selection touches two.
    let command = json!({"key": "cols.zarr", "element": ["X"],
                         "var_names": ["gene999", "gene0", "gene999"]});
    let (batches, plan) = run(&registry, command).await?;
    let rows = dense_rows(&batches);
    assert_eq!(rows.len(), 100);
    for (r, row) in rows.iter().enumerate() {
        let r = r as f32 * 1000.0;
        assert_eq!(row, &[r + 999.0, r, r + 999.0], "row {r}");
    }
    let chunk_bytes = 10 * 100 * 4;
    let (reads, bytes) = (
        metric(&plan, "store_reads"),
        metric(&plan, "store_bytes_read"),
    );
    // Uncompressed chunks are even decoded partially: at most two column chunks per row chunk,
    // and far from the bounding box of the two columns (every column of every row).
    let bounding_box = 100 * 1000 * 4;
    assert!(
        reads > 0 && bytes <= 20 * chunk_bytes && bytes * 10 < bounding_box,
        "only two column chunks per row chunk ({reads} reads, {bytes} bytes):\n{}",
        shown(&plan)
    );

    // The whole width reads every chunk once.
    let (_, plan) = run(&registry, json!({"key": "cols.zarr", "element": ["X"]})).await?;
    assert_eq!(metric(&plan, "store_reads"), 100);
    Ok(())
}

#[tokio::test]
async fn an_empty_variable_selection_has_zero_width() -> TestResult {
    let dir = tempfile::tempdir()?;
    let registry = column_chunked(dir.path()).await?;
    for selection in [
        json!({"var_names": []}),
        json!({"var_filter": "var_names = 'no such gene'"}),
    ] {
        let mut command = json!({"key": "cols.zarr", "element": ["X"], "obs_range": [0, 5]});
        for (k, v) in selection.as_object().into_iter().flatten() {
            command[k] = v.clone();
        }
        let (batches, plan) = run(&registry, command).await?;
        let rows = dense_rows(&batches);
        assert_eq!(rows, vec![Vec::<f32>::new(); 5], "{selection}");
        assert_eq!(metric(&plan, "store_bytes_read"), 0, "nothing to read");
        let schema = batches[0].schema();
        assert_eq!(
            schema
                .metadata()
                .get("artiflight:shape")
                .map(String::as_str),
            Some("[5,0]")
        );
    }
    Ok(())
}

#[tokio::test]
async fn sql_name_predicates_reach_the_matrix_read() -> TestResult {
    let dir = tempfile::tempdir()?;
    let registry = column_chunked(dir.path()).await?;
    let (batches, plan) = sql(
        &registry,
        "SELECT obs_name, value FROM \"cols.zarr/X\" \
         WHERE var_name = 'gene150' AND obs_name IN ('cell3', 'cell57') ORDER BY obs_name",
    )
    .await?;
    let values: Vec<f32> = batches
        .iter()
        .flat_map(|b| b.column(1).as_primitive::<Float32Type>().values().to_vec())
        .collect();
    assert_eq!(values, vec![3150.0, 57150.0]);
    let text = shown(&plan);
    assert!(text.contains("2 of 100 rows x 1 of 1000 columns"), "{text}");
    // Two row chunks of one column chunk.
    assert_eq!(metric(&plan, "store_reads"), 2, "{text}");
    assert!(
        metric(&plan, "store_bytes_read") <= 2 * 10 * 100 * 4,
        "{text}"
    );

    // Names alone read no values.
    let (batches, plan) = sql(
        &registry,
        "SELECT obs_name, var_name FROM \"cols.zarr/X\" WHERE var_name IN ('gene1', 'gene2')",
    )
    .await?;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 200);
    assert_eq!(metric(&plan, "store_bytes_read"), 0, "{}", shown(&plan));

    // A name nobody has selects nothing (and is no error, unlike var_names in a command).
    let (batches, _) = sql(
        &registry,
        "SELECT count(*) FROM \"cols.zarr/X\" WHERE var_name = 'nope'",
    )
    .await?;
    assert_eq!(batches[0].column(0).as_primitive::<Int64Type>().value(0), 0);
    Ok(())
}

#[tokio::test]
async fn sql_count_is_the_number_of_rows_a_full_read_returns() -> TestResult {
    let dir = tempfile::tempdir()?;
    let registry = column_chunked(dir.path()).await?;
    register_path(&registry, &demo_file("pbmc68k.h5ad"), "pbmc68k.h5ad").await?;
    for table in [
        "cols.zarr/X",
        "cols.zarr/obs",
        "pbmc68k.h5ad/X",
        "pbmc68k.h5ad/obs",
        "pbmc68k.h5ad/var",
    ] {
        let (count, _) = sql(&registry, &format!("SELECT count(*) FROM \"{table}\"")).await?;
        let count = count[0].column(0).as_primitive::<Int64Type>().value(0) as usize;
        let (all, _) = sql(&registry, &format!("SELECT * FROM \"{table}\"")).await?;
        let rows: usize = all.iter().map(|b| b.num_rows()).sum();
        assert_eq!(count, rows, "{table}");
    }
    Ok(())
}

#[tokio::test]
async fn a_ticket_plans_the_same_on_a_server_with_other_partitions() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 40,000 x 200 float32: several endpoints at 2 partitions.
    let store = write_zarr_anndata(&dir.path().join("wide.zarr"), 40_000, 200, 1000);
    let data = dir.path().join("data");
    let issuer = registry_with(&data, artiflight_server::query::session_config(2));
    issuer
        .register(store.to_str().unwrap_or_default(), "wide.zarr", None, true)
        .await?;
    let command = Command::from_json(br#"{"key": "wide.zarr", "element": ["X"]}"#)?;
    let resolved = issuer.planner().resolve(&command).await?;
    let issued = issuer.planner().plan(&command, &resolved.sources).await?;
    assert_eq!(issued.endpoint_count(), 2);
    // Another server on the same catalog, with 7 partitions of its own: planning with the
    // ticket's partitions gives the same endpoints.
    let server = registry_with(&data, artiflight_server::query::session_config(7));
    let own = server.planner().plan(&command, &resolved.sources).await?;
    assert_ne!(
        own.endpoint_count(),
        2,
        "the test needs a server that differs"
    );
    let replayed = server
        .planner()
        .with_partitions(issuer.planner().target_partitions())
        .plan(&command, &resolved.sources)
        .await?;
    assert_eq!(replayed.endpoint_count(), 2);
    for e in 0..2 {
        let a = datafusion::physical_plan::common::collect(issued.execute(e)?).await?;
        let b = datafusion::physical_plan::common::collect(replayed.execute(e)?).await?;
        assert_eq!(a, b, "endpoint {e}");
    }
    Ok(())
}

#[tokio::test]
async fn a_zarr_store_removed_under_a_stream_is_an_error_never_fill_values() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 40,000 x 200 float32 in chunks of 1,000 rows: several blocks, most read after the removal.
    let store = write_zarr_anndata(&dir.path().join("gone.zarr"), 40_000, 200, 1000);
    let registry = registry_with(&dir.path().join("data"), session_config_one());
    registry
        .register(store.to_str().unwrap_or_default(), "gone.zarr", None, true)
        .await?;
    let command = Command::from_json(br#"{"key": "gone.zarr", "element": ["X"]}"#)?;
    let resolved = registry.planner().resolve(&command).await?;
    let planned = registry.planner().plan(&command, &resolved.sources).await?;
    let mut stream = planned.execute(0)?;
    use futures::StreamExt;
    let first = stream.next().await.ok_or("no first batch")??;
    assert!(first.num_rows() > 0);
    // The user removes the store (not through the catalog, so no lease keeps it).
    std::fs::remove_dir_all(&store)?;
    let mut failed = false;
    while let Some(batch) = stream.next().await {
        match batch {
            Ok(batch) => {
                // A block read before the removal: its values are the stored ones, never zeros.
                for row in dense_rows(&[batch]) {
                    assert!(
                        row[1..].iter().all(|&v| v != 0.0),
                        "fill values were served"
                    );
                }
            }
            Err(e) => {
                assert!(e.to_string().contains("removed"), "{e}");
                failed = true;
                break;
            }
        }
    }
    assert!(
        failed,
        "a stream over a removed store ended without an error"
    );
    Ok(())
}

/// One partition: every block of the matrix is in the one stream this test reads.
fn session_config_one() -> datafusion::prelude::SessionConfig {
    artiflight_server::query::session_config(1)
}
