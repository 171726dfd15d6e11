//! In-process full scan over Flight: a generated sharded folder served on 127.0.0.1 and read back
//! with the Rust client. Prints rows, seconds and GB/s (Arrow in-memory bytes).
//!
//! `cargo bench --bench flight_scan -- [ROWS]` (default 2,000,000 rows in 8 shards). For the
//! comparison with pyarrow's own Flight server, see `benches/compare.py`.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use artiflight_client::{Client, Request};
use artiflight_server::{Server, ServerOptions};
use futures::TryStreamExt;
use parquet::arrow::ArrowWriter;

const SHARDS: usize = 8;
const REPEAT: usize = 5;

fn write(dir: &std::path::Path, rows: usize) -> Result<(), Box<dyn std::error::Error>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float64, false),
        Field::new("label", DataType::Utf8, false),
    ]));
    let per = rows / SHARDS;
    for s in 0..SHARDS {
        let sub = dir.join(format!("shard={s}"));
        std::fs::create_dir_all(&sub)?;
        let mut writer = ArrowWriter::try_new(
            std::fs::File::create(sub.join("part-0.parquet"))?,
            schema.clone(),
            None,
        )?;
        let start = (s * per) as i64;
        let ids: Vec<i64> = (start..start + per as i64).collect();
        writer.write(&RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids.clone())),
                Arc::new(Float64Array::from(
                    ids.iter().map(|i| *i as f64).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(
                    ids.iter()
                        .map(|i| ["a", "b", "c"][(*i % 3) as usize])
                        .collect::<Vec<_>>(),
                )),
            ],
        )?)?;
        writer.close()?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rows: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let dir = tempfile::tempdir()?;
    let folder = dir.path().join("scan");
    write(&folder, rows)?;
    let server = Server::open(&ServerOptions::new(dir.path().join("data")))?;
    server
        .registry()
        .register(folder.to_str().unwrap_or_default(), "scan", None, true)
        .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("grpc://{}", listener.local_addr()?);
    let running = server.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        running
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    let client = Client::connect(&url).await?;
    let mut best = f64::MAX;
    let mut bytes = 0;
    for _ in 0..REPEAT {
        let start = Instant::now();
        let (_, stream) = client.get(&Request::key("scan")).await?;
        let batches: Vec<RecordBatch> = stream.try_collect().await?;
        best = best.min(start.elapsed().as_secs_f64());
        bytes = batches
            .iter()
            .map(|b| b.get_array_memory_size())
            .sum::<usize>();
        assert_eq!(
            batches.iter().map(|b| b.num_rows()).sum::<usize>(),
            rows / SHARDS * SHARDS
        );
    }
    println!(
        "flight_scan: {rows} rows, best of {REPEAT}: {best:.3} s, {:.2} GB/s",
        bytes as f64 / best / 1e9
    );
    let _ = stop.send(());
    handle.await??;
    Ok(())
}
