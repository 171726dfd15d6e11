//! Reading, writing and versioning through the Flight service.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use artiflight_client::{Code, Request};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn full_scan_equals_the_files() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    let info = client.info(&Request::key("sharded_parquet")).await?;
    let files = read_files(&demo_dir());
    let expected_rows: usize = files.iter().map(|(_, b)| rows(b)).sum();
    assert_eq!(
        info.total_records, expected_rows as i64,
        "exact count from parquet metadata"
    );
    assert!(info.ordered);
    let record: serde_json::Value = serde_json::from_slice(&info.app_metadata)?;
    assert_eq!(record["key"], "sharded_parquet");
    assert_eq!(record["n_files"], 11);
    assert_eq!(record["n_observations"], expected_rows);

    let (schema, batches) = client.collect(&Request::key("sharded_parquet")).await?;
    assert_eq!(
        schema.field_with_name("louvain")?.data_type(),
        &DataType::Int32
    );
    assert!(
        schema.metadata().contains_key("pandas"),
        "file metadata kept"
    );
    for batch in &batches {
        assert_eq!(
            batch.schema().fields(),
            schema.fields(),
            "stream schema equals announced schema"
        );
    }
    // Row for row, in path order: the files' own columns, and louvain from the folder names.
    let mut expected_genes = Vec::new();
    let mut expected_louvain = Vec::new();
    for (path, file_batches) in &files {
        let genes = column_strings(file_batches, "n_genes");
        let louvain = path
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("louvain="))
            .expect("hive dir")
            .to_string();
        expected_louvain.extend(std::iter::repeat_n(louvain, genes.len()));
        expected_genes.extend(genes);
    }
    assert_eq!(column_strings(&batches, "n_genes"), expected_genes);
    assert_eq!(column_strings(&batches, "louvain"), expected_louvain);
    Ok(())
}

#[tokio::test]
async fn filter_columns_limit_equal_datafusion_alone() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    // The independent reader: a DataFusion session reading the folder itself.
    let ctx = SessionContext::new();
    let options = ParquetReadOptions::default()
        .table_partition_cols(vec![("louvain".to_string(), DataType::Int32)]);
    ctx.register_parquet("t", demo_dir().to_str().unwrap_or_default(), options)
        .await?;
    let cases = [
        "louvain = 3",
        "louvain IN (1, 2) AND n_genes > 700",
        "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05",
        "louvain = '3'",
        "n_genes BETWEEN 600 AND 650 OR phase = 'G2M'",
    ];
    for filter in cases {
        let (_, ours) = client
            .collect(&Request::key("sharded_parquet").filter(filter).columns([
                "n_genes",
                "percent_mito",
                "louvain",
            ]))
            .await?;
        let theirs = ctx
            .sql(&format!(
                "SELECT n_genes, percent_mito, louvain FROM t WHERE {filter}"
            ))
            .await?
            .collect()
            .await?;
        let mut a: Vec<String> = sorted_rows(&ours);
        let mut b: Vec<String> = sorted_rows(&theirs);
        a.sort();
        b.sort();
        assert!(!b.is_empty(), "{filter} selects rows");
        assert_eq!(a, b, "filter {filter}");
    }
    let (schema, limited) = client
        .collect(
            &Request::key("sharded_parquet")
                .columns(["percent_mito", "cell_type"])
                .limit(7),
        )
        .await?;
    assert_eq!(rows(&limited), 7);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["percent_mito", "cell_type"]);
    let (_, none) = client
        .collect(&Request::key("sharded_parquet").limit(0))
        .await?;
    assert_eq!(rows(&none), 0);
    Ok(())
}

fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let Some(first) = batches.first() else {
        return Vec::new();
    };
    let names: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let columns: Vec<Vec<String>> = names.iter().map(|n| column_strings(batches, n)).collect();
    (0..rows(batches))
        .map(|i| {
            columns
                .iter()
                .map(|c| c[i].clone())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

#[tokio::test]
async fn put_versions_and_collections() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = |ids: Vec<i64>| {
        let names: Vec<Option<String>> = ids
            .iter()
            .map(|i| (i % 2 == 0).then(|| format!("n{i}")))
            .collect();
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(names)),
            ],
        )
    };
    let v1 = client.put("uploads", vec![batch(vec![1, 2, 3])?]).await?;
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["n_observations"], 3);
    let again = client.put("uploads", vec![batch(vec![1, 2, 3])?]).await?;
    assert_eq!(
        again["uid"], v1["uid"],
        "same content returns the existing record"
    );
    let v2 = client
        .put("uploads", vec![batch(vec![4, 5])?, batch(vec![6])?])
        .await?;
    assert_eq!(v2["version"], 2);
    assert_eq!(
        v2["uid"].as_str().map(|s| &s[..16]),
        v1["uid"].as_str().map(|s| &s[..16])
    );

    let (_, latest) = client.collect(&Request::key("uploads")).await?;
    assert_eq!(column_strings(&latest, "id"), ["4", "5", "6"]);
    let old = v1["uid"].as_str().unwrap_or_default();
    let (_, first) = client
        .collect(&Request::key("uploads").version(old))
        .await?;
    assert_eq!(column_strings(&first, "id"), ["1", "2", "3"]);
    assert_eq!(column_strings(&first, "name"), ["", "n2", ""]);

    let versions = client
        .action("list_versions", json!({"key": "uploads"}))
        .await?;
    assert_eq!(versions.as_array().map(Vec::len), Some(2));

    // A collection of both versions' keys: rows in member order, columns unified.
    let extra = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("score", DataType::Int64, false),
    ]));
    let other = RecordBatch::try_new(
        extra.clone(),
        vec![
            Arc::new(Int64Array::from(vec![10, 11])),
            Arc::new(Int64Array::from(vec![7, 8])),
        ],
    )?;
    client.put("more", vec![other]).await?;
    let collection = client
        .action(
            "create_collection",
            json!({"key": "both", "members": ["uploads", "more"]}),
        )
        .await?;
    assert_eq!(collection["kind"], "collection");
    let info = client.info(&Request::key("both")).await?;
    assert!(info.ordered);
    let (schema, batches) = client.collect(&Request::key("both")).await?;
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["id", "name", "score"]);
    assert_eq!(column_strings(&batches, "id"), ["4", "5", "6", "10", "11"]);
    assert_eq!(column_strings(&batches, "score"), ["", "", "", "7", "8"]);
    let (_, filtered) = client
        .collect(&Request::key("both").filter("id > 5"))
        .await?;
    assert_eq!(column_strings(&filtered, "id"), ["6", "10", "11"]);

    // A query set over every upload, in key order.
    let (_, query) = client
        .collect(&Request::query(json!({"key_prefix": "mor"})).columns(["id"]))
        .await?;
    assert_eq!(column_strings(&query, "id"), ["10", "11"]);

    // A clash names the member and the column.
    let clash = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["x"]))],
    )?;
    client.put("clash", vec![clash]).await?;
    let err = client
        .action(
            "create_collection",
            json!({"key": "bad", "members": ["uploads", "clash"]}),
        )
        .await
        .expect_err("type clash");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(
        err.to_string().contains("clash") && err.to_string().contains("'id'"),
        "{err}"
    );

    // Delete to trash: the key is gone, the old version stays readable by uid.
    client
        .action("delete", json!({"key": "uploads", "version": v2["uid"]}))
        .await?;
    let (_, back) = client.collect(&Request::key("uploads")).await?;
    assert_eq!(column_strings(&back, "id"), ["1", "2", "3"]);
    Ok(())
}

#[tokio::test]
async fn listing_and_describe() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    let all = client.list(None).await?;
    assert_eq!(all.len(), 1);
    let info = &all[0];
    assert_eq!(
        info.flight_descriptor.as_ref().map(|d| d.path.clone()),
        Some(vec!["sharded_parquet".to_string()])
    );
    assert_eq!(info.total_records, 700);
    assert!(info.clone().try_decode_schema().is_ok());
    assert!(
        client
            .list(Some(json!({"suffix": ".h5ad"})))
            .await?
            .is_empty()
    );
    assert_eq!(
        client
            .list(Some(json!({"key_prefix": "sharded"})))
            .await?
            .len(),
        1
    );
    let described = client
        .action("describe", json!({"key": "sharded_parquet"}))
        .await?;
    assert_eq!(described["suffix"], "");
    assert_eq!(described["otype"], "DataFrame");
    assert_eq!(described["uid"].as_str().map(str::len), Some(20));
    Ok(())
}

#[tokio::test]
async fn many_shards_give_many_endpoints_in_order() -> TestResult {
    let server = TestServer::start().await?;
    let dir = write_sorted_folder(&server.dir.path().join("sorted"), 8, 2_000, 500);
    let client = server.client().await?;
    client
        .action("register", json!({"path": dir, "key": "sorted"}))
        .await?;
    let info = client.info(&Request::key("sorted")).await?;
    assert!(info.endpoint.len() > 1, "{} endpoints", info.endpoint.len());
    assert_eq!(info.total_records, 16_000);
    let (_, batches) = client
        .collect(&Request::key("sorted").columns(["id"]))
        .await?;
    let ids = column_strings(&batches, "id");
    let expected: Vec<String> = (0..16_000).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected, "endpoints in order, rows in order");
    Ok(())
}

#[tokio::test]
async fn csv_and_arrow_files_read_back_as_written() -> TestResult {
    let server = TestServer::start().await?;
    let client = server.client().await?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, true),
        Field::new("name", DataType::Utf8, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![3, 1, 2])),
            Arc::new(StringArray::from(vec!["c", "a", "b"])),
        ],
    )?;
    let csv = server.dir.path().join("table.csv");
    let mut writer = arrow::csv::Writer::new(std::fs::File::create(&csv)?);
    writer.write(&batch)?;
    drop(writer);
    let ipc = server.dir.path().join("table.arrow");
    let mut writer =
        arrow::ipc::writer::FileWriter::try_new(std::fs::File::create(&ipc)?, &schema)?;
    writer.write(&batch)?;
    writer.finish()?;
    for (path, key, suffix) in [(&csv, "csv", ".csv"), (&ipc, "ipc", ".arrow")] {
        let record = client
            .action("register", json!({"path": path, "key": key}))
            .await?;
        assert_eq!(record["suffix"], suffix);
        let (_, batches) = client.collect(&Request::key(key)).await?;
        assert_eq!(column_strings(&batches, "id"), ["3", "1", "2"], "{key}");
        assert_eq!(column_strings(&batches, "name"), ["c", "a", "b"], "{key}");
        let (_, filtered) = client
            .collect(&Request::key(key).filter("id >= 2").columns(["name"]))
            .await?;
        assert_eq!(column_strings(&filtered, "name"), ["c", "b"], "{key}");
    }
    Ok(())
}

#[tokio::test]
async fn a_vanished_client_does_not_stop_the_server() -> TestResult {
    use futures::StreamExt;
    let server = TestServer::start().await?;
    let dir = write_sorted_folder(&server.dir.path().join("big"), 2, 200_000, 10_000);
    let client = server.client().await?;
    client
        .action("register", json!({"path": dir, "key": "big"}))
        .await?;
    // Take one batch of each stream and hang up, a few times over.
    for _ in 0..5 {
        let (_, mut stream) = client.get(&Request::key("big")).await?;
        let first = stream.next().await.expect("a batch")?;
        assert!(first.num_rows() > 0);
        drop(stream);
    }
    let (_, batches) = client
        .collect(
            &Request::key("big")
                .filter("id % 100000 = 0")
                .columns(["id"]),
        )
        .await?;
    assert_eq!(
        column_strings(&batches, "id"),
        ["0", "100000", "200000", "300000"]
    );
    Ok(())
}

/// Tickets carry what to plan: the server that issued them hands its plan over, and any other
/// server (here: the same data dir after a restart) or a second fetch plans them again.
#[tokio::test]
async fn tickets_read_the_same_whoever_plans_them() -> TestResult {
    let server = demo_server().await?;
    let request = Request::key("sharded_parquet")
        .filter("louvain IN (1, 2, 7) AND n_genes > 600")
        .columns(["n_genes", "louvain"]);
    let info = server.client().await?.info(&request).await?;
    assert!(info.endpoint.len() >= 2);
    let read = |client: artiflight_client::Client, info: arrow_flight::FlightInfo| async move {
        let (_, stream) = client.get_info(&info)?;
        let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(stream).await?;
        Ok::<_, artiflight_client::Error>(column_strings(&batches, "n_genes"))
    };
    let handed_over = read(server.client().await?, info.clone()).await?;
    let fetched_again = read(server.client().await?, info.clone()).await?;
    let server = server.restart().await?;
    let elsewhere = read(server.client().await?, info).await?;
    assert!(!handed_over.is_empty());
    assert_eq!(handed_over, fetched_again);
    assert_eq!(handed_over, elsewhere);
    Ok(())
}
