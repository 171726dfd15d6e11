//! `artiflight serve`: the flags, the limits they make, and the server's life until a signal.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use artiflight_server::Server;
use artiflight_server::service::{Limits, Tls, parse_duration};
use clap::Args;

use super::Global;

#[derive(Args, Debug)]
pub(crate) struct Serve {
    /// Address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, env = "ARTIFLIGHT_ADDR", default_value = "127.0.0.1:8815")]
    addr: String,
    /// Register the bundled demo data first.
    #[arg(long, env = "ARTIFLIGHT_DEMO")]
    demo: bool,
    /// Another root the server may read (a directory or URL); repeatable.
    #[arg(
        long = "allow-root",
        env = "ARTIFLIGHT_ALLOW_ROOT",
        value_delimiter = ','
    )]
    allow_roots: Vec<String>,
    /// How many partitions (endpoints) a scan may split into; default: the number of cores.
    #[arg(long, env = "ARTIFLIGHT_TARGET_PARTITIONS")]
    target_partitions: Option<usize>,
    /// Require a token (`artiflight token create`) on every call but the Handshake.
    #[arg(long, env = "ARTIFLIGHT_AUTH")]
    auth: bool,
    /// Listen on a non-loopback address without --auth anyway.
    #[arg(long, env = "ARTIFLIGHT_INSECURE")]
    insecure: bool,
    /// PEM certificate chain: serve TLS (grpc+tls://) with --tls-key.
    #[arg(long, env = "ARTIFLIGHT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "ARTIFLIGHT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Concurrent DoGet streams (0: no limit); further DoGets wait up to --queue-timeout.
    #[arg(long, env = "ARTIFLIGHT_MAX_STREAMS", default_value_t = 128)]
    max_streams: usize,
    /// How long a DoGet waits for a stream slot before RESOURCE_EXHAUSTED (0: not at all).
    #[arg(long, env = "ARTIFLIGHT_QUEUE_TIMEOUT", default_value = "30s")]
    queue_timeout: String,
    /// Largest message a client may send, e.g. 256MiB.
    #[arg(long, env = "ARTIFLIGHT_MAX_MESSAGE_SIZE", default_value = "256MiB")]
    max_message_size: String,
    /// Rows one DoGet may send (no limit by default).
    #[arg(long, env = "ARTIFLIGHT_MAX_ROWS")]
    max_rows: Option<u64>,
    /// Bytes one DoGet may send, e.g. 10GiB (no limit by default).
    #[arg(long, env = "ARTIFLIGHT_MAX_BYTES")]
    max_bytes: Option<String>,
    /// Time to answer a call or start a stream (0: no limit); uploads are not bounded by it.
    #[arg(long, env = "ARTIFLIGHT_REQUEST_TIMEOUT", default_value = "300s")]
    request_timeout: String,
    /// Remote byte ranges kept on disk under the data dir for repeated reads (0: no cache).
    #[arg(long, env = "ARTIFLIGHT_CACHE_SIZE", default_value = "1GiB")]
    cache_size: String,
    /// After SIGTERM, how long running streams may finish before they are ended.
    #[arg(long, env = "ARTIFLIGHT_SHUTDOWN_GRACE", default_value = "10s")]
    shutdown_grace: String,
    /// Memory shared by every query, e.g. 4GiB (default: a quarter of the machine's); sorts,
    /// aggregates and joins spill to disk under the data dir beyond it.
    #[arg(long, env = "ARTIFLIGHT_MAX_QUERY_MEMORY")]
    max_query_memory: Option<String>,
    /// How long one DoGet stream or SQL statement may run, e.g. 10m (0: no limit).
    #[arg(long, env = "ARTIFLIGHT_MAX_QUERY_TIME", default_value = "0")]
    max_query_time: String,
    /// A DoGet whose client takes nothing for this long is ended and its slot freed (0: never).
    #[arg(long, env = "ARTIFLIGHT_STALL_TIMEOUT", default_value = "60s")]
    stall_timeout: String,
    /// Concurrent calls on one connection.
    /// Where clients and the fleet's other servers reach this server, e.g. grpc://host:8815
    /// (default: the listening address). Endpoints name it when it serves their data.
    #[arg(long, env = "ARTIFLIGHT_ADVERTISE")]
    advertise: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (default: none).
    #[arg(long, env = "ARTIFLIGHT_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// How often this server renews its place in the fleet (servers sharing --catalog); one that
    /// misses five renewals drops out of endpoint locations.
    #[arg(long, env = "ARTIFLIGHT_HEARTBEAT", default_value = "2s")]
    heartbeat: String,
    /// In a fleet, how many bytes of files each task of a distributed SQL statement scans: a
    /// join or aggregate over tables larger than this runs its stages on several servers.
    #[arg(long, env = "ARTIFLIGHT_SQL_TASK_BYTES", default_value = "16MiB")]
    sql_task_bytes: String,
    #[arg(long, env = "ARTIFLIGHT_MAX_CONNECTION_STREAMS", default_value_t = 100)]
    max_connection_streams: u32,
}

/// The limits `serve` was given.
fn limits(serve: &Serve) -> Result<Limits> {
    let duration = |flag: &str, text: &str| -> Result<Option<Duration>> {
        let d = parse_duration(text).with_context(|| format!("--{flag}"))?;
        Ok((!d.is_zero()).then_some(d))
    };
    let max_message = parse_size(&serve.max_message_size).context("--max-message-size")?;
    Ok(Limits {
        max_streams: (serve.max_streams > 0).then_some(serve.max_streams),
        queue_timeout: duration("queue-timeout", &serve.queue_timeout)?.unwrap_or_default(),
        max_message_bytes: usize::try_from(max_message).unwrap_or(usize::MAX),
        max_rows: serve.max_rows,
        max_bytes: serve
            .max_bytes
            .as_deref()
            .map(parse_size)
            .transpose()
            .context("--max-bytes")?,
        request_timeout: duration("request-timeout", &serve.request_timeout)?,
        shutdown_grace: duration("shutdown-grace", &serve.shutdown_grace)?.unwrap_or_default(),
        max_query_time: duration("max-query-time", &serve.max_query_time)?,
        stall_timeout: duration("stall-timeout", &serve.stall_timeout)?,
        max_connection_streams: serve.max_connection_streams,
    })
}

/// Parses a size such as `4096`, `64KiB`, `256MiB`, `10GiB` (or `MB`, `GB`: powers of 1000).
fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .with_context(|| format!("invalid size '{text}': expected e.g. 256MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => bail!("invalid size unit '{other}' in '{text}': use KiB, MiB or GiB"),
    };
    number
        .checked_mul(scale)
        .with_context(|| format!("size '{text}' is too large"))
}

/// Serves until SIGINT or SIGTERM.
pub(crate) async fn run(global: &Global, serve: Serve) -> Result<()> {
    let mut opts = global.options();
    opts.limits = limits(&serve)?;
    opts.cache_bytes = parse_size(&serve.cache_size).context("--cache-size")?;
    if let Some(memory) = &serve.max_query_memory {
        let bytes = parse_size(memory).context("--max-query-memory")?;
        opts.max_query_memory = usize::try_from(bytes).unwrap_or(usize::MAX);
    }
    opts.allow_roots = serve.allow_roots;
    if let Some(n) = serve.target_partitions {
        opts.target_partitions = n;
    }
    opts.auth = serve.auth;
    opts.advertise = serve.advertise.clone();
    opts.metrics_addr = serve.metrics_addr.clone();
    let task_bytes = parse_size(&serve.sql_task_bytes).context("--sql-task-bytes")?;
    opts.sql_task_bytes = usize::try_from(task_bytes).unwrap_or(usize::MAX);
    opts.heartbeat = parse_duration(&serve.heartbeat).context("--heartbeat")?;
    if opts.heartbeat.is_zero() {
        bail!("--heartbeat must be more than 0");
    }
    if let (Some(cert), Some(key)) = (&serve.tls_cert, &serve.tls_key) {
        opts.tls = Some(Tls {
            cert_pem: std::fs::read(cert)
                .with_context(|| format!("reading --tls-cert {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("reading --tls-key {}", key.display()))?,
        });
    }
    let server = Server::open(&opts)?;
    if serve.demo {
        crate::demo::install(&server)
            .await
            .context("installing the demo data")?;
    }
    // Checked before binding: a refused address is never listened on, not even for a moment.
    if !serve.auth && !serve.insecure {
        let addrs = tokio::net::lookup_host(&serve.addr)
            .await
            .with_context(|| format!("cannot resolve --addr {}", serve.addr))?;
        if let Some(open) = addrs.into_iter().find(|a| !a.ip().is_loopback()) {
            bail!(
                "refusing to listen on {open} without --auth: anyone who reaches it could read \
                 every artifact. Create a token (`artiflight token create NAME --role read`) and \
                 serve with --auth, or pass --insecure to serve without authentication anyway"
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(&serve.addr)
        .await
        .with_context(|| format!("cannot listen on {}", serve.addr))?;
    let addr = listener.local_addr()?;
    if opts.auth && server.planner().catalog().tokens().await?.is_empty() {
        tracing::warn!(
            "--auth is on but no token exists: create one with `artiflight token create`"
        );
    }
    // Scripts and tests read this line to find the port when --addr ends in :0.
    println!("artiflight listening on {}://{addr}", opts.scheme());
    tracing::info!(%addr, data_dir = %server.planner().storage().data_dir().display(), "serving");
    server.serve(listener, shutdown_signal()).await?;
    // The catalog closes with the last handle on it, which checkpoints its write-ahead log.
    drop(server);
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
