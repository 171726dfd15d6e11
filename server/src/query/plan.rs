//! Planning commands over table providers.

use std::sync::Arc;

use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::ViewTable;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{Expr, lit};
use datafusion::prelude::{DataFrame, SessionConfig, SessionContext};
use url::Url;

use super::Command;
use super::planned::{LeaseBag, Planned};
use super::prune::PruneFilesByStatistics;
use crate::catalog::{ArtifactRecord, Catalog, Entry};
pub use crate::dataframe::statistics;
use crate::dataframe::{apply_filter, select_columns};
use crate::error::{Error, Result, guard_reader};
use crate::formats::{self, Opened, ReadRequest};
use crate::storage::Storage;

/// The DataFusion settings every plan runs with.
///
/// Pyarrow-compatible types (no view types), file metadata kept (pandas' index metadata), parquet
/// filters evaluated during decoding, and no round-robin repartitioning, so that partitions, and
/// thus endpoints, keep the files' row order.
pub fn session_config(target_partitions: usize) -> SessionConfig {
    let mut config = SessionConfig::new()
        .with_target_partitions(target_partitions.max(1))
        .with_round_robin_repartition(false)
        .with_collect_statistics(true);
    let options = config.options_mut();
    options.execution.parquet.skip_metadata = false;
    options.execution.parquet.schema_force_view_types = false;
    options.execution.parquet.pushdown_filters = true;
    options.execution.parquet.reorder_filters = true;
    options.sql_parser.map_string_types_to_utf8view = false;
    // Each endpoint executes one partition on its own (possibly on another server): a partition
    // must read exactly its own file group, never steal its siblings' files.
    options.execution.enable_file_stream_work_stealing = false;
    config
}

/// The runtime every planner starts from. No listing cache: a folder's files may change between
/// two requests, and a stale list names files that are gone. Footer and statistics caches stay:
/// they check size and modification time.
fn runtime_builder() -> RuntimeEnvBuilder {
    let caches = CacheManagerConfig::default().with_list_files_cache_limit(0);
    RuntimeEnvBuilder::new().with_cache_manager(caches)
}

/// Plans commands against the catalog and storage.
#[derive(Clone)]
pub struct Planner {
    catalog: Catalog,
    storage: Arc<Storage>,
    runtime: Arc<RuntimeEnv>,
    config: SessionConfig,
}

/// What a command names: the catalog entry (none for a query set) and the artifacts to read, in
/// table order.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub entry: Option<Entry>,
    pub sources: Vec<ArtifactRecord>,
}

impl Planner {
    pub fn new(catalog: Catalog, storage: Arc<Storage>, config: SessionConfig) -> Self {
        let runtime = runtime_builder()
            .build_arc()
            .unwrap_or_else(|_| Arc::new(RuntimeEnv::default()));
        Self {
            catalog,
            storage,
            runtime,
            config,
        }
    }

    /// Bounds the memory of every query of this planner, DoGet plans and SQL alike, to `bytes`
    /// shared fairly between them; sorts, aggregates and joins spill to `spill_dir` beyond their
    /// share, and fail with RESOURCE_EXHAUSTED when spilling cannot help.
    pub fn with_query_memory(
        mut self,
        bytes: usize,
        spill_dir: std::path::PathBuf,
    ) -> Result<Self> {
        use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
        use datafusion::execution::memory_pool::FairSpillPool;
        std::fs::create_dir_all(&spill_dir).map_err(|e| Error::io(spill_dir.display(), e))?;
        let disk =
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Directories(vec![spill_dir]));
        self.runtime = runtime_builder()
            .with_memory_pool(Arc::new(FairSpillPool::new(bytes.max(1 << 20))))
            .with_disk_manager_builder(disk)
            .build_arc()
            .map_err(Error::from_datafusion)?;
        Ok(self)
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The runtime every query of this planner shares: object stores, memory pool, spill dir.
    pub(crate) fn runtime(&self) -> Arc<RuntimeEnv> {
        Arc::clone(&self.runtime)
    }

    /// Bytes of query memory reserved now, of the pool every query shares.
    pub fn memory_reserved(&self) -> usize {
        self.runtime.memory_pool.reserved()
    }

    /// Makes a remote artifact's object store known to DataFusion's runtime, which lists and
    /// reads listing tables through it (local files need no registration).
    pub fn use_store(&self, located: &crate::storage::Located) {
        if located.url.scheme() != "file" {
            self.runtime
                .register_object_store(&located.url, Arc::clone(&located.store));
        }
    }

    /// A fresh session sharing the runtime (object stores, memory pool).
    pub fn session(&self) -> SessionContext {
        self.session_with(self.config.clone())
    }

    /// A fresh session with `config` on the shared runtime, planning with this crate's rules.
    pub(crate) fn session_with(&self, config: SessionConfig) -> SessionContext {
        let config = match config.get_extension::<LeaseBag>() {
            Some(_) => config,
            None => config.with_extension(Arc::new(LeaseBag::default())),
        };
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(Arc::clone(&self.runtime))
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(PruneFilesByStatistics))
            .build();
        SessionContext::new_with_state(state)
    }

    /// The target partitions plans are made with.
    pub fn target_partitions(&self) -> usize {
        self.config.target_partitions()
    }

    /// This planner with `target_partitions` (none for 0), so that a ticket issued by a server
    /// with other cores plans into the same partitions here.
    pub fn with_partitions(&self, target_partitions: usize) -> Planner {
        let mut planner = self.clone();
        if target_partitions > 0 {
            planner.config = planner
                .config
                .clone()
                .with_target_partitions(target_partitions);
        }
        planner
    }

    /// The settings every session starts from.
    pub(crate) fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Looks up what the command names.
    pub async fn resolve(&self, command: &Command) -> Result<Resolved> {
        if let Some(query) = &command.query {
            let sources: Vec<ArtifactRecord> = self
                .catalog
                .list(query.clone())
                .await?
                .into_iter()
                .filter_map(|e| match e {
                    Entry::Artifact(a) => Some(a),
                    Entry::Collection(_) => None,
                })
                .collect();
            if sources.is_empty() {
                return Err(Error::not_found("no artifact matches the query"));
            }
            return Ok(Resolved {
                entry: None,
                sources,
            });
        }
        let key = command.key.as_deref().unwrap_or_default();
        let entry = self
            .catalog
            .resolve(key, command.version.as_deref())
            .await?;
        let sources = match &entry {
            Entry::Artifact(a) => vec![a.clone()],
            Entry::Collection(c) => self.catalog.artifacts(c.members.clone()).await?,
        };
        Ok(Resolved {
            entry: Some(entry),
            sources,
        })
    }

    /// The artifacts a ticket names.
    ///
    /// Read in runs of a few hundred, so that a ticket naming many uids (a forged one, or a
    /// large collection's) never holds the catalog for long.
    pub async fn sources(&self, uids: Vec<String>) -> Result<Vec<ArtifactRecord>> {
        const MAX_UIDS: usize = 100_000;
        if uids.is_empty() {
            return Err(Error::invalid("ticket names no artifact"));
        }
        if uids.len() > MAX_UIDS {
            return Err(Error::invalid(format!(
                "ticket names {} artifacts; at most {MAX_UIDS} are read",
                uids.len()
            )));
        }
        let mut records = Vec::with_capacity(uids.len());
        for run in uids.chunks(256) {
            records.extend(self.catalog.artifacts(run.to_vec()).await?);
        }
        Ok(records)
    }

    /// Opens one artifact's element as a table, checking that the server may read it.
    pub async fn open(
        &self,
        ctx: &SessionContext,
        record: &ArtifactRecord,
        request: &ReadRequest,
    ) -> Result<Opened> {
        let url = Url::parse(&record.path).map_err(|e| {
            Error::internal(format!("record {} has an invalid path: {e}", record.uid))
        })?;
        if !record.trusted {
            self.storage.check_allowed(&url)?;
        }
        let located = self.storage.locate_store(&url).await.map_err(|e| match e {
            Error::NotFound(message) => Error::DataLoss {
                location: format!("artifact '{}' ({})", record.key, record.uid),
                message,
            },
            other => other,
        })?;
        self.use_store(&located);
        if let Some(bag) = ctx.state_ref().read().config().get_extension::<LeaseBag>() {
            bag.hold(self.storage.leases().take(&record.path));
        }
        let format = formats::format_for(&located, &record.suffix)?;
        let location = format!("artifact '{}' at {}", record.key, record.path);
        guard_reader(location, format.open(ctx, &located, request)).await
    }

    /// The artifact's structure (AnnData shape and elements, an array tree), if its format has one.
    /// With `values`, nested data such as AnnData's `uns` is read too.
    pub async fn describe(
        &self,
        record: &ArtifactRecord,
        values: bool,
    ) -> Result<Option<serde_json::Value>> {
        let url = Url::parse(&record.path).map_err(|e| {
            Error::internal(format!("record {} has an invalid path: {e}", record.uid))
        })?;
        if !record.trusted {
            self.storage.check_allowed(&url)?;
        }
        let located = self.storage.locate_store(&url).await?;
        let format = formats::format_for(&located, &record.suffix)?;
        let location = format!("artifact '{}' at {}", record.key, record.path);
        guard_reader(location, format.describe(&located, values)).await
    }

    /// The table of several artifacts: their union in order, columns unified by name.
    pub async fn union(
        &self,
        ctx: &SessionContext,
        sources: &[ArtifactRecord],
        request: &ReadRequest,
    ) -> Result<Opened> {
        let mut tables = Vec::with_capacity(sources.len());
        let mut selected = true;
        for source in sources {
            let opened = self.open(ctx, source, request).await?;
            selected &= opened.selected;
            tables.push((source.key.clone(), opened.table));
        }
        if tables.len() == 1 {
            return Ok(Opened {
                table: tables.remove(0).1,
                selected,
            });
        }
        let schemas: Vec<(String, SchemaRef)> = tables
            .iter()
            .map(|(k, t)| (k.clone(), t.schema()))
            .collect();
        let unified = unify_schemas(&schemas)?;
        let mut union: Option<DataFrame> = None;
        for (_, table) in tables {
            let member = table.schema();
            let columns: Vec<Expr> = unified
                .fields()
                .iter()
                .map(|field| {
                    if member.index_of(field.name()).is_ok() {
                        Ok(Expr::Column(Column::new_unqualified(field.name())))
                    } else {
                        let null = ScalarValue::try_from(field.data_type())
                            .map_err(Error::from_datafusion)?;
                        Ok(lit(null).alias(field.name()))
                    }
                })
                .collect::<Result<_>>()?;
            let df = ctx.read_table(table).map_err(Error::from_datafusion)?;
            let df = df.select(columns).map_err(Error::from_datafusion)?;
            union = Some(match union {
                None => df,
                Some(u) => u.union(df).map_err(Error::from_datafusion)?,
            });
        }
        let plan = union
            .ok_or_else(|| Error::invalid("nothing to read"))?
            .into_unoptimized_plan();
        Ok(Opened {
            table: Arc::new(ViewTable::new(plan, None)),
            selected,
        })
    }

    /// Plans the command over `sources`.
    pub async fn plan(&self, command: &Command, sources: &[ArtifactRecord]) -> Result<Planned> {
        let ctx = self.session();
        let opened = self.union(&ctx, sources, &command.request()).await?;
        let mut df = ctx
            .read_table(opened.table)
            .map_err(Error::from_datafusion)?;
        if !opened.selected {
            if let Some(filter) = &command.filter {
                df = apply_filter(&ctx, df, filter)?;
            }
            if let Some(columns) = &command.columns {
                df = select_columns(df, columns)?;
            }
        }
        let limit = command
            .limit
            .map(|l| usize::try_from(l).unwrap_or(usize::MAX));
        let task = Arc::new(df.task_ctx());
        let plan = df
            .create_physical_plan()
            .await
            .map_err(Error::from_datafusion)?;
        Ok(Planned { plan, task, limit })
    }
}

/// Unifies member schemas by column name, in the first member's column order, then new columns
/// as they appear. A column missing from a member is nullable; the same column with two types is an
/// error naming the member and the column.
pub fn unify_schemas(members: &[(String, SchemaRef)]) -> Result<SchemaRef> {
    let mut fields: Vec<Field> = Vec::new();
    for (key, schema) in members {
        for field in schema.fields() {
            match fields.iter_mut().find(|f| f.name() == field.name()) {
                Some(known) if known.data_type() != field.data_type() => {
                    return Err(Error::invalid(format!(
                        "column '{}' of member '{key}' is {}, but an earlier member has {}",
                        field.name(),
                        field.data_type(),
                        known.data_type()
                    )));
                }
                Some(known) => {
                    if field.is_nullable() {
                        known.set_nullable(true);
                    }
                }
                None => fields.push(field.as_ref().clone()),
            }
        }
    }
    for field in fields.iter_mut() {
        if members
            .iter()
            .any(|(_, s)| s.index_of(field.name()).is_err())
        {
            field.set_nullable(true);
        }
    }
    let metadata = members
        .first()
        .map(|(_, s)| s.metadata().clone())
        .unwrap_or_default();
    Ok(Arc::new(Schema::new_with_metadata(fields, metadata)))
}
