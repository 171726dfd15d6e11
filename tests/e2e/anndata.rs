//! AnnData readers: chunk-aware subset reads (counted at the store), errors for unknown elements,
//! bad filters and damaged files, all while the server keeps serving.

use arrow::array::{Array, AsArray, FixedSizeListArray};
use arrow::datatypes::Float32Type;
use artiflight_client::{Code, Request};
use artiflight_server::query::Command;
use datafusion::physical_plan::display::DisplayableExecutionPlan;
use serde_json::json;

use crate::common::*;

fn code_of<T>(result: Result<T, artiflight_client::Error>) -> (Option<Code>, String) {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => (e.code(), e.to_string()),
    }
}

#[tokio::test]
async fn a_one_percent_subset_reads_only_its_chunks() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 1000 cells x 50 genes in 100 chunks of 10 rows.
    let store = write_zarr_anndata(&dir.path().join("big.zarr"), 1000, 50, 10);
    let registry = registry_with(&dir.path().join("data"), default_config());
    registry
        .register(store.to_str().unwrap_or_default(), "big.zarr", None, true)
        .await?;

    // 1 %: rows 0, 100, ..., 900, one per chunk of ten.
    let subset = json!({"key": "big.zarr", "element": ["X"], "filter": "n % 100 = 0"});
    let (batches, plan) = run(&registry, subset).await?;
    let mut rows = Vec::new();
    for batch in &batches {
        let x = batch
            .column_by_name("X")
            .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
            .ok_or("X is not a fixed-size list")?;
        for i in 0..x.len() {
            let row = x.value(i);
            let values = row.as_primitive::<Float32Type>();
            rows.push(values.value(0) as u64 / 1000);
            assert_eq!(values.value(49), values.value(0) + 49.0);
        }
    }
    assert_eq!(rows, (0..10).map(|i| i * 100).collect::<Vec<u64>>());
    let shown = DisplayableExecutionPlan::with_metrics(plan.as_ref())
        .indent(true)
        .to_string();
    let (chunk_bytes, row_bytes) = (10 * 50 * 4, 50 * 4);
    let (reads, bytes) = (
        metric(&plan, "store_reads"),
        metric(&plan, "store_bytes_read"),
    );
    assert_eq!(reads, 10, "one read per selected chunk:\n{shown}");
    // Uncompressed chunks are even decoded partially: at least the rows, at most their chunks.
    assert!(
        (10 * row_bytes..=10 * chunk_bytes).contains(&bytes),
        "only the selected chunks' bytes ({bytes}):\n{shown}"
    );

    // The full matrix, for contrast: every chunk, once.
    let (batches, plan) = run(&registry, json!({"key": "big.zarr", "element": ["X"]})).await?;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1000);
    assert_eq!(metric(&plan, "store_reads"), 100);

    // A contiguous range reads its chunks only.
    let range = json!({"key": "big.zarr", "element": ["X"], "obs_range": [15, 35]});
    let (batches, plan) = run(&registry, range).await?;
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 20);
    assert_eq!(
        metric(&plan, "store_reads"),
        3,
        "rows 15..35 touch chunks 1, 2, 3"
    );
    Ok(())
}

#[tokio::test]
async fn large_matrices_split_into_chunk_aligned_endpoints() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 40,000 x 200 float32 = 32 MB: more than one endpoint's worth.
    let store = write_zarr_anndata(&dir.path().join("wide.zarr"), 40_000, 200, 1000);
    let registry = registry_with(&dir.path().join("data"), default_config());
    registry
        .register(store.to_str().unwrap_or_default(), "wide.zarr", None, true)
        .await?;
    let command = Command::from_json(br#"{"key": "wide.zarr", "element": ["X"]}"#)?;
    let planner = registry.planner();
    let resolved = planner.resolve(&command).await?;
    let planned = planner.plan(&command, &resolved.sources).await?;
    let endpoints = planned.endpoint_count();
    assert!(endpoints > 1, "one endpoint for 32 MB");
    // Each endpoint starts on a chunk boundary, and together they give every row once, in order.
    let mut next = 0u64;
    for e in 0..endpoints {
        let batches = datafusion::physical_plan::common::collect(planned.execute(e)?).await?;
        let mut first = true;
        for batch in &batches {
            let names = batch.column(0).as_string::<i32>();
            for i in 0..batch.num_rows() {
                let row: u64 = names.value(i).trim_start_matches("cell").parse()?;
                assert_eq!(row, next);
                if first {
                    assert_eq!(row % 1000, 0, "endpoint {e} starts mid-chunk at {row}");
                    first = false;
                }
                next += 1;
            }
        }
    }
    assert_eq!(next, 40_000);
    Ok(())
}

#[tokio::test]
async fn unknown_elements_and_bad_filters_are_named() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    for (name, path) in [("demo.h5ad", "pbmc68k.h5ad"), ("demo.zarr", "pbmc68k.zarr")] {
        client
            .action("register", json!({"path": demo_file(path), "key": name}))
            .await?;
        for element in [
            vec!["obsm", "nope"],
            vec!["layers", "nope"],
            vec!["nope"],
            vec!["obsp", "x", "y"],
        ] {
            let request = Request::key(name).element(element.iter().copied());
            let (code, msg) = code_of(client.info(&request).await);
            assert_eq!(code, Some(Code::NotFound), "{element:?}: {msg}");
            assert!(msg.contains("nope") || msg.contains('y'), "{msg}");
        }
        let request = Request::key(name)
            .element(["X"])
            .filter("no_such_column > 1");
        let (code, msg) = code_of(client.info(&request).await);
        assert_eq!(code, Some(Code::InvalidArgument), "{msg}");
        assert!(msg.contains("no_such_column"), "{msg}");
        let (code, msg) = code_of(
            client
                .info(&Request::key(name).element(["X"]).filter("cell_type = "))
                .await,
        );
        assert_eq!(code, Some(Code::InvalidArgument), "{msg}");
    }
    Ok(())
}

#[tokio::test]
async fn damaged_files_are_reported_and_the_server_keeps_serving() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    let root = server.dir.path();

    // A truncated h5ad, registered intact first.
    let h5ad = root.join("cut.h5ad");
    std::fs::copy(demo_file("pbmc68k.h5ad"), &h5ad)?;
    client
        .action("register", json!({"path": h5ad, "key": "cut.h5ad"}))
        .await?;
    let bytes = std::fs::read(&h5ad)?;
    std::fs::write(&h5ad, &bytes[..bytes.len() / 2])?;
    let (code, msg) = code_of(
        client
            .collect(&Request::key("cut.h5ad").element(["X"]))
            .await,
    );
    assert!(code == Some(Code::DataLoss), "{code:?}: {msg}");
    assert!(msg.contains("cut.h5ad"), "names the file: {msg}");

    // A zarr store whose X chunk is garbage, and one whose metadata is not JSON.
    let zarr = root.join("bad.zarr");
    write_zarr_anndata(&zarr, 100, 10, 10);
    client
        .action("register", json!({"path": zarr, "key": "bad.zarr"}))
        .await?;
    std::fs::write(zarr.join("X/c/3/0"), b"garbage")?;
    let (code, msg) = code_of(
        client
            .collect(&Request::key("bad.zarr").element(["X"]))
            .await,
    );
    assert!(code == Some(Code::DataLoss), "{code:?}: {msg}");
    assert!(msg.contains("bad.zarr"), "names the file: {msg}");
    std::fs::write(zarr.join("obs/zarr.json"), b"{ not json")?;
    let (code, msg) = code_of(client.collect(&Request::key("bad.zarr")).await);
    assert!(code == Some(Code::DataLoss), "{code:?}: {msg}");
    assert!(msg.contains("bad.zarr"), "names the file: {msg}");

    // A file that is not HDF5 at all is refused at registration.
    let bogus = root.join("bogus.h5ad");
    std::fs::write(&bogus, b"not hdf5")?;
    let (code, msg) = code_of(
        client
            .action("register", json!({"path": bogus, "key": "bogus.h5ad"}))
            .await,
    );
    assert!(code == Some(Code::DataLoss), "{code:?}: {msg}");
    assert!(msg.contains("bogus.h5ad"), "{msg}");

    // Still serving.
    client
        .action(
            "register",
            json!({"path": demo_file("pbmc68k.zarr"), "key": "ok.zarr"}),
        )
        .await?;
    let (_, batches) = client
        .collect(&Request::key("ok.zarr").element(["X"]))
        .await?;
    assert_eq!(rows(&batches), 70);
    Ok(())
}
