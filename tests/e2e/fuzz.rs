//! Bounded fuzzing of what clients control: the JSON command parser, the ticket decoder and the
//! filter path (parse, plan, execute), with inputs mutated from valid seeds by a seeded generator.
//!
//! Every input must give an answer or an error of the client's class, never a panic and never an
//! INTERNAL status. Runs are bounded in count and time; `ARTIFLIGHT_FUZZ_ITERATIONS` and
//! `ARTIFLIGHT_FUZZ_SEED` make longer or different runs (a failure prints the input and the seed).

use std::time::{Duration, Instant};

use artiflight_server::error::Error;
use artiflight_server::query::{Command, TicketSpec};
use futures::{FutureExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::{Code, Status};

use crate::common::{TestResult, demo_server};

fn iterations(default: usize) -> usize {
    std::env::var("ARTIFLIGHT_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rng() -> (StdRng, u64) {
    let seed = std::env::var("ARTIFLIGHT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x_a27f_1195);
    (StdRng::seed_from_u64(seed), seed)
}

/// Fragments that parsers trip over.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"-1",
    b"1e309",
    b"18446744073709551616",
    b"-0",
    b"\xff\xfe",
    b"\x00",
    b"'",
    b"''",
    b"(",
    b")",
    b" OR ",
    b" AND ",
    b"NOT ",
    b"IN (",
    b"::",
    b"CAST(",
    b" AS INT)",
    b"/0",
    b"%",
    b"\"key\"",
    b"\"filter\"",
    b"\"element\"",
    b"\"obs_range\"",
    b"\"layout\"",
    b"9223372036854775807",
];

/// One mutation of `input`: flips, inserts, deletions, duplications, tokens or a splice.
fn mutate(rng: &mut StdRng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        let at = if out.is_empty() {
            0
        } else {
            rng.random_range(0..=out.len())
        };
        match rng.random_range(0..7) {
            0 if !out.is_empty() => {
                let i = rng.random_range(0..out.len());
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 => {
                let n = rng.random_range(1..8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(at..at, bytes);
            }
            2 if !out.is_empty() => {
                let end = (at + rng.random_range(1..16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            3 if !out.is_empty() => {
                let start = rng.random_range(0..out.len());
                let end = (start + rng.random_range(1..32)).min(out.len());
                let piece = out[start..end].to_vec();
                out.splice(at..at, piece);
            }
            4 => {
                let token = TOKENS[rng.random_range(0..TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            5 => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                let cut = rng.random_range(0..=other.len());
                out.truncate(at);
                out.extend_from_slice(&other[cut..]);
            }
            _ => {
                // Deep nesting and long runs: recursion and allocation limits.
                let n = rng.random_range(1..2_000);
                let byte = [b'[', b'{', b'(', b'a', b'9'][rng.random_range(0..5)];
                out.splice(at..at, std::iter::repeat_n(byte, n));
            }
        }
    }
    out
}

/// Runs `check` on mutated seeds until `count` inputs or `budget` time, whichever ends first.
fn fuzz(
    name: &str,
    seeds: &[Vec<u8>],
    count: usize,
    budget: Duration,
    mut check: impl FnMut(&[u8]),
) {
    let (mut rng, seed) = rng();
    let started = Instant::now();
    let mut done = 0;
    while done < count && started.elapsed() < budget {
        let base = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, base, seeds);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if outcome.is_err() {
            panic!(
                "{name}: input {done} (seed {seed}) failed: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
        done += 1;
    }
    assert!(done >= count.min(100), "{name}: only {done} inputs ran");
}

fn command_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"key": "sharded_parquet", "filter": "louvain = 3 AND n_genes > 700", "columns": ["cell_type"], "limit": 5}"#,
        r#"{"key": "pbmc68k.h5ad", "element": ["X"], "filter": "cell_type IN ('B cells')", "var_names": ["CD3E"], "obs_range": [10, 20], "layout": "wide"}"#,
        r#"{"query": {"suffix": ".parquet", "key_prefix": "sh"}, "version": "KLHFjHDq5v43xnEV0001"}"#,
        r#"{"key": "k", "element": ["obsm", "X_pca"], "var_filter": "highly_variable"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// A client error: the class SPEC section 6 gives malformed input.
fn is_client_error(e: &Error) -> bool {
    matches!(e, Error::InvalidArgument(_) | Error::NotFound(_))
}

#[test]
fn command_parser_never_panics() {
    let seeds = command_seeds();
    fuzz(
        "command",
        &seeds,
        iterations(20_000),
        Duration::from_secs(20),
        |input| {
            match Command::from_json(input) {
                Ok(command) => {
                    // What parses re-encodes to the same command.
                    let again = Command::from_json(command.to_json().as_bytes());
                    assert_eq!(again.ok().as_ref(), Some(&command));
                }
                Err(e) => assert!(is_client_error(&e), "{e:?}"),
            }
            let path: Vec<String> = String::from_utf8_lossy(input)
                .split(',')
                .map(str::to_string)
                .collect();
            if let Err(e) = Command::from_path(&path) {
                assert!(is_client_error(&e), "{e:?}");
            }
        },
    );
}

#[test]
fn ticket_decoder_never_panics() {
    let seeds: Vec<Vec<u8>> = command_seeds()
        .iter()
        .filter_map(|c| Command::from_json(c).ok())
        .map(|command| {
            TicketSpec {
                command,
                uids: vec!["KLHFjHDq5v43xnEV0001".into()],
                partition: 1,
                partition_count: 3,
                flight: 42,
                target_partitions: 7,
            }
            .encode()
        })
        .collect();
    fuzz(
        "ticket",
        &seeds,
        iterations(20_000),
        Duration::from_secs(20),
        |input| match TicketSpec::decode(input) {
            Ok(spec) => assert!(spec.partition < spec.partition_count),
            Err(e) => assert!(is_client_error(&e), "{e:?}"),
        },
    );
}

const FILTER_SEEDS: &[&str] = &[
    "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05",
    "louvain = 3 OR n_genes BETWEEN 500 AND 700",
    "NOT (percent_mito > 0.1) AND cell_type LIKE 'CD%'",
    "CAST(n_genes AS DOUBLE) / 3 > 200.5 AND louvain IN (1, 2)",
    "coalesce(cell_type, 'x') <> 'y' AND abs(percent_mito - 0.02) < 0.01",
    "n_genes % 7 = 0 AND length(cell_type) > 3",
];

/// Filters through the real path: planned and executed by DataFusion over the demo's shards, as
/// GetFlightInfo and DoGet run them; each error is turned into the status the server would send.
/// Afterwards the server must still answer the seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_path_answers_or_refuses() -> TestResult {
    let server = demo_server().await?;
    let planner = server.server.planner().clone();
    let seeds: Vec<Vec<u8>> = FILTER_SEEDS.iter().map(|s| s.as_bytes().to_vec()).collect();
    let (mut rng, seed) = rng();
    let count = iterations(20_000) / 20;
    let started = Instant::now();
    let mut refused = 0;
    let mut answered = 0;
    for i in 0..count {
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
        let base = &seeds[rng.random_range(0..seeds.len())];
        let filter = String::from_utf8_lossy(&mutate(&mut rng, base, &seeds)).into_owned();
        let command = Command {
            key: Some("sharded_parquet".into()),
            filter: Some(filter.clone()),
            limit: Some(20),
            ..Default::default()
        };
        let run = async {
            let resolved = planner.resolve(&command).await?;
            let planned = planner.plan(&command, &resolved.sources).await?;
            let batches: Vec<_> = planned.execute(0)?.try_collect().await?;
            Ok::<_, Error>(batches.len())
        };
        match std::panic::AssertUnwindSafe(run).catch_unwind().await {
            Err(_) => panic!("filter {i} (seed {seed}) panicked: {filter:?}"),
            Ok(Ok(_)) => answered += 1,
            Ok(Err(e)) => {
                let status = Status::from(e);
                assert!(
                    matches!(status.code(), Code::InvalidArgument | Code::NotFound),
                    "filter {i} (seed {seed}) {filter:?}: {:?} {}",
                    status.code(),
                    status.message()
                );
                refused += 1;
            }
        }
    }
    eprintln!(
        "filters: {answered} answered, {refused} refused, in {:?}",
        started.elapsed()
    );
    assert!(
        answered + refused >= count.min(50),
        "only {} filters ran",
        answered + refused
    );
    // The server still answers the seeds after all of that.
    let client = server.client().await?;
    for filter in FILTER_SEEDS {
        let request = artiflight_client::Request::key("sharded_parquet").filter(*filter);
        client.collect(&request).await?;
    }
    Ok(())
}

/// What the fuzzer found, kept as fixed cases: each was an INTERNAL or DATA_LOSS status before.
#[tokio::test]
async fn inputs_found_by_fuzzing_are_client_errors() -> TestResult {
    let server = demo_server().await?;
    let client = server.client().await?;
    for filter in [
        // A placeholder outside a prepared statement.
        "n_genes % ? = 0",
        // Types that cannot be coerced, caught only when the plan was analyzed.
        "n_genes BETWEEN 500 AND (1, 2)",
        "louvain = 3 BETWEEN 500 AND 700",
        // A cast that fails on the data, inside the parquet reader's pushed-down predicate.
        "cell_type IN (1, 2)",
    ] {
        let request = artiflight_client::Request::key("sharded_parquet").filter(filter);
        let code = client.collect(&request).await.err().and_then(|e| e.code());
        assert_eq!(code, Some(Code::InvalidArgument), "{filter}");
    }
    Ok(())
}

/// An IPC stream of one batch, compressed or not.
fn ipc_stream(compression: Option<arrow::ipc::CompressionType>) -> Vec<u8> {
    use arrow::ipc::writer::{IpcWriteOptions, StreamWriter};
    let batch = arrow::array::RecordBatch::try_from_iter([(
        "$1",
        std::sync::Arc::new(arrow::array::Int64Array::from(vec![7i64; 64]))
            as arrow::array::ArrayRef,
    )])
    .expect("batch");
    let options = IpcWriteOptions::default()
        .try_with_compression(compression)
        .expect("options");
    let mut writer =
        StreamWriter::try_new_with_options(Vec::new(), &batch.schema(), options).expect("writer");
    writer.write(&batch).expect("write");
    writer.finish().expect("finish");
    writer.into_inner().expect("bytes")
}

/// Flight SQL handles and tickets, and the parameters inside them, which a read token controls
/// entirely: compressed and lying IPC among the seeds.
#[test]
fn sql_handles_and_client_ipc_never_panic() {
    use artiflight_server::query::Statement;
    let plain = ipc_stream(None);
    let lz4 = ipc_stream(Some(arrow::ipc::CompressionType::LZ4_FRAME));
    let zstd = ipc_stream(Some(arrow::ipc::CompressionType::ZSTD));
    let handle = |parameters: &[u8]| {
        use prost::Message;
        artiflight_proto::SqlStatement {
            version: artiflight_proto::SQL_STATEMENT_VERSION,
            sql: "SELECT $1 FROM sharded_parquet".into(),
            parameters: parameters.to_vec(),
            partition: 1,
            partition_count: 2,
            target_partitions: 4,
            ..Default::default()
        }
        .encode_to_vec()
    };
    let seeds = vec![
        handle(&plain),
        handle(&lz4),
        handle(&zstd),
        plain.clone(),
        lz4,
        zstd,
    ];
    fuzz(
        "sql handle",
        &seeds,
        iterations(20_000),
        Duration::from_secs(20),
        |input| {
            if let Err(e) = Statement::decode(input) {
                assert!(is_client_error(&e), "{e:?}");
            }
            if let Err(e) = artiflight_server::ipc::check_stream(input) {
                assert!(is_client_error(&e), "{e:?}");
            }
        },
    );
}

/// zarr metadata a user controls: an array's `zarr.json` mutated, then opened, planned and read
/// as a request would. Any answer or error will do; a panic fails, and an abort (an allocation
/// from a declared shape) would end the test process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zarr_metadata_never_stops_the_reader() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = crate::common::write_zarr_anndata(&dir.path().join("m.zarr"), 40, 6, 10);
    let registry =
        crate::common::registry_with(&dir.path().join("data"), crate::common::default_config());
    registry
        .register(store.to_str().unwrap_or_default(), "m.zarr", None, true)
        .await?;
    let metadata = store.join("X").join("zarr.json");
    let seeds = vec![std::fs::read(&metadata)?];
    let mut inputs = Vec::new();
    fuzz(
        "zarr metadata",
        &seeds,
        iterations(300).min(2_000),
        Duration::from_secs(20),
        |input| {
            inputs.push(input.to_vec());
        },
    );
    let started = Instant::now();
    let command =
        Command::from_json(br#"{"key": "m.zarr", "element": ["X"], "obs_range": [5, 25]}"#)?;
    for (n, input) in inputs.iter().enumerate() {
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::fs::write(&metadata, input)?;
        let planner = registry.planner();
        let outcome = std::panic::AssertUnwindSafe(async {
            let resolved = planner.resolve(&command).await?;
            let planned = planner.plan(&command, &resolved.sources).await?;
            let mut rows = 0;
            for e in 0..planned.endpoint_count() {
                let batches: Vec<_> = planned.execute(e)?.try_collect().await?;
                rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(rows)
        })
        .catch_unwind()
        .await;
        assert!(
            outcome.is_ok(),
            "input {n} panicked: {}",
            String::from_utf8_lossy(input)
        );
    }
    Ok(())
}
