//! The Flight SQL edge, served on the same port as plain Flight (docs/PROTOCOL.md section 7).
//! The Flight handler routes every message whose command, ticket or action is Flight SQL's here.
//!
//! Statements and prepared statements are planned by DataFusion over the same providers as Flight
//! commands ([`crate::query::Statement`]); the server keeps no state per statement or session, so a
//! handle or ticket stays valid across restarts.
//!
//! The file is long because `FlightSqlService` is one trait of some thirty methods, most a few
//! lines; the fixed metadata tables are in [`metadata`].

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::sql::metadata::{SqlInfoData, XdbcTypeInfoData};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionCancelQueryRequest, ActionCancelQueryResult, ActionClosePreparedStatementRequest,
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, Any,
    CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys,
    CommandGetImportedKeys, CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandStatementQuery,
    ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, IpcMessage, SchemaAsIpc, Ticket};
use bytes::Bytes;
use futures::{StreamExt, stream};
use prost::Message;
use tonic::{Request, Response, Status};

mod metadata;

use metadata::{foreign_keys_schema, primary_keys_schema, sql_info, type_info};

use super::cancel::Cancels;
use super::fleet::{self, Fleet};
use super::plans::Plans;
use super::stream::{FlightStream, batches_to_flight, stream_partition};
use crate::error::{Error, Result};
use crate::query::{
    CATALOG, Distribution, Planner, SCHEMA, SqlPlan, SqlPlanner, Statement, TABLE_TYPE,
};

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

/// The caller's `authorization` header, which a distributed statement's tasks carry to the
/// fleet's other servers.
fn authorization(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The Flight SQL message in `bytes`, if they hold one.
pub(super) fn sql_message(bytes: &[u8]) -> Option<Any> {
    Any::decode(bytes)
        .ok()
        .filter(|any| any.type_url.starts_with(TYPE_URL_PREFIX))
}

/// Answers Flight SQL; one per server, cheap to clone.
#[derive(Clone)]
pub(super) struct SqlService {
    sql: SqlPlanner,
    cancels: Arc<Cancels>,
    plans: Arc<Plans>,
    info: Arc<SqlInfoData>,
    types: Arc<XdbcTypeInfoData>,
    /// The fleet, for the locations of independent partitions' endpoints.
    fleet: Option<Arc<Fleet>>,
}

impl SqlService {
    pub(super) fn new(planner: Planner, cancels: Arc<Cancels>, plans: Arc<Plans>) -> Result<Self> {
        Ok(Self {
            sql: SqlPlanner::new(planner),
            cancels,
            plans,
            info: Arc::new(sql_info()?),
            types: Arc::new(type_info()?),
            fleet: None,
        })
    }

    fn planner(&self) -> &Planner {
        self.sql.planner()
    }

    /// In a fleet of several live servers, statements that exchange data run their stages on
    /// all of them, and the endpoints of independent partitions name the server for their data.
    pub(super) fn with_fleet(mut self, fleet: Arc<Fleet>, scan_bytes_per_task: usize) -> Self {
        self.sql = self.sql.with_distribution(Distribution {
            workers: Arc::clone(&fleet) as _,
            scan_bytes_per_task,
        });
        self.fleet = Some(fleet);
        self
    }

    /// A statement's flight: one endpoint per independent partition, each ticket the statement
    /// with its partition and the versions it resolved.
    async fn statement_info(
        &self,
        statement: Statement,
        request: Request<FlightDescriptor>,
    ) -> Result<FlightInfo> {
        let authorization = authorization(request.metadata());
        let descriptor = request.into_inner();
        let SqlPlan { planned, versions } = self
            .sql
            .plan_as(&statement, authorization.as_deref())
            .await?;
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
        // Independent partitions are shards of the tables read: the fleet spreads them as it
        // spreads a flight's. One endpoint stays with the server asked, which coordinates it.
        let uids: Vec<String> = versions.values().cloned().collect();
        let endpoints = tickets
            .iter()
            .enumerate()
            .map(|(partition, t)| {
                let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(t.clone()));
                if partition_count < 2 {
                    return endpoint;
                }
                let shard = fleet::shard_key(&uids, &[], partition, partition_count);
                fleet::locate(self.fleet.as_deref(), endpoint, &shard)
            })
            .collect();
        let (records, bytes) = planned.totals();
        let info = FlightInfo::new()
            .try_with_schema(&planned.schema())
            .map_err(|e| Error::internal_from("cannot encode schema", e))?
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
        self.sql.plan(&statement).await?;
        Ok(statement.encode()?.into())
    }

    /// The result schema of a Flight SQL command, for GetSchema.
    pub(super) async fn schema(&self, any: Any) -> Result<SchemaRef> {
        use arrow_flight::sql::Command;
        let command = Command::try_from(any)
            .map_err(|e| Error::invalid(format!("malformed Flight SQL command: {e}")))?;
        Ok(match command {
            Command::CommandStatementQuery(q) => self.sql.prepare(&q.query).await?.0,
            Command::CommandPreparedStatementQuery(q) => {
                let statement = Statement::decode(&q.prepared_statement_handle)?;
                self.sql.plan(&statement).await?.planned.schema()
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
            return builder
                .build()
                .map_err(|e| Error::internal_from("GetTables", e));
        }
        let tables = self.sql.tables().await?;
        let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
        let keep = matches_pattern(pattern.as_deref(), &names)?;
        let wanted = tables
            .into_iter()
            .zip(keep)
            .filter(|(_, k)| *k)
            .map(|(t, _)| t);
        let sql = self.sql.clone();
        let mut schemas = stream::iter(wanted)
            .map(|table| {
                let sql = sql.clone();
                async move {
                    if !include_schema {
                        return (table, Arc::new(Schema::empty()));
                    }
                    let ctx = sql.planner().session();
                    let schema = match sql.open_table(&ctx, &table).await {
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
                .map_err(|e| Error::internal_from("GetTables", e))?;
        }
        builder
            .build()
            .map_err(|e| Error::internal_from("GetTables", e))
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
            .statement_info(Statement::new(query.query), request)
            .await?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let statement = Statement::decode(&query.prepared_statement_handle)?;
        let info = self.statement_info(statement, request).await?;
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
        request: Request<Ticket>,
    ) -> Result<DoGetResponse, Status> {
        let statement = Statement::decode(&ticket.statement_handle)?;
        let sql = self.sql.with_partitions(statement.target_partitions);
        let authorization = authorization(request.metadata());
        let SqlPlan { planned, .. } = sql.plan_as(&statement, authorization.as_deref()).await?;
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
        let (dataset, parameters) = self.sql.prepare(&query.query).await?;
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
