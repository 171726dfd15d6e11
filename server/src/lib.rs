//! artiflight's server library.
//!
//! A request flows `service` (Flight edge) -> `query` (command to DataFusion plan) -> `catalog`
//! (key to record) -> `formats` (record to table provider) -> `storage` (object stores), and the
//! plan's record batches stream back through the service.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use artiflight_server::{Server, ServerOptions};
//! let server = Server::open(&ServerOptions::new("./artiflight-data"))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8815").await?;
//! server.serve(listener, std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod catalog;
mod dataframe;
pub mod error;
pub mod formats;
pub mod ipc;
pub mod query;
pub mod registry;
pub mod service;
pub mod storage;
pub mod token;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::catalog::Catalog;
use crate::error::Result;
use crate::query::{Planner, session_config};
use crate::registry::Registry;
use crate::service::{Fleet, FlightHandler, Limits, Tls};
use crate::storage::Storage;

/// How to open a server's state.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Holds `catalog.sqlite` and managed storage (`objects/`).
    pub data_dir: PathBuf,
    /// Extra roots the server may read (local directories or URLs).
    pub allow_roots: Vec<String>,
    /// How many partitions (and so endpoints) a scan may split into.
    pub target_partitions: usize,
    /// Require a token on every call but the Handshake.
    pub auth: bool,
    /// Serve TLS with this identity.
    pub tls: Option<Tls>,
    pub limits: Limits,
    /// Bytes of remote ranges kept on disk under the data dir for repeated reads (0: none).
    pub cache_bytes: u64,
    /// Memory shared by every query; sorts, aggregates and joins spill to `spill/` in the data dir.
    pub max_query_memory: usize,
    /// The catalog: `sqlite://PATH` (default: `catalog.sqlite` in the data dir), shared by a
    /// fleet's servers.
    pub catalog: Option<String>,
    /// Where uploads are kept: a remote prefix (`s3://bucket/prefix`) that a fleet shares
    /// (default: `objects/` in the data dir).
    pub managed_storage: Option<String>,
    /// Where clients and other servers reach this server (default: the listening address).
    pub advertise: Option<String>,
    /// How often this server renews its place in the fleet; it drops out after five missed.
    pub heartbeat: std::time::Duration,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics_addr: Option<String>,
    /// In a fleet, bytes of files each scan task of a distributed SQL statement reads: a smaller
    /// table runs on one server.
    pub sql_task_bytes: usize,
}

/// datafusion-distributed's own default: 16 MiB of files per scan partition.
pub const DEFAULT_SQL_TASK_BYTES: usize = 16 << 20;

/// A quarter of the machine's memory, the default bound of query memory.
pub fn default_query_memory() -> usize {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib.saturating_mul(1024));
    usize::try_from(total / 4).unwrap_or(usize::MAX)
}

impl ServerOptions {
    /// The URL scheme clients use: `grpc+tls` when serving TLS, else `grpc`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "grpc+tls"
        } else {
            "grpc"
        }
    }

    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            allow_roots: Vec::new(),
            target_partitions: std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .max(2),
            auth: false,
            tls: None,
            limits: Limits::default(),
            cache_bytes: 1 << 30,
            max_query_memory: default_query_memory(),
            catalog: None,
            managed_storage: None,
            advertise: None,
            heartbeat: std::time::Duration::from_secs(2),
            metrics_addr: None,
            sql_task_bytes: DEFAULT_SQL_TASK_BYTES,
        }
    }
}

/// A server's state: catalog, storage, planner and registry.
#[derive(Clone)]
pub struct Server {
    registry: Registry,
    options: ServerOptions,
}

impl Server {
    /// Opens (creating if needed) the data dir and its catalog.
    pub fn open(options: &ServerOptions) -> Result<Self> {
        let mut storage = Storage::new(&options.data_dir, &options.allow_roots)?
            .with_range_cache(options.cache_bytes)?;
        if let Some(url) = &options.managed_storage {
            storage = storage.with_managed_storage(url)?;
        }
        let storage = Arc::new(storage);
        let catalog = match &options.catalog {
            Some(url) => Catalog::open_url(url)?,
            None => Catalog::open_sqlite(&storage.data_dir().join("catalog.sqlite"))?,
        };
        let spill = storage.data_dir().join("spill");
        let planner = Planner::new(catalog, storage, session_config(options.target_partitions))
            .with_query_memory(options.max_query_memory, spill)?;
        Ok(Self {
            registry: Registry::new(planner),
            options: options.clone(),
        })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn planner(&self) -> &Planner {
        self.registry.planner()
    }

    /// Serves Flight on `listener` until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let metrics = match &self.options.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                error::Error::invalid(format!("cannot listen on --metrics-addr {addr}: {e}"))
            })?),
            None => None,
        };
        if let Some(bound) = metrics.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!("metrics on http://{bound}/metrics");
        }
        self.serve_with_metrics(listener, metrics, shutdown).await
    }

    /// [`Server::serve`], with Prometheus metrics on `metrics` when given.
    pub async fn serve_with_metrics(
        &self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        // A crash (kill -9) mid-upload leaves files no record names: swept before serving.
        self.registry.sweep_uploads().await;
        let advertise = match &self.options.advertise {
            Some(uri) => uri.clone(),
            None => {
                let addr = listener
                    .local_addr()
                    .map_err(|e| error::Error::internal_from("the listening address", e))?;
                format!("{}://{addr}", self.options.scheme())
            }
        };
        let fleet = Fleet::new(advertise);
        let handler = FlightHandler::new(
            self.registry.clone(),
            self.options.auth,
            self.options.limits.clone(),
        )?
        .with_fleet(Arc::clone(&fleet), self.options.sql_task_bytes);
        // The heartbeat stops (and the server leaves the fleet) when serving ends, however it ends.
        let (stopping, mut stopped) = tokio::sync::watch::channel(());
        let heartbeat = tokio::spawn(fleet.run(
            self.planner().catalog().clone(),
            self.options.heartbeat,
            async move {
                let _ = stopped.changed().await;
            },
        ));
        let shutdown = async move {
            shutdown.await;
            drop(stopping);
        };
        let served = service::serve(
            listener,
            handler,
            self.options.tls.as_ref(),
            metrics,
            shutdown,
        )
        .await;
        if let Err(e) = heartbeat.await {
            tracing::warn!(error = %e, "the fleet heartbeat task failed");
        }
        served
    }
}
