//! SQL over the catalog, for Flight SQL (SPEC section 7).
//!
//! Catalog `artiflight`, schema `public`: one table per latest artifact or collection, named by its
//! key, and an AnnData as `KEY/obs`, `KEY/var` and `KEY/X` (long form). Tables open through the
//! same format providers as Flight commands, so filters push down the same way. A [`Statement`] is
//! self-contained: the query, its bound parameters and, in a ticket, the versions it was planned
//! on, so any server sharing the catalog runs it as issued.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use artiflight_proto::{SQL_STATEMENT_VERSION, SqlStatement};
use async_trait::async_trait;
use datafusion::catalog::{MemoryCatalogProvider, SchemaProvider, TableProvider};
use datafusion::common::Column;
use datafusion::common::ScalarValue;
use datafusion::execution::context::SQLOptions;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, cast};
#[allow(deprecated)] // Older plans still carry it; it keeps partitions apart all the same.
use datafusion::physical_plan::coalesce_batches::CoalesceBatchesExec;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as ParsedStatement;
use datafusion::sql::sqlparser::ast::{self, visit_expressions_mut};
use prost::Message;

use super::long::LongTable;
use super::{Planned, Planner};
use crate::catalog::{Entry, RecordFilter};
use crate::error::{Error, Result};
use crate::formats::{AnnData, Format, Layout, Request};

/// The one catalog SQL sees.
pub const CATALOG: &str = "artiflight";
/// The one schema in it.
pub const SCHEMA: &str = "public";
/// The table type of every table.
pub const TABLE_TYPE: &str = "TABLE";

/// The elements an AnnData shows as tables.
const ANNDATA_TABLES: [&str; 3] = ["obs", "var", "X"];

/// The largest parameter set a handle or ticket may carry (one row of values).
const MAX_PARAMETER_BYTES: usize = 1 << 20;

/// A SQL statement as it travels in prepared-statement handles and tickets.
///
/// ```
/// use artiflight_server::query::Statement;
/// let statement = Statement::new("SELECT 1");
/// assert_eq!(Statement::decode(&statement.encode().unwrap()).unwrap(), statement);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Statement {
    pub sql: String,
    /// Bound parameters: one row, `$1` from the first column.
    pub parameters: Option<RecordBatch>,
    /// Ticket only: the entry uid each table name resolved to.
    pub versions: BTreeMap<String, String>,
    pub partition: usize,
    pub partition_count: usize,
    /// Ticket only: which flight it belongs to (random per GetFlightInfo); cancels go by it.
    pub flight: u64,
    /// Ticket only: the target partitions the flight was planned with (0: the server's own).
    pub target_partitions: usize,
}

impl Statement {
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            ..Default::default()
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let parameters = match &self.parameters {
            Some(batch) => {
                let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema())
                    .and_then(|mut w| w.write(batch).map(|_| w))
                    .map_err(|e| Error::Internal(format!("cannot encode parameters: {e}")))?;
                writer
                    .finish()
                    .map_err(|e| Error::Internal(format!("cannot encode parameters: {e}")))?;
                writer
                    .into_inner()
                    .map_err(|e| Error::Internal(format!("cannot encode parameters: {e}")))?
            }
            None => Vec::new(),
        };
        Ok(SqlStatement {
            version: SQL_STATEMENT_VERSION,
            sql: self.sql.clone(),
            parameters,
            versions: self.versions.clone().into_iter().collect(),
            partition: self.partition as u32,
            partition_count: self.partition_count as u32,
            flight: self.flight,
            target_partitions: u32::try_from(self.target_partitions).unwrap_or(0),
        }
        .encode_to_vec())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let message = SqlStatement::decode(bytes)
            .map_err(|e| Error::invalid(format!("malformed statement handle: {e}")))?;
        if message.version != SQL_STATEMENT_VERSION {
            return Err(Error::invalid(format!(
                "statement handle version {} is not supported (this server reads version \
                 {SQL_STATEMENT_VERSION}); prepare the statement again",
                message.version
            )));
        }
        if message.partition_count > 0 && message.partition >= message.partition_count {
            return Err(Error::invalid("malformed ticket: partition out of range"));
        }
        let parameters = if message.parameters.is_empty() {
            None
        } else {
            // One row of parameters: anything larger is not a parameter set.
            if message.parameters.len() > MAX_PARAMETER_BYTES {
                return Err(Error::invalid(format!(
                    "the statement's parameters take {} bytes; at most {MAX_PARAMETER_BYTES} are \
                     accepted",
                    message.parameters.len()
                )));
            }
            crate::ipc::check_stream(&message.parameters)?;
            let bad = |e: arrow::error::ArrowError| {
                Error::invalid(format!("malformed parameters in statement handle: {e}"))
            };
            // The headers are checked above; a decoder panic on what they cannot show is still
            // this request's error, never the server's.
            std::panic::catch_unwind(|| {
                let mut reader =
                    StreamReader::try_new(message.parameters.as_slice(), None).map_err(bad)?;
                reader.next().transpose().map_err(bad)
            })
            .unwrap_or_else(|_| Err(Error::invalid("malformed parameters in statement handle")))?
        };
        Ok(Self {
            sql: message.sql,
            parameters,
            versions: message.versions.into_iter().collect(),
            partition: message.partition as usize,
            partition_count: message.partition_count as usize,
            flight: message.flight,
            target_partitions: message.target_partitions as usize,
        })
    }
}

/// A table SQL can name, and what it reads.
#[derive(Debug, Clone)]
pub struct SqlTable {
    pub name: String,
    pub entry: Entry,
    /// The AnnData element (`obs`, `var`, `X`, or a SpatialData table's), empty for a plain table.
    pub element: Vec<String>,
}

impl SqlTable {
    /// The tables a catalog entry shows: itself, or an AnnData's elements. Other array stores
    /// (SpatialData, generic HDF5 and zarr) are not listed; a SpatialData table is still readable
    /// as `KEY/tables/NAME/obs`.
    pub fn of(entry: &Entry) -> Vec<SqlTable> {
        match entry {
            Entry::Artifact(a) if a.otype.as_deref() == Some("AnnData") => ANNDATA_TABLES
                .iter()
                .map(|element| SqlTable {
                    name: format!("{}/{element}", a.key),
                    entry: entry.clone(),
                    element: vec![element.to_string()],
                })
                .collect(),
            Entry::Artifact(a) if AnnData.claims(&a.suffix) => Vec::new(),
            _ => vec![SqlTable {
                name: entry.key().to_string(),
                entry: entry.clone(),
                element: Vec::new(),
            }],
        }
    }

    fn request(&self) -> Request {
        let long = self.element.last().is_some_and(|e| e == "X");
        Request {
            element: self.element.clone(),
            layout: long.then_some(Layout::Long),
            ..Default::default()
        }
    }
}

/// A planned SQL query.
pub struct SqlPlan {
    pub planned: Planned,
    /// The entry uid each table name resolved to, for tickets.
    pub versions: BTreeMap<String, String>,
}

impl Planner {
    /// Every table SQL can name, in name order.
    pub async fn sql_tables(&self) -> Result<Vec<SqlTable>> {
        let entries = self
            .catalog()
            .run(|c| c.list(&RecordFilter::default()))
            .await?;
        let mut tables: Vec<SqlTable> = entries.iter().flat_map(SqlTable::of).collect();
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tables)
    }

    /// The table `name` names, at the entry version `uid` if given: a key, or an array store's key
    /// followed by an element path ending in `obs`, `var` or `X`.
    pub async fn sql_table(&self, name: &str, uid: Option<&str>) -> Result<Option<SqlTable>> {
        let cuts = std::iter::once(name.len()).chain(name.rmatch_indices('/').map(|(i, _)| i));
        for cut in cuts {
            let (key, rest) = (name[..cut].to_string(), &name[cut..]);
            let uid = uid.map(str::to_string);
            let entry = match self
                .catalog()
                .run(move |c| c.resolve(&key, uid.as_deref()))
                .await
            {
                Ok(entry) => entry,
                Err(Error::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let element: Vec<String> = rest
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            let arrays = matches!(&entry, Entry::Artifact(a) if AnnData.claims(&a.suffix));
            if element.is_empty() && arrays {
                return Err(Error::invalid(format!(
                    "'{name}' holds arrays, not one table: query \"{name}/obs\", \"{name}/var\" or \
                     \"{name}/X\" (a SpatialData table: \"{name}/tables/NAME/obs\")"
                )));
            }
            let known = element
                .last()
                .is_none_or(|last| ANNDATA_TABLES.contains(&last.as_str()));
            if !known || (!element.is_empty() && !arrays) {
                return Ok(None);
            }
            return Ok(Some(SqlTable {
                name: name.to_string(),
                entry,
                element,
            }));
        }
        Ok(None)
    }

    /// Opens a SQL table through its format's provider.
    pub async fn open_sql_table(
        &self,
        ctx: &SessionContext,
        table: &SqlTable,
    ) -> Result<Arc<dyn TableProvider>> {
        let sources = match &table.entry {
            Entry::Artifact(a) => vec![a.clone()],
            Entry::Collection(c) => {
                let uids = c.members.clone();
                self.catalog().run(move |c| c.artifacts(&uids)).await?
            }
        };
        let request = table.request();
        let opened = self.union(ctx, &sources, &request).await?;
        match (request.layout, sources.as_slice()) {
            // A matrix in long form reads what a query's name predicates select.
            (Some(Layout::Long), [source]) => Ok(Arc::new(LongTable::new(
                self.clone(),
                source.clone(),
                request,
                opened.table.schema(),
            ))),
            _ => Ok(opened.table),
        }
    }

    /// A session whose catalog is ours, reading tables at the `pinned` versions where given.
    fn sql_session(
        &self,
        pinned: BTreeMap<String, String>,
    ) -> Result<(SessionContext, Arc<Tables>)> {
        // One lease bag for the query's session and the one its tables open in, so that the plan
        // holds what its tables read.
        let mut base = self
            .config()
            .clone()
            .with_extension(Arc::new(super::plan::LeaseBag::default()));
        // Queries compute on string views: parquet strings decode without a copy and group keys
        // hash faster. Results go out as plain strings (`plain_types`).
        base.options_mut().execution.parquet.schema_force_view_types = true;
        base.options_mut().sql_parser.map_string_types_to_utf8view = true;
        let config = base
            .clone()
            .with_default_catalog_and_schema(CATALOG, SCHEMA)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true);
        let ctx = self.session_with(config);
        let tables = Arc::new(Tables {
            planner: self.clone(),
            // Tables open in a session of their own: holding the query's session here would make
            // a reference cycle through its catalog.
            open_ctx: self.session_with(base),
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
    async fn sql_logical(
        &self,
        statement: &Statement,
    ) -> Result<(SessionContext, Arc<Tables>, LogicalPlan)> {
        let (ctx, tables) = self.sql_session(statement.versions.clone())?;
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
    pub async fn sql_prepare(&self, sql: &str) -> Result<(SchemaRef, SchemaRef)> {
        let (_, _, plan) = self.sql_logical(&Statement::new(sql)).await?;
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
    pub async fn sql_plan(&self, statement: &Statement) -> Result<SqlPlan> {
        let (ctx, tables, logical) = self.sql_logical(statement).await?;
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
        let state = ctx.state();
        let mut plan = state.create_physical_plan(&logical).await?;
        let partitions = plan.output_partitioning().partition_count();
        if partitions != 1 && !(partitions > 1 && independent(plan.as_ref())) {
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

/// Our schema `public`: looks tables up in the catalog as queries name them.
struct Tables {
    planner: Planner,
    open_ctx: SessionContext,
    pinned: BTreeMap<String, String>,
    /// Names looked up so far, with the entry uid each resolved to.
    resolved: Mutex<BTreeMap<String, String>>,
}

impl fmt::Debug for Tables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tables")
            .field("pinned", &self.pinned)
            .finish()
    }
}

#[async_trait]
impl SchemaProvider for Tables {
    /// Only `information_schema` and `SHOW TABLES` list names; it is one short catalog read.
    fn table_names(&self) -> Vec<String> {
        // DataFusion asks synchronously, from async code: the catalog read (which may wait on
        // another process's write lock) must not stall the worker thread it runs on.
        let list = || {
            self.planner
                .catalog()
                .store()
                .list(&RecordFilter::default())
        };
        let listed = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(list),
            _ => list(),
        };
        match listed {
            Ok(entries) => entries
                .iter()
                .flat_map(SqlTable::of)
                .map(|t| t.name)
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list tables");
                Vec::new()
            }
        }
    }

    async fn table(&self, name: &str) -> datafusion::error::Result<Option<Arc<dyn TableProvider>>> {
        let pinned = self.pinned.get(name).map(String::as_str);
        let Some(table) = self.planner.sql_table(name, pinned).await? else {
            return Ok(None);
        };
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), table.entry.uid().to_string());
        Ok(Some(
            self.planner.open_sql_table(&self.open_ctx, &table).await?,
        ))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.table_names().iter().any(|n| n == name)
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

/// Refuses anything but queries before planning, so that no statement with side effects starts.
fn refuse_writes(statement: &ParsedStatement, sql: &str) -> Result<()> {
    let allowed = match statement {
        ParsedStatement::Statement(s) => matches!(
            s.as_ref(),
            ast::Statement::Query(_)
                | ast::Statement::ShowTables { .. }
                | ast::Statement::ShowColumns { .. }
                | ast::Statement::ExplainTable { .. }
        ),
        ParsedStatement::Explain(explain) => return refuse_writes(&explain.statement, sql),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Error::PermissionDenied(read_only(
            sql,
            "only queries run".to_string(),
        )))
    }
}

fn read_only(sql: &str, detail: String) -> String {
    let verb = sql
        .split_whitespace()
        .next()
        .unwrap_or("this")
        .to_uppercase();
    format!(
        "{verb} statements are refused: artiflight serves its artifacts read-only through SQL \
         ({detail}). Add data with DoPut or the 'register' action."
    )
}

/// Numbers JDBC-style `?` placeholders `$1`, `$2`, ... in the order they appear, which is the
/// order clients bind them in.
fn number_placeholders(statement: &mut ParsedStatement) {
    let ParsedStatement::Statement(statement) = statement else {
        return;
    };
    let mut n = 0;
    let _ = visit_expressions_mut(statement.as_mut(), |expr| {
        if let ast::Expr::Value(value) = expr
            && let ast::Value::Placeholder(p) = &mut value.value
            && p == "?"
        {
            n += 1;
            *p = format!("${n}");
        }
        ControlFlow::<()>::Continue(())
    });
}

/// Casts string and binary views in the result to plain strings and binaries, which every Flight
/// SQL client reads (JDBC's among them).
fn plain_types(plan: LogicalPlan) -> Result<LogicalPlan> {
    let plain = |t: &DataType| match t {
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        _ => None,
    };
    let schema = Arc::clone(plan.schema());
    if !schema
        .fields()
        .iter()
        .any(|f| plain(f.data_type()).is_some())
    {
        return Ok(plan);
    }
    let columns = schema.iter().map(|(qualifier, field)| {
        let column = Expr::Column(Column::from((qualifier, field)));
        match plain(field.data_type()) {
            Some(to) => cast(column, to).alias_qualified(qualifier.cloned(), field.name()),
            None => column,
        }
    });
    Ok(LogicalPlanBuilder::from(plan).project(columns)?.build()?)
}

/// Binds the first row of `parameters` to `$1`, `$2`, ..., cast to the types the query infers
/// (a Python int arrives as Int64, the column may be Int32).
fn bind(plan: LogicalPlan, parameters: &RecordBatch) -> Result<LogicalPlan> {
    if parameters.num_rows() != 1 {
        return Err(Error::invalid(format!(
            "bind one row of parameters per execution, got {}",
            parameters.num_rows()
        )));
    }
    let types = plan.get_parameter_types()?;
    let values = parameters
        .columns()
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let value = ScalarValue::try_from_array(column, 0)?;
            match types.get(&format!("${}", i + 1)) {
                Some(Some(expected)) if *expected != value.data_type() => {
                    value.cast_to(expected).map_err(|e| {
                        Error::invalid(format!("parameter ${}: {}", i + 1, e.strip_backtrace()))
                    })
                }
                _ => Ok(value),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(plan.with_param_values(values)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> ParsedStatement {
        let ctx = SessionContext::new();
        ctx.state()
            .sql_to_statement(sql, &datafusion::config::Dialect::Generic)
            .expect("parses")
    }

    #[test]
    fn refuses_everything_but_queries() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "DELETE FROM t",
            "UPDATE t SET a = 1",
            "CREATE TABLE t (a INT)",
            "DROP TABLE t",
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/tmp/x'",
            "COPY (SELECT 1) TO '/tmp/x.parquet'",
            "EXPLAIN INSERT INTO t VALUES (1)",
            "SET datafusion.execution.batch_size = 1",
        ] {
            let err = refuse_writes(&parse(sql), sql).expect_err(sql);
            assert!(matches!(err, Error::PermissionDenied(_)), "{sql}: {err}");
        }
        for sql in [
            "SELECT 1",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
        ] {
            refuse_writes(&parse(sql), sql).expect(sql);
        }
    }

    #[test]
    fn numbers_question_marks_in_order() {
        let mut statement = parse("SELECT a FROM t WHERE a > ? AND b = ? AND c = $1");
        number_placeholders(&mut statement);
        let text = statement.to_string();
        assert!(text.contains("a > $1 AND b = $2 AND c = $1"), "{text}");
    }

    #[test]
    fn statements_round_trip_with_parameters() -> Result<()> {
        let batch = RecordBatch::try_from_iter([(
            "$1",
            Arc::new(arrow::array::Int64Array::from(vec![7])) as arrow::array::ArrayRef,
        )])
        .map_err(|e| Error::Internal(e.to_string()))?;
        let statement = Statement {
            sql: "SELECT $1".into(),
            parameters: Some(batch),
            versions: [("t".to_string(), "u".to_string())].into(),
            partition: 1,
            partition_count: 2,
            flight: 7,
            target_partitions: 5,
        };
        assert_eq!(Statement::decode(&statement.encode()?)?, statement);
        assert!(Statement::decode(b"\xff\x01").is_err());
        Ok(())
    }
}
