//! The command line. Each command has its own file; the commands that read or change records run
//! through a [`Backend`]: a running server when `--server` is given, else the catalog in the data
//! dir, with the same actions and the same answers either way.

mod backend;
mod get;
mod serve;
mod show;
mod token;

use std::path::PathBuf;

use anyhow::{Context, Result};
use artiflight_client::Client;
use artiflight_server::ServerOptions;
use artiflight_server::catalog::RecordFilter;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use backend::Backend;

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

impl Cli {
    /// The log format asked for, read before anything logs.
    pub(crate) fn log_format(&self) -> LogFormat {
        self.global.log_format
    }
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
    /// The catalog, `sqlite://PATH` (default: catalog.sqlite in the data dir); a fleet's servers
    /// share one.
    #[arg(long, global = true, env = "ARTIFLIGHT_CATALOG")]
    catalog: Option<String>,
    /// Where uploads are kept: a prefix such as s3://bucket/prefix that a fleet's servers share
    /// (default: objects/ in the data dir).
    #[arg(long, global = true, env = "ARTIFLIGHT_MANAGED_STORAGE")]
    managed_storage: Option<String>,
    /// Logs on stderr as lines for people (`text`) or one JSON object per line (`json`).
    #[arg(
        long,
        global = true,
        env = "ARTIFLIGHT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

/// How logs are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the Flight server.
    Serve(serve::Serve),
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
        /// Only keys that start with this, e.g. `pbmc` or `project1/`.
        #[arg(long, env = "ARTIFLIGHT_KEY_PREFIX")]
        key_prefix: Option<String>,
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
    Get(get::Get),
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
    Token(token::TokenCommand),
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

impl Global {
    /// The state a command opens. Only `serve` keeps the range cache (it sets its size): another
    /// process opening it would evict down to its own limit and remove the server's writes in
    /// progress.
    fn options(&self) -> ServerOptions {
        ServerOptions {
            cache_bytes: 0,
            catalog: self.catalog.clone(),
            managed_storage: self.managed_storage.clone(),
            ..ServerOptions::new(&self.data_dir)
        }
    }

    /// Connects to `url` with the global token and trusted certificates.
    async fn connect(&self, url: &str) -> Result<Client> {
        let ca_pem = match &self.tls_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("reading --tls-ca {}", path.display()))?,
            ),
            None => None,
        };
        let options = artiflight_client::Options {
            token: self.token.clone(),
            ca_pem,
        };
        Ok(Client::connect_with(url, &options).await?)
    }
}

pub(crate) async fn run(cli: Cli) -> Result<()> {
    let global = &cli.global;
    match cli.command {
        Command::Serve(args) => serve::run(global, args).await,
        Command::Get(args) => get::run(global, args).await,
        Command::Show { key, version } => show::run(global, &key, version).await,
        Command::Token(command) => token::run(global, command).await,
        Command::Register {
            path,
            key,
            description,
        } => {
            let body = json!({"path": path, "key": key, "description": description});
            print_json(
                &Backend::open(global)
                    .await?
                    .action("register", body)
                    .await?,
            )
        }
        Command::Collection(CollectionCommand::Create {
            key,
            members,
            description,
        }) => {
            let body = json!({"key": key, "members": members, "description": description});
            let backend = Backend::open(global).await?;
            print_json(&backend.action("create_collection", body).await?)
        }
        Command::Delete {
            key,
            version,
            permanent,
        } => {
            let body = json!({"key": key, "version": version, "permanent": permanent});
            print_json(&Backend::open(global).await?.action("delete", body).await?)
        }
        Command::Ls {
            key_prefix,
            suffix,
            otype,
        } => {
            let filter = RecordFilter {
                key_prefix,
                suffix,
                otype,
                ..Default::default()
            };
            print_listing(&Backend::open(global).await?.list(filter).await?);
            Ok(())
        }
    }
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
    use super::Cli;
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
}
