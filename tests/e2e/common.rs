//! Shared fixtures: a server on an ephemeral port, generated parquet folders.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use artiflight_client::Client;
use artiflight_server::catalog::Catalog;
use artiflight_server::query::{Command, Planner, session_config};
use artiflight_server::registry::Registry;
use artiflight_server::storage::Storage;
use artiflight_server::{Server, ServerOptions};
use datafusion::physical_plan::ExecutionPlan;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The demo folder committed in the repository.
pub(crate) fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("demo/sharded_parquet")
}

/// A server running in-process until dropped.
pub(crate) struct TestServer {
    pub(crate) url: String,
    pub(crate) server: Server,
    pub(crate) dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Ends when `serve` returns, with its result.
    pub(crate) served: Option<tokio::task::JoinHandle<artiflight_server::error::Result<()>>>,
}

impl TestServer {
    pub(crate) async fn start() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_in(tempfile::tempdir()?, |_| {}).await
    }

    /// A server whose options `configure` changes first (auth, limits).
    pub(crate) async fn start_with(
        configure: impl FnOnce(&mut ServerOptions),
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Self::start_in(tempfile::tempdir()?, configure).await
    }

    /// Asks the server to shut down, as SIGTERM does, and waits for `serve` to return.
    pub(crate) async fn shutdown(
        mut self,
    ) -> Result<std::time::Duration, Box<dyn std::error::Error + Send + Sync>> {
        let started = std::time::Instant::now();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            tokio::time::timeout(std::time::Duration::from_secs(30), served).await???;
        }
        Ok(started.elapsed())
    }

    /// Stops this server and starts a new one on the same data dir and files.
    pub(crate) async fn restart(
        mut self,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir()?);
        drop(self);
        Self::start_in(dir, |_| {}).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut ServerOptions),
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let mut options = ServerOptions::new(dir.path().join("data"));
        options.allow_roots = vec![dir.path().display().to_string()];
        // Endpoint counts follow the partitions: fixed, so tests do not depend on the machine.
        options.target_partitions = 2;
        configure(&mut options);
        let server = Server::open(&options)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("grpc://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = server.clone();
        let served = tokio::spawn(async move {
            running
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            url,
            server,
            dir,
            stop: Some(stop),
            served: Some(served),
        })
    }

    pub(crate) async fn client(&self) -> Result<Client, artiflight_client::Error> {
        Client::connect(&self.url).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server with the committed demo folder registered as `sharded_parquet`.
pub(crate) async fn demo_server() -> Result<TestServer, Box<dyn std::error::Error + Send + Sync>> {
    let server = TestServer::start().await?;
    register_demo(&server).await?;
    Ok(server)
}

/// Registers the committed demo folder as `sharded_parquet`, as the operator does.
pub(crate) async fn register_demo(
    server: &TestServer,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    register_path(server.server.registry(), &demo_dir(), "sharded_parquet").await
}

/// Registers `path` under `key` as the operator's command line does (any root).
pub(crate) async fn register_path(
    registry: &Registry,
    path: &Path,
    key: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let path = path.to_str().ok_or("a path that is not UTF-8")?;
    registry.register(path, key, None, true).await?;
    Ok(())
}

/// A registry over `data_dir` whose plans run with `config`, for planner-level tests.
pub(crate) fn registry_with(
    data_dir: &Path,
    config: datafusion::prelude::SessionConfig,
) -> Registry {
    let storage = Arc::new(Storage::new(data_dir, &[]).expect("storage"));
    let catalog = Catalog::open_sqlite(&data_dir.join("catalog.sqlite")).expect("catalog");
    Registry::new(Planner::new(catalog, storage, config))
}

pub(crate) fn default_config() -> datafusion::prelude::SessionConfig {
    session_config(4)
}

pub(crate) fn sorted_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("value", DataType::Float64, false),
        Field::new("label", DataType::Utf8, false),
    ]))
}

/// Writes `shards` parquet files of `rows_per_shard` rows under `dir/part=P/`, `id` increasing
/// across the whole folder, in row groups of `row_group` rows.
pub(crate) fn write_sorted_folder(
    dir: &Path,
    shards: usize,
    rows_per_shard: usize,
    row_group: usize,
) -> PathBuf {
    let schema = sorted_schema();
    for shard in 0..shards {
        let sub = dir.join(format!("part={shard}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        let file = std::fs::File::create(sub.join("data.parquet")).expect("create");
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(row_group))
            .build();
        let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props)).expect("writer");
        let start = (shard * rows_per_shard) as i64;
        let ids: Vec<i64> = (start..start + rows_per_shard as i64).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(ids.clone())),
                Arc::new(Float64Array::from(
                    ids.iter().map(|i| *i as f64 * 0.5).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(
                    ids.iter()
                        .map(|i| format!("l{}", i % 7))
                        .collect::<Vec<_>>(),
                )),
            ],
        )
        .expect("batch");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }
    dir.to_path_buf()
}

/// Reads every parquet file under `dir` in path order with the parquet crate alone.
pub(crate) fn read_files(dir: &Path) -> Vec<(PathBuf, Vec<RecordBatch>)> {
    let mut files = Vec::new();
    collect_files(dir, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let file = std::fs::File::open(&path).expect("open");
            let reader =
                parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                    .expect("reader")
                    .build()
                    .expect("build");
            let batches = reader.collect::<Result<Vec<_>, _>>().expect("read");
            (path, batches)
        })
        .collect()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
}

/// Concatenates a column of batches into strings, for order-sensitive comparisons.
pub(crate) fn column_strings(batches: &[RecordBatch], name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for batch in batches {
        let column = batch
            .column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"));
        let formatter =
            arrow::util::display::ArrayFormatter::try_new(column.as_ref(), &Default::default())
                .expect("formatter");
        for i in 0..batch.num_rows() {
            out.push(formatter.value(i).to_string());
        }
    }
    out
}

pub(crate) fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

/// Writes a minimal AnnData zarr (format 3) store with zarrs: `n_obs x n_vars` float32 `X` with
/// value `row * 1000 + col`, chunked by `chunk_rows` rows and uncompressed; obs has an `n` column
/// (the row number) and string names `cell{row}`; var names `gene{col}`.
pub(crate) fn write_zarr_anndata(path: &Path, n_obs: u64, n_vars: u64, chunk_rows: u64) -> PathBuf {
    write_zarr_anndata_chunked(path, n_obs, n_vars, [chunk_rows, n_vars])
}

/// [`write_zarr_anndata`] with X in chunks of `chunks` (rows, columns).
pub(crate) fn write_zarr_anndata_chunked(
    path: &Path,
    n_obs: u64,
    n_vars: u64,
    chunks: [u64; 2],
) -> PathBuf {
    write_zarr_anndata_blosc(path, n_obs, n_vars, chunks, None)
}

/// [`write_zarr_anndata_chunked`], X compressed with blosc (lz4, byte shuffle) in blocks of
/// `blosc_block` bytes when given, as zarr-python writes it.
pub(crate) fn write_zarr_anndata_blosc(
    path: &Path,
    n_obs: u64,
    n_vars: u64,
    chunks: [u64; 2],
    blosc_block: Option<usize>,
) -> PathBuf {
    use zarrs::array::{ArrayBuilder, ArraySubset, data_type};
    use zarrs::group::GroupBuilder;
    let store = Arc::new(zarrs::filesystem::FilesystemStore::new(path).expect("zarr store"));
    let group = |p: &str, attrs: serde_json::Value| {
        let attrs = attrs.as_object().cloned().unwrap_or_default();
        GroupBuilder::new()
            .attributes(attrs)
            .build(store.clone(), p)
            .expect("group")
            .store_metadata()
            .expect("group metadata");
    };
    group(
        "/",
        serde_json::json!({"encoding-type": "anndata", "encoding-version": "0.1.0"}),
    );
    for (frame, prefix, n) in [("obs", "cell", n_obs), ("var", "gene", n_vars)] {
        let columns: Vec<&str> = if frame == "obs" { vec!["n"] } else { vec![] };
        group(
            &format!("/{frame}"),
            serde_json::json!({"encoding-type": "dataframe", "encoding-version": "0.2.0",
                               "_index": "_index", "column-order": columns}),
        );
        let names = ArrayBuilder::new(vec![n], vec![n], data_type::string(), "")
            .build(store.clone(), &format!("/{frame}/_index"))
            .expect("names");
        names.store_metadata().expect("metadata");
        let values: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
        names
            .store_array_subset(
                &ArraySubset::new_with_start_shape(vec![0], vec![n]).expect("subset"),
                values,
            )
            .expect("write names");
        if frame == "obs" {
            let col = ArrayBuilder::new(vec![n], vec![n], data_type::int32(), 0i32)
                .build(store.clone(), "/obs/n")
                .expect("n");
            col.store_metadata().expect("metadata");
            let values: Vec<i32> = (0..n as i32).collect();
            col.store_array_subset(
                &ArraySubset::new_with_start_shape(vec![0], vec![n]).expect("subset"),
                values,
            )
            .expect("write n");
        }
    }
    let mut x = ArrayBuilder::new(
        vec![n_obs, n_vars],
        chunks.to_vec(),
        data_type::float32(),
        0f32,
    );
    if let Some(block) = blosc_block {
        use zarrs::array::codec::bytes_to_bytes::blosc::{
            BloscCodec, BloscCompressionLevel, BloscCompressor, BloscShuffleMode,
        };
        let level = BloscCompressionLevel::try_from(5u8).expect("a level");
        let blosc = BloscCodec::new(
            BloscCompressor::LZ4,
            level,
            Some(block),
            BloscShuffleMode::Shuffle,
            Some(4),
        )
        .expect("blosc");
        x.bytes_to_bytes_codecs(vec![Arc::new(blosc)]);
    }
    let x = x.build(store.clone(), "/X").expect("X");
    x.store_metadata().expect("metadata");
    let values: Vec<f32> = (0..n_obs)
        .flat_map(|r| (0..n_vars).map(move |c| (r * 1000 + c) as f32))
        .collect();
    x.store_array_subset(
        &ArraySubset::new_with_ranges(&[0..n_obs, 0..n_vars]),
        values,
    )
    .expect("write X");
    path.to_path_buf()
}

/// The demo AnnData files committed in the repository.
pub(crate) fn demo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("demo")
        .join(name)
}

/// The sum of a metric over the plan's nodes.
pub(crate) fn metric(plan: &Arc<dyn ExecutionPlan>, name: &str) -> u64 {
    let own = plan
        .metrics()
        .and_then(|m| m.sum_by_name(name))
        .map_or(0, |v| v.as_usize() as u64);
    own + plan
        .children()
        .into_iter()
        .map(|c| metric(c, name))
        .sum::<u64>()
}

/// Runs a command in-process; returns the batches and the executed plan.
pub(crate) async fn run(
    registry: &Registry,
    command: serde_json::Value,
) -> Result<
    (Vec<arrow::array::RecordBatch>, Arc<dyn ExecutionPlan>),
    Box<dyn std::error::Error + Send + Sync>,
> {
    let command = Command::from_json(command.to_string().as_bytes())?;
    let planner = registry.planner();
    let resolved = planner.resolve(&command).await?;
    let planned = planner.plan(&command, &resolved.sources).await?;
    let plan: Arc<dyn ExecutionPlan> = planned.plan.clone();
    let batches = datafusion::physical_plan::collect(plan.clone(), planned.task.clone()).await?;
    Ok((batches, plan))
}
