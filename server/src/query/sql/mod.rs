//! SQL over the catalog, for Flight SQL (docs/PROTOCOL.md section 7).
//!
//! Catalog `artiflight`, schema `public`: one table per latest artifact or collection, named by its
//! key, and an AnnData as `KEY/obs`, `KEY/var` and `KEY/X` (long form). Tables open through the
//! same format providers as Flight commands, so filters push down the same way. A [`Statement`] is
//! self-contained: the query, its bound parameters and, in a ticket, the versions it was planned
//! on, so any server sharing the catalog runs it as issued.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arrow::datatypes::DataType;
use arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::catalog::{MemoryCatalogProvider, SchemaProvider, TableProvider};
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::LogicalPlan;
#[allow(deprecated)] // Older plans still carry it; it keeps partitions apart all the same.
use datafusion::physical_plan::coalesce_batches::CoalesceBatchesExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion::prelude::SessionContext;

mod distributed;
mod statement;
mod tables;

pub use distributed::Distribution;
pub use statement::Statement;
use statement::{bind, number_placeholders, plain_types, read_only, refuse_writes};
use tables::Tables;

use super::long::LongTable;
use super::{Planned, Planner};
use crate::catalog::{Entry, RecordFilter};
use crate::error::{Error, Result};
use crate::formats::{self, Layout, ReadRequest};

/// The one catalog SQL sees.
pub const CATALOG: &str = "artiflight";
/// The one schema in it.
pub const SCHEMA: &str = "public";
/// The table type of every table.
pub const TABLE_TYPE: &str = "TABLE";

/// A table SQL can name, and what it reads.
#[derive(Debug, Clone)]
pub struct SqlTable {
    pub name: String,
    pub entry: Entry,
    /// What to open: the element (`obs`, `X`, a SpatialData table's ...), empty for a plain table,
    /// and its layout.
    pub request: ReadRequest,
}

impl SqlTable {
    /// The tables a catalog entry shows, as its format lists them. A collection is one table.
    pub fn of(entry: &Entry) -> Vec<SqlTable> {
        let Entry::Artifact(a) = entry else {
            return vec![SqlTable {
                name: entry.key().to_string(),
                entry: entry.clone(),
                request: ReadRequest::default(),
            }];
        };
        let format = formats::format_of(&a.suffix);
        format
            .sql_tables(a.otype.as_deref())
            .into_iter()
            .filter_map(|element| {
                let request = format.sql_request(&a.key, &element).ok()??;
                let name = std::iter::once(a.key.as_str())
                    .chain(element.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join("/");
                Some(SqlTable {
                    name,
                    entry: entry.clone(),
                    request,
                })
            })
            .collect()
    }
}

/// A planned SQL query.
pub struct SqlPlan {
    pub planned: Planned,
    /// The entry uid each table name resolved to, for tickets.
    pub versions: BTreeMap<String, String>,
}

/// Plans SQL over the catalog: names tables, opens them through their formats and plans
/// statements. Cheap to clone.
///
/// ```no_run
/// # async fn f(server: &artiflight_server::Server) -> artiflight_server::error::Result<()> {
/// use artiflight_server::query::{SqlPlanner, Statement};
/// let sql = SqlPlanner::new(server.planner().clone());
/// let plan = sql.plan(&Statement::new("SELECT count(*) FROM \"pbmc68k/obs\"")).await?;
/// println!("{} endpoint(s)", plan.planned.endpoint_count());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlPlanner {
    planner: Planner,
    /// Set in a fleet: statements that exchange data may run their stages on several servers.
    distribution: Option<Distribution>,
}

impl SqlPlanner {
    pub fn new(planner: Planner) -> Self {
        Self {
            planner,
            distribution: None,
        }
    }

    /// Plans statements that exchange data across the fleet when it has several live servers.
    pub fn with_distribution(mut self, distribution: Distribution) -> Self {
        self.distribution = Some(distribution);
        self
    }

    /// The same planner, with `n` target partitions (a ticket's, so that it plans as issued).
    pub fn with_partitions(&self, n: usize) -> Self {
        Self {
            planner: self.planner.with_partitions(n),
            distribution: self.distribution.clone(),
        }
    }

    /// The planner under it, for what SQL shares with Flight commands.
    pub fn planner(&self) -> &Planner {
        &self.planner
    }

    /// Every table SQL can name, in name order.
    pub async fn tables(&self) -> Result<Vec<SqlTable>> {
        let entries = self.planner.catalog().list(RecordFilter::default()).await?;
        let mut tables: Vec<SqlTable> = entries.iter().flat_map(SqlTable::of).collect();
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tables)
    }

    /// The table `name` names, at the entry version `uid` if given: a key, or an array store's key
    /// followed by an element path ending in `obs`, `var` or `X`.
    pub async fn table(&self, name: &str, uid: Option<&str>) -> Result<Option<SqlTable>> {
        let cuts = std::iter::once(name.len()).chain(name.rmatch_indices('/').map(|(i, _)| i));
        for cut in cuts {
            let (key, rest) = (&name[..cut], &name[cut..]);
            let entry = match self.planner.catalog().resolve(key, uid).await {
                Ok(entry) => entry,
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let element: Vec<String> = rest
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let request = match &entry {
                Entry::Artifact(a) => formats::format_of(&a.suffix).sql_request(name, &element)?,
                Entry::Collection(_) => element.is_empty().then(ReadRequest::default),
            };
            return Ok(request.map(|request| SqlTable {
                name: name.to_string(),
                entry,
                request,
            }));
        }
        Ok(None)
    }

    /// Opens a SQL table through its format's provider.
    pub async fn open_table(
        &self,
        ctx: &SessionContext,
        table: &SqlTable,
    ) -> Result<Arc<dyn TableProvider>> {
        let sources = match &table.entry {
            Entry::Artifact(a) => vec![a.clone()],
            Entry::Collection(c) => self.planner.catalog().artifacts(c.members.clone()).await?,
        };
        let request = table.request.clone();
        let opened = self.planner.union(ctx, &sources, &request).await?;
        match (request.layout, sources.as_slice()) {
            // A matrix in long form reads what a query's name predicates select.
            (Some(Layout::Long), [source]) => Ok(Arc::new(LongTable::new(
                self.planner.clone(),
                source.clone(),
                request,
                opened.table.schema(),
            ))),
            _ => Ok(opened.table),
        }
    }

    /// A session whose catalog is ours, reading tables at the `pinned` versions where given.
    fn session(&self, pinned: BTreeMap<String, String>) -> Result<(SessionContext, Arc<Tables>)> {
        // One lease bag for the query's session and the one its tables open in, so that the plan
        // holds what its tables read.
        let mut base = self
            .planner
            .config()
            .clone()
            .with_extension(Arc::new(crate::query::LeaseBag::default()));
        // Queries compute on string views: parquet strings decode without a copy and group keys
        // hash faster. Results go out as plain strings (`plain_types`).
        base.options_mut().execution.parquet.schema_force_view_types = true;
        base.options_mut().sql_parser.map_string_types_to_utf8view = true;
        let config = base
            .clone()
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true);
        let ctx = self.planner.session_with(config);
        let tables = Arc::new(Tables {
            sql: self.clone(),
            open_ctx: self.planner.session_with(base),
            pinned,
            resolved: Mutex::default(),
        });
        let catalog = MemoryCatalogProvider::new();
        datafusion::catalog::CatalogProvider::register_schema(
            &catalog,
            SCHEMA,
            Arc::clone(&tables) as Arc<dyn SchemaProvider>,
        )?;
        ctx.register_catalog(CATALOG, Arc::new(catalog));
        Ok((ctx, tables))
    }

    /// The logical plan of a read-only statement, parameters bound if it has them.
    async fn logical(
        &self,
        statement: &Statement,
    ) -> Result<(SessionContext, Arc<Tables>, LogicalPlan)> {
        let (ctx, tables) = self.session(statement.versions.clone())?;
        let state = ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let mut parsed = state.sql_to_statement(&statement.sql, &dialect)?;
        refuse_writes(&parsed, &statement.sql)?;
        number_placeholders(&mut parsed);
        let plan = state.statement_to_plan(parsed).await?;
        SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| Error::PermissionDenied(read_only(&statement.sql, e.strip_backtrace())))?;
        let plan = match &statement.parameters {
            Some(parameters) => bind(plan, parameters)?,
            None => plan,
        };
        Ok((ctx, tables, plain_types(plan)?))
    }

    /// The result and parameter schemas of a statement, for a prepared statement.
    pub async fn prepare(&self, sql: &str) -> Result<(SchemaRef, SchemaRef)> {
        let (_, _, plan) = self.logical(&Statement::new(sql)).await?;
        let mut parameters: Vec<(usize, Field)> = plan
            .get_parameter_fields()?
            .into_iter()
            .map(|(name, field)| {
                let index = name.trim_start_matches('$').parse().unwrap_or(usize::MAX);
                let data_type = field
                    .map(|f| f.data_type().clone())
                    .unwrap_or(DataType::Null);
                (index, Field::new(name, data_type, true))
            })
            .collect();
        parameters.sort_by_key(|(i, _)| *i);
        let parameters = Schema::new(parameters.into_iter().map(|(_, f)| f).collect::<Vec<_>>());
        Ok((
            Arc::new(plan.schema().as_arrow().clone()),
            Arc::new(parameters),
        ))
    }

    /// Plans a statement. Its output partitions become endpoints when they are independent (a
    /// scan, filtered and projected); otherwise they are merged into one, because executing one
    /// partition of a plan that repartitions or joins would run, and buffer, its siblings too.
    pub async fn plan(&self, statement: &Statement) -> Result<SqlPlan> {
        self.plan_as(statement, None).await
    }

    /// [`SqlPlanner::plan`] for a caller whose `authorization` header (if any) goes with the
    /// stages that run on other servers of the fleet.
    pub async fn plan_as(
        &self,
        statement: &Statement,
        authorization: Option<&str>,
    ) -> Result<SqlPlan> {
        let (ctx, tables, logical) = self.logical(statement).await?;
        if statement.parameters.is_none() {
            let missing = logical.get_parameter_fields()?;
            if !missing.is_empty() {
                return Err(Error::invalid(format!(
                    "the statement has {} parameter(s): bind them (DoPut on the prepared \
                     statement) before executing it",
                    missing.len()
                )));
            }
        }
        let mut state = ctx.state();
        let mut plan = state.create_physical_plan(&logical).await?;
        let scans_only = independent(plan.as_ref());
        if let Some(distribution) = &self.distribution
            && !scans_only
            && distribution.applies_to(plan.as_ref())
        {
            // Planned again rather than rewritten: the distributed planner is a query planner.
            // Planning is milliseconds; the stages it spreads are the query's seconds.
            state = distribution.state(&state, authorization)?;
            plan = state.create_physical_plan(&logical).await?;
        }
        let partitions = plan.output_partitioning().partition_count();
        if partitions != 1 && !(partitions > 1 && scans_only) {
            plan = Arc::new(CoalescePartitionsExec::new(plan));
        }
        let versions = tables
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Ok(SqlPlan {
            planned: Planned {
                plan,
                task: state.task_ctx(),
                limit: None,
            },
            versions,
        })
    }
}

/// Whether each output partition of `plan` can run on its own: every node maps partition `i` of
/// its input to partition `i` of its output, with no state shared between partitions.
fn independent(plan: &dyn ExecutionPlan) -> bool {
    let own = plan.children().is_empty()
        || plan.is::<FilterExec>()
        || plan.is::<ProjectionExec>()
        || {
            #[allow(deprecated)]
            let coalesce = plan.is::<CoalesceBatchesExec>();
            coalesce
        }
        || plan.is::<CooperativeExec>();
    own && plan.children().iter().all(|c| independent(c.as_ref()))
}
