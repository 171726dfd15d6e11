//! Benches of the internals, in bytes per second: Flight batch encoding, parquet pruning (a
//! filter on a sorted id over many row groups), and AnnData slice reads from HDF5 and zarr.
//! Everything runs in-process through the server crate's public planner, no network.
//!
//! `cargo bench --bench internals` prints, per bench, the best and median time of `RUNS` runs
//! after a warm-up, and the bytes per second at the best. (Criterion would do the statistics, but
//! its dependencies change the features of crates arrow shares, which rebuilds the whole arrow and
//! DataFusion stack.) The end-to-end cases next to their peers are in `benches/harness.py`.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::encode::FlightDataEncoderBuilder;
use artiflight_server::query::Command;
use artiflight_server::registry::Registry;
use artiflight_server::{Server, ServerOptions};
use futures::{StreamExt, TryStreamExt, stream};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::time::Instant;

use tokio::runtime::Runtime;

const ROWS: usize = 1_000_000;
const RUNS: usize = 20;

/// Times `f` (which returns the bytes it produced) and prints one line.
fn bench(name: &str, mut f: impl FnMut() -> usize) {
    let bytes = f();
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "{name:<40} best {:>9.3} ms  median {:>9.3} ms  {:>8.1} MB  {:>7.2} GB/s",
        times[0] * 1e3,
        times[RUNS / 2] * 1e3,
        bytes as f64 / 1e6,
        bytes as f64 / times[0] / 1e9
    );
}

fn batch(start: i64, rows: usize) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Float64, false),
        Field::new("label", DataType::Utf8, false),
    ]));
    let ids: Vec<i64> = (start..start + rows as i64).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Float64Array::from_iter_values(
                ids.iter().map(|i| *i as f64 * 0.5),
            )),
            Arc::new(StringArray::from_iter_values(
                ids.iter()
                    .map(|i| ["alpha", "beta", "gamma"][(*i % 3) as usize]),
            )),
        ],
    )
    .expect("batch")
}

/// A sorted folder: 4 shards, row groups of 10,000 rows, so that a narrow filter prunes most.
fn sorted_folder(dir: &std::path::Path) -> std::path::PathBuf {
    let folder = dir.join("sorted");
    let per = ROWS / 4;
    for shard in 0..4 {
        let sub = folder.join(format!("part={shard}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let data = batch((shard * per) as i64, per);
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(10_000))
            .build();
        let file = std::fs::File::create(sub.join("data.parquet")).expect("create");
        let mut writer = ArrowWriter::try_new(file, data.schema(), Some(props)).expect("writer");
        writer.write(&data).expect("write");
        writer.close().expect("close");
    }
    folder
}

/// Plans a command and executes every partition in-process; returns the result's bytes.
async fn run(registry: &Registry, command: &Command) -> usize {
    let planner = registry.planner();
    let resolved = planner.resolve(command).await.expect("resolve");
    let planned = planner
        .plan(command, &resolved.sources)
        .await
        .expect("plan");
    let mut bytes = 0;
    for partition in 0..planned.endpoint_count() {
        let batches: Vec<RecordBatch> = planned
            .execute(partition)
            .expect("execute")
            .try_collect()
            .await
            .expect("stream");
        bytes += batches
            .iter()
            .map(|b| b.get_array_memory_size())
            .sum::<usize>();
    }
    bytes
}

fn command(json: &str) -> Command {
    Command::from_json(json.as_bytes()).expect("command")
}

fn main() {
    let rt = Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::open(&ServerOptions::new(dir.path().join("data"))).expect("server");
    let registry = server.registry().clone();
    let folder = sorted_folder(dir.path());
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("demo");
    rt.block_on(async {
        let path = |p: &std::path::Path| p.to_str().unwrap_or_default().to_string();
        registry
            .register(&path(&folder), "sorted", None, true)
            .await
            .expect("register");
        for name in ["pbmc68k.h5ad", "pbmc68k.zarr"] {
            registry
                .register(&path(&demo.join(name)), name, None, true)
                .await
                .expect("register");
        }
    });

    // Flight encoding counts the Arrow bytes it was given.
    let data = batch(0, ROWS);
    let size = data.get_array_memory_size();
    bench("encode: FlightData, 1 M rows x 3 columns", || {
        rt.block_on(async {
            let batches = stream::iter([Ok(data.clone())]);
            let body: usize = FlightDataEncoderBuilder::new()
                .build(batches)
                .map(|m| m.map(|m| m.data_body.len()).unwrap_or(0))
                .fold(0usize, |a, n| async move { a + n })
                .await;
            std::hint::black_box(body);
            size
        })
    });

    let narrow = command(r#"{"key": "sorted", "filter": "id BETWEEN 500000 AND 509999"}"#);
    bench("pruning: 1 % of a sorted id, 100 groups", || {
        rt.block_on(run(&registry, &narrow))
    });

    for name in ["pbmc68k.h5ad", "pbmc68k.zarr"] {
        let subset = command(&format!(
            r#"{{"key": "{name}", "element": ["X"], "filter": "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05"}}"#
        ));
        bench(&format!("anndata slice: X of 35 cells, {name}"), || {
            rt.block_on(run(&registry, &subset))
        });
    }
}
