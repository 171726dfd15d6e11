//! The Flight SQL edge, served on the same port as plain Flight (SPEC section 7). The Flight
//! handler routes every message whose command, ticket or action is Flight SQL's here.
//!
//! Statements and prepared statements are planned by DataFusion over the same providers as Flight
//! commands ([`crate::query::Statement`]); the server keeps no state per statement or session, so a
//! handle or ticket stays valid across restarts.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionCancelQueryRequest, ActionCancelQueryResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
    CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys,
    CommandGetImportedKeys, CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandStatementQuery,
    Nullable, ProstMessageExt, Searchable, SqlInfo, SqlNullOrdering, SqlOuterJoinsSupportLevel,
    SqlSupportedCaseSensitivity, SqlSupportedTransaction, TicketStatementQuery, XdbcDataType,
};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket};
use bytes::Bytes;
use futures::{StreamExt, stream};
use prost::Message;
use tonic::{Request, Response, Status};

use super::cancel::Cancels;
use super::plans::Plans;
use super::stream::{FlightStream, batches_to_flight, stream_partition};
use crate::error::{Error, Result};
use crate::query::{CATALOG, Planner, SCHEMA, SqlPlan, Statement, TABLE_TYPE};
use crate::registry::Registry;

/// Flight SQL's type URLs share this prefix; plain Flight commands are JSON and never match.
const TYPE_URL_PREFIX: &str = "type.googleapis.com/arrow.flight.protocol.sql.";

/// Flight SQL's action types.
pub(super) const ACTIONS: [&str; 8] = [
    "CreatePreparedStatement",
    "ClosePreparedStatement",
    "CreatePreparedSubstraitPlan",
    "BeginTransaction",
    "EndTransaction",
    "BeginSavepoint",
    "EndSavepoint",
    "CancelQuery",
];

/// The Flight SQL message in `bytes`, if they hold one.
pub(super) fn sql_message(bytes: &[u8]) -> Option<Any> {
    Any::decode(bytes)
        .ok()
        .filter(|any| any.type_url.starts_with(TYPE_URL_PREFIX))
}

/// Answers Flight SQL; one per server, cheap to clone.
#[derive(Clone)]
pub(super) struct SqlService {
    registry: Registry,
    cancels: Arc<Cancels>,
    plans: Arc<Plans>,
    info: Arc<SqlInfoData>,
    types: Arc<XdbcTypeInfoData>,
}

impl SqlService {
    pub(super) fn new(
        registry: Registry,
        cancels: Arc<Cancels>,
        plans: Arc<Plans>,
    ) -> Result<Self> {
        Ok(Self {
            registry,
            cancels,
            plans,
            info: Arc::new(sql_info()?),
            types: Arc::new(type_info()?),
        })
    }

    fn planner(&self) -> &Planner {
        self.registry.planner()
    }

    /// A statement's flight: one endpoint per independent partition, each ticket the statement
    /// with its partition and the versions it resolved.
    async fn statement_info(
        &self,
        statement: Statement,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo> {
        let SqlPlan { planned, versions } = self.planner().sql_plan(&statement).await?;
        let partition_count = planned.endpoint_count();
        let flight = rand::random::<u64>();
        let tickets = (0..partition_count)
            .map(|partition| {
                let ticket = Statement {
                    versions: versions.clone(),
                    partition,
                    partition_count,
                    flight,
                    target_partitions: self.planner().target_partitions(),
                    ..statement.clone()
                };
                let ticket = TicketStatementQuery {
                    statement_handle: ticket.encode()?.into(),
                };
                Ok(Bytes::from(ticket.as_any().encode_to_vec()))
            })
            .collect::<Result<Vec<_>>>()?;
        let endpoints = tickets
            .iter()
            .map(|t| FlightEndpoint::new().with_ticket(Ticket::new(t.clone())))
            .collect();
        let (records, bytes) = planned.totals();
        let info = FlightInfo::new()
            .try_with_schema(&planned.schema())
            .map_err(|e| Error::Internal(format!("cannot encode schema: {e}")))?
            .with_descriptor(descriptor)
            .with_endpoints(endpoints)
            .with_total_records(records)
            .with_total_bytes(bytes);
        self.plans.offer(Arc::new(planned), tickets);
        Ok(info)
    }

    /// Binds a batch of parameters to a prepared statement: the new handle carries them.
    pub(super) async fn bind(&self, handle: &[u8], batches: Vec<RecordBatch>) -> Result<Bytes> {
        let mut statement = Statement::decode(handle)?;
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => return Err(Error::invalid("no parameters were sent to bind")),
        };
        let parameters = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| Error::invalid(format!("parameters: {e}")))?;
        if parameters.num_rows() != 1 {
            return Err(Error::invalid(format!(
                "bind one row of parameters per execution, got {}",
                parameters.num_rows()
            )));
        }
        statement.parameters = Some(parameters);
        // Planning now reports a wrong count or type at bind time, not at execution.
        self.planner().sql_plan(&statement).await?;
        Ok(statement.encode()?.into())
    }

    /// The result schema of a Flight SQL command, for GetSchema.
    pub(super) async fn schema(&self, any: Any) -> Result<SchemaRef> {
        use arrow_flight::sql::Command;
        let command = Command::try_from(any)
            .map_err(|e| Error::invalid(format!("malformed Flight SQL command: {e}")))?;
        Ok(match command {
            Command::CommandStatementQuery(q) => self.planner().sql_prepare(&q.query).await?.0,
            Command::CommandPreparedStatementQuery(q) => {
                let statement = Statement::decode(&q.prepared_statement_handle)?;
                self.planner().sql_plan(&statement).await?.planned.schema()
            }
            Command::CommandGetCatalogs(c) => c.into_builder().schema(),
            Command::CommandGetDbSchemas(c) => c.into_builder().schema(),
            Command::CommandGetTables(c) => c.into_builder().schema(),
            Command::CommandGetTableTypes(c) => c.into_builder().schema(),
            Command::CommandGetSqlInfo(_) => self.info.schema(),
            Command::CommandGetXdbcTypeInfo(_) => self.types.schema(),
            Command::CommandGetPrimaryKeys(_) => primary_keys_schema(),
            Command::CommandGetExportedKeys(_)
            | Command::CommandGetImportedKeys(_)
            | Command::CommandGetCrossReference(_) => foreign_keys_schema(),
            other => {
                return Err(Error::invalid(format!(
                    "GetSchema does not apply to {}",
                    other.type_url()
                )));
            }
        })
    }

    /// GetTables: tables are matched by name before any is opened for its schema.
    async fn tables(&self, query: CommandGetTables) -> Result<RecordBatch> {
        let include_schema = query.include_schema;
        let catalog_ok = query.catalog.as_deref().is_none_or(|c| c == CATALOG);
        let schema_ok = matches_pattern(query.db_schema_filter_pattern.as_deref(), &[SCHEMA])?
            .first()
            .copied()
            .unwrap_or(false);
        let type_ok =
            query.table_types.is_empty() || query.table_types.iter().any(|t| t == TABLE_TYPE);
        let pattern = query.table_name_filter_pattern.clone();
        let mut builder = query.into_builder();
        if !(catalog_ok && schema_ok && type_ok) {
            return builder.build().map_err(|e| Error::Internal(e.to_string()));
        }
        let tables = self.planner().sql_tables().await?;
        let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
        let keep = matches_pattern(pattern.as_deref(), &names)?;
        let wanted = tables
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(t, _)| t);
        let planner = self.planner().clone();
        let mut schemas = stream::iter(wanted)
            .map(|table| {
                let planner = planner.clone();
                async move {
                    if !include_schema {
                        return (table, Arc::new(Schema::empty()));
                    }
                    let ctx = planner.session();
                    let schema = match planner.open_sql_table(&ctx, &table).await {
                        Ok(provider) => provider.schema(),
                        Err(e) => {
                            // One unreadable artifact must not hide every other table.
                            tracing::warn!(table = %table.name, error = %e, "cannot open for GetTables");
                            Arc::new(Schema::empty())
                        }
                    };
                    (table, schema)
                }
            })
            .buffered(4);
        while let Some((table, schema)) = schemas.next().await {
            builder
                .append(CATALOG, SCHEMA, &table.name, TABLE_TYPE, &schema)
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        builder.build().map_err(|e| Error::Internal(e.to_string()))
    }

    fn cancel(&self, info: &FlightInfo) -> i32 {
        let tickets = info
            .endpoint
            .iter()
            .filter_map(|e| e.ticket.as_ref().map(|t| t.ticket.clone()));
        self.cancels.cancel(tickets);
        // CANCEL_STATUS_CANCELLED: running streams end now and the tickets are refused from now on.
        1
    }

    /// Handles the `CancelFlightInfo` action's body.
    pub(super) fn cancel_flight_info(&self, body: &[u8]) -> Result<Bytes> {
        let request = arrow_flight::CancelFlightInfoRequest::decode(body)
            .map_err(|e| Error::invalid(format!("malformed CancelFlightInfoRequest: {e}")))?;
        let info = request
            .info
            .ok_or_else(|| Error::invalid("CancelFlightInfoRequest carries no FlightInfo"))?;
        let status = self.cancel(&info);
        Ok(arrow_flight::CancelFlightInfoResult { status }
            .encode_to_vec()
            .into())
    }
}

/// Which of `names` match a SQL LIKE `pattern` (`%`, `_`); no pattern matches all.
fn matches_pattern(pattern: Option<&str>, names: &[&str]) -> Result<Vec<bool>> {
    let Some(pattern) = pattern else {
        return Ok(vec![true; names.len()]);
    };
    let names = StringArray::from(names.to_vec());
    let pattern = StringArray::new_scalar(pattern);
    let matched = arrow::compute::kernels::comparison::like(&names, &pattern)
        .map_err(|e| Error::invalid(format!("invalid name pattern: {e}")))?;
    Ok(matched.iter().map(|m| m.unwrap_or(false)).collect())
}

fn primary_keys_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ]))
}

fn foreign_keys_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pk_catalog_name", DataType::Utf8, true),
        Field::new("pk_db_schema_name", DataType::Utf8, true),
        Field::new("pk_table_name", DataType::Utf8, false),
        Field::new("pk_column_name", DataType::Utf8, false),
        Field::new("fk_catalog_name", DataType::Utf8, true),
        Field::new("fk_db_schema_name", DataType::Utf8, true),
        Field::new("fk_table_name", DataType::Utf8, false),
        Field::new("fk_column_name", DataType::Utf8, false),
        Field::new("key_sequence", DataType::Int32, false),
        Field::new("fk_key_name", DataType::Utf8, true),
        Field::new("pk_key_name", DataType::Utf8, true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ]))
}

/// What GetSqlInfo answers: the facts ADBC, JDBC and DBeaver ask for.
fn sql_info() -> Result<SqlInfoData> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "artiflight");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, ARROW_VERSION);
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(
        SqlInfo::FlightSqlServerTransaction,
        SqlSupportedTransaction::None as i32,
    );
    b.append(SqlInfo::FlightSqlServerCancel, true);
    b.append(SqlInfo::FlightSqlServerBulkIngestion, false);
    b.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
    b.append(SqlInfo::FlightSqlServerTransactionTimeout, 0i32);
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.append(
        SqlInfo::SqlIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityLowercase as i32,
    );
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(
        SqlInfo::SqlQuotedIdentifierCase,
        SqlSupportedCaseSensitivity::SqlCaseSensitivityUnknown as i32,
    );
    b.append(SqlInfo::SqlAllTablesAreSelectable, true);
    b.append(
        SqlInfo::SqlNullOrdering,
        SqlNullOrdering::SqlNullsSortedHigh as i32,
    );
    b.append(SqlInfo::SqlKeywords, KEYWORDS);
    b.append(SqlInfo::SqlNumericFunctions, NUMERIC_FUNCTIONS);
    b.append(SqlInfo::SqlStringFunctions, STRING_FUNCTIONS);
    b.append(SqlInfo::SqlDatetimeFunctions, DATETIME_FUNCTIONS);
    b.append(SqlInfo::SqlSearchStringEscape, "\\");
    b.append(SqlInfo::SqlExtraNameCharacters, "");
    b.append(SqlInfo::SqlSupportsColumnAliasing, true);
    b.append(SqlInfo::SqlNullPlusNullIsNull, true);
    b.append(SqlInfo::SqlSupportsTableCorrelationNames, true);
    b.append(SqlInfo::SqlSupportsDifferentTableCorrelationNames, false);
    b.append(SqlInfo::SqlSupportsExpressionsInOrderBy, true);
    b.append(SqlInfo::SqlSupportsOrderByUnrelated, true);
    // Bitmasks: GROUP BY unrelated and beyond select; minimum and core grammar; subqueries in
    // comparisons, EXISTS, IN and quantifieds; UNION and UNION ALL.
    b.append(SqlInfo::SqlSupportedGroupBy, 0b11i32);
    b.append(SqlInfo::SqlSupportsLikeEscapeClause, true);
    b.append(SqlInfo::SqlSupportsNonNullableColumns, true);
    b.append(SqlInfo::SqlSupportedGrammar, 0b11i32);
    b.append(
        SqlInfo::SqlOuterJoinsSupportLevel,
        SqlOuterJoinsSupportLevel::SqlFullOuterJoins as i32,
    );
    b.append(SqlInfo::SqlSchemaTerm, "schema");
    b.append(SqlInfo::SqlProcedureTerm, "procedure");
    b.append(SqlInfo::SqlCatalogTerm, "catalog");
    b.append(SqlInfo::SqlCatalogAtStart, true);
    b.append(SqlInfo::SqlSelectForUpdateSupported, false);
    b.append(SqlInfo::SqlStoredProceduresSupported, false);
    b.append(SqlInfo::SqlSupportedSubqueries, 0b1111i32);
    b.append(SqlInfo::SqlCorrelatedSubqueriesSupported, true);
    b.append(SqlInfo::SqlSupportedUnions, 0b11i32);
    b.append(SqlInfo::SqlTransactionsSupported, false);
    b.append(SqlInfo::SqlBatchUpdatesSupported, false);
    b.append(SqlInfo::SqlSavepointsSupported, false);
    b.append(SqlInfo::SqlNamedParametersSupported, false);
    b.append(SqlInfo::SqlLocatorsUpdateCopy, false);
    b.append(SqlInfo::SqlStoredFunctionsUsingCallSyntaxSupported, false);
    b.build()
        .map_err(|e| Error::Internal(format!("SqlInfo: {e}")))
}

/// The arrow line this build links (kept with the workspace's arrow version).
const ARROW_VERSION: &str = "59.3";

const KEYWORDS: &[&str] = &[
    "ANALYZE",
    "ARRAY",
    "ASC",
    "DESC",
    "DISTINCT",
    "EXCEPT",
    "EXPLAIN",
    "FILTER",
    "FOLLOWING",
    "ILIKE",
    "INTERSECT",
    "INTERVAL",
    "LIMIT",
    "NULLS",
    "OFFSET",
    "OVER",
    "PARTITION",
    "PRECEDING",
    "QUALIFY",
    "RANGE",
    "ROWS",
    "SHOW",
    "STRUCT",
    "UNBOUNDED",
    "UNNEST",
    "WINDOW",
];
const NUMERIC_FUNCTIONS: &[&str] = &[
    "abs", "acos", "asin", "atan", "atan2", "cbrt", "ceil", "cos", "degrees", "exp", "floor", "ln",
    "log", "log10", "log2", "pi", "power", "radians", "random", "round", "signum", "sin", "sqrt",
    "tan", "trunc",
];
const STRING_FUNCTIONS: &[&str] = &[
    "ascii",
    "btrim",
    "char_length",
    "concat",
    "concat_ws",
    "initcap",
    "left",
    "length",
    "lower",
    "lpad",
    "ltrim",
    "md5",
    "regexp_like",
    "regexp_match",
    "regexp_replace",
    "repeat",
    "replace",
    "reverse",
    "right",
    "rpad",
    "rtrim",
    "split_part",
    "starts_with",
    "strpos",
    "substr",
    "to_hex",
    "translate",
    "trim",
    "upper",
];
const DATETIME_FUNCTIONS: &[&str] = &[
    "current_date",
    "current_time",
    "date_bin",
    "date_part",
    "date_trunc",
    "extract",
    "now",
    "to_timestamp",
    "to_date",
];

/// What GetXdbcTypeInfo answers: the SQL types DataFusion plans with.
fn type_info() -> Result<XdbcTypeInfoData> {
    let mut b = XdbcTypeInfoDataBuilder::new();
    let types = [
        ("BOOLEAN", XdbcDataType::XdbcBit, None, false),
        ("TINYINT", XdbcDataType::XdbcTinyint, Some(3), false),
        ("SMALLINT", XdbcDataType::XdbcSmallint, Some(5), false),
        ("INTEGER", XdbcDataType::XdbcInteger, Some(10), false),
        ("BIGINT", XdbcDataType::XdbcBigint, Some(19), false),
        ("REAL", XdbcDataType::XdbcReal, Some(24), false),
        ("DOUBLE", XdbcDataType::XdbcDouble, Some(53), false),
        ("DECIMAL", XdbcDataType::XdbcDecimal, Some(38), false),
        ("VARCHAR", XdbcDataType::XdbcVarchar, None, true),
        ("BYTEA", XdbcDataType::XdbcVarbinary, None, false),
        ("DATE", XdbcDataType::XdbcDate, None, false),
        ("TIMESTAMP", XdbcDataType::XdbcTimestamp, None, false),
    ];
    for (name, data_type, column_size, is_text) in types {
        let numeric = column_size.is_some();
        b.append(XdbcTypeInfo {
            type_name: name.to_string(),
            data_type,
            column_size,
            literal_prefix: is_text.then(|| "'".to_string()),
            literal_suffix: is_text.then(|| "'".to_string()),
            create_params: None,
            nullable: Nullable::NullabilityNullable,
            case_sensitive: is_text,
            searchable: Searchable::Full,
            unsigned_attribute: numeric.then_some(false),
            fixed_prec_scale: false,
            auto_increment: numeric.then_some(false),
            local_type_name: Some(name.to_string()),
            minimum_scale: None,
            maximum_scale: None,
            sql_data_type: data_type,
            datetime_subcode: None,
            num_prec_radix: numeric.then_some(if name == "DECIMAL" { 10 } else { 2 }),
            interval_precision: None,
        });
    }
    b.build()
        .map_err(|e| Error::Internal(format!("XdbcTypeInfo: {e}")))
}

/// A one-endpoint flight whose ticket is the metadata command itself.
fn metadata_info(
    command: impl ProstMessageExt,
    schema: &Schema,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let ticket = Ticket::new(command.as_any().encode_to_vec());
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?
        .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

fn one_batch(batch: RecordBatch) -> Response<FlightStream<arrow_flight::FlightData>> {
    let schema = batch.schema();
    Response::new(batches_to_flight(
        schema,
        stream::once(async move { Ok(batch) }).boxed(),
    ))
}

fn arrow_status(e: arrow_flight::error::FlightError) -> Status {
    Status::internal(format!("cannot build the metadata answer: {e}"))
}

type DoGetResponse =
    Response<Pin<Box<dyn futures::Stream<Item = Result<arrow_flight::FlightData, Status>> + Send>>>;

#[tonic::async_trait]
impl FlightSqlService for SqlService {
    type FlightService = SqlService;

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let info = self
            .statement_info(Statement::new(query.query), request.into_inner())
            .await?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let statement = Statement::decode(&query.prepared_statement_handle)?;
        let info = self.statement_info(statement, request.into_inner()).await?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        metadata_info(query, &self.info.schema(), request.into_inner())
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        metadata_info(query, &primary_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        metadata_info(query, &foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        metadata_info(query, &foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        metadata_info(query, &foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        metadata_info(query, &self.types.schema(), request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        let statement = Statement::decode(&ticket.statement_handle)?;
        let planner = self.planner().with_partitions(statement.target_partitions);
        let SqlPlan { planned, .. } = planner.sql_plan(&statement).await?;
        if planned.endpoint_count() != statement.partition_count {
            return Err(Error::Stale(
                "the data changed since this ticket was issued; run the query again".into(),
            )
            .into());
        }
        Ok(Response::new(stream_partition(
            &planned,
            statement.partition,
        )?))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(one_batch(builder.build().map_err(arrow_status)?))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        Ok(one_batch(builder.build().map_err(arrow_status)?))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        Ok(one_batch(self.tables(query).await?))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        let mut builder = query.into_builder();
        builder.append(TABLE_TYPE);
        Ok(one_batch(builder.build().map_err(arrow_status)?))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        let batch = query
            .into_builder(&self.info)
            .build()
            .map_err(arrow_status)?;
        Ok(one_batch(batch))
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        Ok(one_batch(RecordBatch::new_empty(primary_keys_schema())))
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        Ok(one_batch(RecordBatch::new_empty(foreign_keys_schema())))
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        Ok(one_batch(RecordBatch::new_empty(foreign_keys_schema())))
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        Ok(one_batch(RecordBatch::new_empty(foreign_keys_schema())))
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        _request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        let batch = query
            .into_builder(&self.types)
            .build()
            .map_err(arrow_status)?;
        Ok(one_batch(batch))
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let (dataset, parameters) = self.planner().sql_prepare(&query.query).await?;
        let ipc = |schema: &Schema| -> Result<Bytes, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
                .try_into()
                .map_err(|e: arrow::error::ArrowError| {
                    Status::internal(format!("cannot encode schema: {e}"))
                })?;
            Ok(bytes)
        };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: Statement::new(query.query).encode()?.into(),
            dataset_schema: ipc(&dataset)?,
            parameter_schema: ipc(&parameters)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<(), Status> {
        // Handles are self-contained: there is nothing to free.
        Ok(())
    }

    async fn do_action_cancel_query(
        &self,
        query: ActionCancelQueryRequest,
        _request: Request<arrow_flight::Action>,
    ) -> Result<ActionCancelQueryResult, Status> {
        let info = FlightInfo::decode(query.info)
            .map_err(|e| Status::invalid_argument(format!("malformed FlightInfo: {e}")))?;
        Ok(ActionCancelQueryResult {
            result: self.cancel(&info),
        })
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
