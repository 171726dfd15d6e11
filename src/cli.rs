//! Command-line definitions and their implementations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use artiflight_client::{Client, Request};
use std::time::Duration;

use artiflight_server::auth::Token;
use artiflight_server::catalog::Role;
use artiflight_server::catalog::{Entry, RecordFilter};
use artiflight_server::service::{Limits, Tls, parse_duration};
use artiflight_server::{Server, ServerOptions};
use clap::{Args, Parser, Subcommand};
use futures::StreamExt;
use serde_json::{Value, json};

const DEFAULT_SERVER: &str = "grpc://127.0.0.1:8815";

/// Serve scientific data artifacts (parquet, AnnData, HDF5, zarr) over Arrow Flight.
#[derive(Parser, Debug)]
#[command(name = "artiflight", version, about)]
pub(crate) struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// Directory holding the catalog (catalog.sqlite) and managed storage (objects/).
    #[arg(
        long,
        global = true,
        env = "ARTIFLIGHT_DATA_DIR",
        default_value = "./artiflight-data"
    )]
    data_dir: PathBuf,
    /// A running server to talk to (for example grpc://127.0.0.1:8815); `get` defaults to it,
    /// other commands use the catalog directly unless it is given.
    #[arg(long, global = true, env = "ARTIFLIGHT_SERVER")]
    server: Option<String>,
    /// Token to send to a server that runs with --auth (`artiflight token create`).
    #[arg(long, global = true, env = "ARTIFLIGHT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of certificates to trust when the server URL is grpc+tls://.
    #[arg(long, global = true, env = "ARTIFLIGHT_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Flight server.
    Serve(Serve),
    /// Register a file or folder (local path or URL) as an artifact.
    Register {
        /// Path or URL of the file or folder.
        path: String,
        /// Key to register it under; new content under a known key makes a new version.
        #[arg(long, env = "ARTIFLIGHT_KEY")]
        key: String,
        #[arg(long, env = "ARTIFLIGHT_DESCRIPTION")]
        description: Option<String>,
    },
    /// Manage collections.
    #[command(subcommand)]
    Collection(CollectionCommand),
    /// List the latest artifacts and collections.
    Ls {
        #[arg(long, env = "ARTIFLIGHT_SUFFIX")]
        suffix: Option<String>,
        #[arg(long, env = "ARTIFLIGHT_OTYPE")]
        otype: Option<String>,
    },
    /// Show a record and its file tree.
    Show {
        key: String,
        /// A version's uid instead of the latest.
        #[arg(long, env = "ARTIFLIGHT_VERSION")]
        version: Option<String>,
    },
    /// Read a flight: print the first rows, or write .parquet, .arrow or .csv.
    Get(Get),
    /// Move a key (or one version) to the trash, or delete its record.
    Delete {
        key: String,
        #[arg(long, env = "ARTIFLIGHT_VERSION")]
        version: Option<String>,
        /// Delete the record instead of trashing it (files outside managed storage stay).
        #[arg(long, env = "ARTIFLIGHT_PERMANENT")]
        permanent: bool,
    },
    /// Manage the bearer tokens of `serve --auth` (kept hashed in the catalog).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a token; it is printed once, alone on the last line.
    Create {
        /// The token's name: the user name in basic auth.
        name: String,
        /// `read` lists, describes and reads; `write` also uploads, registers and deletes.
        #[arg(long, default_value = "read")]
        role: String,
    },
    /// List tokens by name and role (never the tokens themselves).
    List,
    /// Revoke a token; a running server refuses it within seconds.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
enum CollectionCommand {
    /// Make a collection of the latest versions of the member keys, in order.
    Create {
        key: String,
        #[arg(required = true)]
        members: Vec<String>,
        #[arg(long, env = "ARTIFLIGHT_DESCRIPTION")]
        description: Option<String>,
    },
}

#[derive(Args, Debug)]
struct Serve {
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
    #[arg(long, env = "ARTIFLIGHT_MAX_CONNECTION_STREAMS", default_value_t = 100)]
    max_connection_streams: u32,
}

#[derive(Args, Debug)]
struct Get {
    key: String,
    /// Element path, e.g. `X` or `layers/counts`.
    #[arg(long, env = "ARTIFLIGHT_ELEMENT")]
    element: Option<String>,
    /// SQL boolean expression, e.g. "louvain = 3 AND n_genes > 700".
    #[arg(long, env = "ARTIFLIGHT_FILTER")]
    filter: Option<String>,
    /// Comma-separated output columns.
    #[arg(long, env = "ARTIFLIGHT_COLUMNS", value_delimiter = ',')]
    columns: Option<Vec<String>>,
    #[arg(long, env = "ARTIFLIGHT_LIMIT")]
    limit: Option<u64>,
    #[arg(long, env = "ARTIFLIGHT_VERSION")]
    version: Option<String>,
    /// Write to this file (.parquet, .arrow or .csv) instead of printing.
    #[arg(long, env = "ARTIFLIGHT_OUT")]
    out: Option<PathBuf>,
    /// Rows to print when not writing a file.
    #[arg(long, env = "ARTIFLIGHT_PREVIEW", default_value_t = 20)]
    preview: usize,
}

/// The state a command opens. Only `serve` keeps the range cache (it sets its size): another
/// process opening it would evict down to its own limit and remove the server's writes in
/// progress.
fn options(global: &Global) -> ServerOptions {
    ServerOptions {
        cache_bytes: 0,
        ..ServerOptions::new(&global.data_dir)
    }
}

/// Connects to `url` with the global token and trusted certificates.
async fn connect(global: &Global, url: &str) -> Result<Client> {
    let ca_pem = match &global.tls_ca {
        Some(path) => Some(
            std::fs::read(path).with_context(|| format!("reading --tls-ca {}", path.display()))?,
        ),
        None => None,
    };
    let options = artiflight_client::Options {
        token: global.token.clone(),
        ca_pem,
    };
    Ok(Client::connect_with(url, &options).await?)
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

pub(crate) async fn run(cli: Cli) -> Result<()> {
    let global = &cli.global;
    match cli.command {
        Command::Serve(serve) => run_serve(global, serve).await,
        Command::Register {
            path,
            key,
            description,
        } => {
            let record = match &global.server {
                Some(url) => {
                    connect(global, url)
                        .await?
                        .action(
                            "register",
                            json!({"path": path, "key": key, "description": description}),
                        )
                        .await?
                }
                None => {
                    let server = Server::open(&options(global))?;
                    let (record, _) = server
                        .registry()
                        .register(&path, &key, description, true)
                        .await?;
                    Entry::Artifact(record).to_json()
                }
            };
            print_json(&record)
        }
        Command::Collection(CollectionCommand::Create {
            key,
            members,
            description,
        }) => {
            let record = match &global.server {
                Some(url) => {
                    connect(global, url)
                        .await?
                        .action(
                            "create_collection",
                            json!({"key": key, "members": members, "description": description}),
                        )
                        .await?
                }
                None => {
                    let server = Server::open(&options(global))?;
                    let (record, _) = server
                        .registry()
                        .create_collection(&key, members, description)
                        .await?;
                    Entry::Collection(record).to_json()
                }
            };
            print_json(&record)
        }
        Command::Ls { suffix, otype } => {
            let filter = RecordFilter {
                suffix,
                otype,
                ..Default::default()
            };
            let records: Vec<Value> = match &global.server {
                Some(url) => connect(global, url)
                    .await?
                    .list(Some(serde_json::to_value(&filter)?))
                    .await?
                    .iter()
                    .filter_map(|info| serde_json::from_slice(&info.app_metadata).ok())
                    .collect(),
                None => {
                    let server = Server::open(&options(global))?;
                    server
                        .planner()
                        .catalog()
                        .run(move |c| c.list(&filter))
                        .await?
                        .iter()
                        .map(Entry::to_json)
                        .collect()
                }
            };
            print_listing(&records);
            Ok(())
        }
        Command::Token(command) => run_token(global, command).await,
        Command::Show { key, version } => run_show(global, &key, version).await,
        Command::Get(get) => run_get(global, get).await,
        Command::Delete {
            key,
            version,
            permanent,
        } => {
            let deleted = match &global.server {
                Some(url) => {
                    connect(global, url)
                        .await?
                        .action(
                            "delete",
                            json!({"key": key, "version": version, "permanent": permanent}),
                        )
                        .await?
                }
                None => {
                    let server = Server::open(&options(global))?;
                    let entries = server.registry().delete(&key, version, permanent).await?;
                    Value::Array(entries.iter().map(Entry::to_json).collect())
                }
            };
            print_json(&deleted)
        }
    }
}

async fn run_token(global: &Global, command: TokenCommand) -> Result<()> {
    let server = Server::open(&options(global))?;
    let catalog = server.planner().catalog().clone();
    match command {
        TokenCommand::Create { name, role } => {
            let role: Role = role.parse()?;
            let token = Token::generate();
            let hash = token.hash();
            let record = catalog
                .run(move |c| c.create_token(&name, role, &hash))
                .await?;
            eprintln!(
                "created token '{}' (role {}); it is shown once, here:",
                record.name,
                record.role.as_str()
            );
            // Alone on the last line, so that scripts can take it with `tail -n 1`.
            println!("{}", token.secret());
        }
        TokenCommand::List => {
            let tokens = catalog.run(|c| c.tokens()).await?;
            println!("{:<32} {:<6} {:<24}", "name", "role", "created_at");
            for t in tokens {
                println!("{:<32} {:<6} {:<24}", t.name, t.role.as_str(), t.created_at);
            }
        }
        TokenCommand::Revoke { name } => {
            let record = catalog.run(move |c| c.revoke_token(&name)).await?;
            println!("revoked token '{}'", record.name);
        }
    }
    Ok(())
}

async fn run_serve(global: &Global, serve: Serve) -> Result<()> {
    let mut opts = options(global);
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
    if opts.auth
        && server
            .planner()
            .catalog()
            .run(|c| c.tokens())
            .await?
            .is_empty()
    {
        tracing::warn!(
            "--auth is on but no token exists: create one with `artiflight token create`"
        );
    }
    let scheme = if opts.tls.is_some() {
        "grpc+tls"
    } else {
        "grpc"
    };
    // Scripts and tests read this line to find the port when --addr ends in :0.
    println!("artiflight listening on {scheme}://{addr}");
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

async fn run_show(global: &Global, key: &str, version: Option<String>) -> Result<()> {
    if let Some(url) = &global.server {
        let record = connect(global, url)
            .await?
            .action("describe", json!({"key": key, "version": version}))
            .await?;
        print_json(&record)?;
        if let Some(structure) = record.get("structure") {
            print!("{}", structure_repr(structure));
        }
        return Ok(());
    }
    let server = Server::open(&options(global))?;
    let name = key.to_string();
    let entry = server
        .planner()
        .catalog()
        .run(move |c| c.resolve(&name, version.as_deref()))
        .await?;
    print_json(&entry.to_json())?;
    if let Entry::Artifact(record) = entry {
        if let Some(structure) = server.planner().describe(&record, true).await? {
            print!("{}", structure_repr(&structure));
            return Ok(());
        }
        let url = url::Url::parse(&record.path)?;
        let located = server.planner().storage().locate(&url).await?;
        if located.is_folder {
            let paths: Vec<&str> = located.files.iter().map(|f| located.relative(f)).collect();
            print!("{}", file_tree(&paths));
        }
    }
    Ok(())
}

/// Renders an artifact's structure: AnnData as anndata's repr, SpatialData's tables, or the tree of
/// a generic HDF5/zarr store with shapes, dtypes and chunks.
fn structure_repr(structure: &serde_json::Value) -> String {
    use std::fmt::Write;
    let names = |v: Option<&serde_json::Value>| -> Vec<String> {
        match v {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(|s| format!("'{s}'")))
                .collect(),
            Some(serde_json::Value::Object(o)) => o.keys().map(|k| format!("'{k}'")).collect(),
            _ => Vec::new(),
        }
    };
    let anndata = |a: &serde_json::Value, indent: &str| -> String {
        let shape = a.get("shape").and_then(|s| s.as_array());
        let dim = |i: usize| {
            shape
                .and_then(|s| s.get(i))
                .and_then(|v| v.as_u64())
                .map_or("?".to_string(), |n| n.to_string())
        };
        let mut out = format!(
            "AnnData object with n_obs × n_vars = {} × {}\n",
            dim(0),
            dim(1)
        );
        for kind in [
            "obs", "var", "uns", "obsm", "varm", "layers", "obsp", "varp",
        ] {
            let keys = names(a.get(kind));
            if !keys.is_empty() {
                let _ = writeln!(out, "{indent}    {kind}: {}", keys.join(", "));
            }
        }
        out
    };
    match structure.get("otype").and_then(|o| o.as_str()) {
        Some("AnnData") => anndata(structure, ""),
        Some("SpatialData") => {
            let mut out = String::from("SpatialData object\n");
            if let Some(tables) = structure.get("tables").and_then(|t| t.as_object()) {
                for (name, table) in tables {
                    let _ = write!(out, "  table '{name}': {}", anndata(table, "  "));
                }
            }
            if let Some(elements) = structure.get("elements").and_then(|e| e.as_object()) {
                for (kind, keys) in elements {
                    let keys = names(Some(keys));
                    if !keys.is_empty() {
                        let _ = writeln!(out, "  {kind}: {}", keys.join(", "));
                    }
                }
            }
            out
        }
        _ => {
            let mut out = String::new();
            for node in structure
                .get("tree")
                .and_then(|t| t.as_array())
                .into_iter()
                .flatten()
            {
                let path = node.get("path").and_then(|p| p.as_str()).unwrap_or("");
                let depth = path.matches('/').count();
                let name = path.rsplit('/').next().unwrap_or(path);
                let indent = "    ".repeat(depth);
                match node.get("kind").and_then(|k| k.as_str()) {
                    Some("group") => {
                        let _ = writeln!(out, "{indent}{name}/");
                    }
                    _ => {
                        let _ = writeln!(
                            out,
                            "{indent}{name}  shape={} dtype={} chunks={}",
                            node.get("shape").unwrap_or(&serde_json::Value::Null),
                            node.get("dtype").and_then(|d| d.as_str()).unwrap_or("?"),
                            node.get("chunks").unwrap_or(&serde_json::Value::Null),
                        );
                    }
                }
            }
            out
        }
    }
}

/// Renders relative paths (in path order) as a tree, like lamindb's `view_tree`.
fn file_tree(paths: &[&str]) -> String {
    #[derive(Default)]
    struct Node<'a> {
        children: Vec<(&'a str, Node<'a>)>,
    }
    fn render(node: &Node<'_>, prefix: &str, out: &mut String) {
        for (i, (name, child)) in node.children.iter().enumerate() {
            let last = i + 1 == node.children.len();
            let slash = if child.children.is_empty() { "" } else { "/" };
            out.push_str(&format!(
                "{prefix}{}{name}{slash}\n",
                if last { "└── " } else { "├── " }
            ));
            render(
                child,
                &format!("{prefix}{}", if last { "    " } else { "│   " }),
                out,
            );
        }
    }
    let mut root = Node::default();
    for path in paths {
        let mut node = &mut root;
        for part in path.split('/') {
            let at = match node.children.iter().position(|(n, _)| *n == part) {
                Some(at) => at,
                None => {
                    node.children.push((part, Node::default()));
                    node.children.len() - 1
                }
            };
            node = &mut node.children[at].1;
        }
    }
    let dirs: std::collections::BTreeSet<&str> = paths
        .iter()
        .flat_map(|p| p.match_indices('/').map(move |(i, _)| &p[..i]))
        .collect();
    let suffixes: std::collections::BTreeSet<String> = paths
        .iter()
        .filter_map(|p| {
            Path::new(p)
                .extension()
                .map(|e| format!("'.{}'", e.to_string_lossy()))
        })
        .collect();
    let mut out = format!(
        "{} sub-directories & {} files with suffixes {}\n",
        dirs.len(),
        paths.len(),
        suffixes.into_iter().collect::<Vec<_>>().join(", ")
    );
    render(&root, "", &mut out);
    out
}

async fn run_get(global: &Global, get: Get) -> Result<()> {
    let url = global.server.as_deref().unwrap_or(DEFAULT_SERVER);
    let client = connect(global, url).await?;
    let mut request = Request::key(&get.key);
    if let Some(element) = &get.element {
        request = request.element(element.split('/'));
    }
    if let Some(filter) = get.filter {
        request = request.filter(filter);
    }
    if let Some(columns) = get.columns {
        request = request.columns(columns);
    }
    if let Some(limit) = get.limit {
        request = request.limit(limit);
    }
    if let Some(version) = get.version {
        request = request.version(version);
    }
    let info = client.info(&request).await?;
    let total = u64::try_from(info.total_records).ok();
    let (schema, mut stream) = client.get_info(&info)?;
    let progress = indicatif::ProgressBar::new(total.unwrap_or(0));
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {human_pos}/{human_len} rows {per_sec} [{elapsed}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let Some(out) = get.out else {
        // Preview: stop pulling once enough rows arrived; dropping the stream ends the scan.
        let mut batches = Vec::new();
        let mut rows = 0;
        while rows < get.preview {
            let Some(batch) = stream.next().await else {
                break;
            };
            let batch = batch?;
            rows += batch.num_rows();
            batches.push(batch);
        }
        drop(stream);
        print_preview(&schema, &batches, get.preview, total)?;
        return Ok(());
    };
    let mut writer = Writer::create(&out, &schema)?;
    let mut rows = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        progress.set_position(rows);
        writer.write(&batch)?;
    }
    writer.finish()?;
    progress.finish_and_clear();
    eprintln!("wrote {rows} rows to {}", out.display());
    Ok(())
}

fn print_preview(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    preview: usize,
    total: Option<u64>,
) -> Result<()> {
    let shown: Vec<RecordBatch> = {
        let mut left = preview;
        batches
            .iter()
            .map_while(|b| {
                if left == 0 {
                    return None;
                }
                let n = left.min(b.num_rows());
                left -= n;
                Some(b.slice(0, n))
            })
            .collect()
    };
    let shown = shown
        .iter()
        .map(abbreviate)
        .collect::<Result<Vec<_>, _>>()?;
    let table = if shown.is_empty() {
        arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(Arc::clone(schema))])?
    } else {
        arrow::util::pretty::pretty_format_batches(&shown)?
    };
    println!("{table}");
    let count: usize = shown.iter().map(|b| b.num_rows()).sum();
    match total {
        Some(total) => println!("{count} of {total} rows shown"),
        None => println!("{count} rows shown"),
    }
    Ok(())
}

/// The longest cell a preview prints; a matrix row of thousands of values is cut, as anndata's
/// repr cuts arrays.
const PREVIEW_CELL: usize = 72;

/// A batch with each cell rendered as text and long cells (matrix rows) cut short.
fn abbreviate(batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    use arrow::array::{ArrayRef, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("null");
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
        let cells = (0..column.len()).map(|i| {
            let text = formatter.value(i).to_string();
            match text.char_indices().nth(PREVIEW_CELL) {
                Some((cut, _)) => format!("{} …", &text[..cut]),
                None => text,
            }
        });
        columns.push(Arc::new(StringArray::from_iter_values(cells)));
        fields.push(Field::new(field.name(), DataType::Utf8, true));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// Output files by extension.
enum Writer {
    Parquet(parquet::arrow::ArrowWriter<std::fs::File>),
    Arrow(arrow::ipc::writer::FileWriter<std::fs::File>),
    Csv(arrow::csv::Writer<std::fs::File>),
}

impl Writer {
    fn create(path: &Path, schema: &SchemaRef) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !matches!(
            ext.as_str(),
            "parquet" | "arrow" | "feather" | "ipc" | "csv"
        ) {
            bail!(
                "--out must end in .parquet, .arrow or .csv, not '{}'",
                path.display()
            );
        }
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(match ext.as_str() {
            "parquet" => Writer::Parquet(parquet::arrow::ArrowWriter::try_new(
                file,
                Arc::clone(schema),
                None,
            )?),
            "csv" => Writer::Csv(arrow::csv::Writer::new(file)),
            _ => Writer::Arrow(arrow::ipc::writer::FileWriter::try_new(
                file,
                &hydrated_schema(schema),
            )?),
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            Writer::Parquet(w) => w.write(batch)?,
            // The IPC file format allows one dictionary per column for the whole file, while
            // each streamed batch brings its own: write the values instead.
            Writer::Arrow(w) => w.write(&hydrate(batch)?)?,
            Writer::Csv(w) => w.write(&hydrate(batch)?)?,
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self {
            Writer::Parquet(w) => {
                w.close()?;
            }
            Writer::Arrow(mut w) => w.finish()?,
            Writer::Csv(_) => {}
        }
        Ok(())
    }
}

/// The schema with dictionary columns replaced by their value types.
fn hydrated_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<arrow::datatypes::Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            arrow::datatypes::DataType::Dictionary(_, value) => {
                f.as_ref().clone().with_data_type(value.as_ref().clone())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ))
}

/// The batch with dictionary columns cast to their values.
fn hydrate(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = hydrated_schema(&batch.schema());
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| arrow::compute::cast(column, field.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema, columns)?)
}

fn print_json(value: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn print_listing(records: &[Value]) {
    let text = |v: &Value, k: &str| match &v[k] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "{:<32} {:<10} {:<9} {:<10} {:>7} {:>12} {:<20}",
        "key", "kind", "suffix", "otype", "version", "rows", "uid"
    );
    for r in records {
        println!(
            "{:<32} {:<10} {:<9} {:<10} {:>7} {:>12} {:<20}",
            text(r, "key"),
            text(r, "kind"),
            text(r, "suffix"),
            text(r, "otype"),
            text(r, "version"),
            text(r, "n_observations"),
            text(r, "uid"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{Cli, file_tree};
    use clap::{CommandFactory, Parser};

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
        // Global flags go before or after the subcommand.
        for args in [
            &[
                "artiflight",
                "--data-dir",
                "d",
                "get",
                "k",
                "--version",
                "U",
            ][..],
            &[
                "artiflight",
                "get",
                "k",
                "--server",
                "grpc://127.0.0.1:1",
                "--data-dir",
                "d",
            ],
            &["artiflight", "delete", "k", "--version", "U", "--permanent"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
    }

    #[test]
    fn tree_like_lamindb() {
        let tree = file_tree(&["louvain=0/a.parquet", "louvain=1/a.parquet"]);
        assert_eq!(
            tree,
            "2 sub-directories & 2 files with suffixes '.parquet'\n├── louvain=0/\n│   └── a.parquet\n└── louvain=1/\n    └── a.parquet\n"
        );
    }
}
