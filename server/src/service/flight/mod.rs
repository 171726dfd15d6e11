//! The Arrow Flight service, and the router that sends Flight SQL messages to [`SqlService`].

use std::sync::Arc;

use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use prost::Message;
use serde_json::json;
use tonic::{Request, Response, Status, Streaming};

mod put;

use put::PutBody;

use super::actions;
use super::auth::{Authenticator, Gate, Identity};
use super::cancel::Cancels;
use super::fleet::{self, Fleet};
use super::limits::{Governor, Limits};
use super::plans::Plans;
use super::sql::{self, SqlService, sql_message};
use super::stream::{FlightStream, stream_partition};
use crate::catalog::Role;
use crate::catalog::{Entry, RecordFilter};
use crate::error::{Error, Result};
use crate::formats::{self, ReadRequest};
use crate::query::{Command, Planned, Planner, Resolved, TicketSpec};
use crate::registry::Registry;

/// The Flight service: one per server, cheap to clone.
#[derive(Clone)]
pub struct FlightHandler {
    /// Registration, uploads and deletion (DoPut, actions).
    registry: Registry,
    /// Planning and reading (GetFlightInfo, DoGet, ListFlights).
    planner: Planner,
    sql: SqlService,
    cancels: Arc<Cancels>,
    plans: Arc<Plans>,
    gate: Gate,
    governor: Arc<Governor>,
    /// The fleet this server belongs to, for endpoint locations (none: a server on its own).
    fleet: Option<Arc<Fleet>>,
}

impl FlightHandler {
    /// A handler over `registry`; with `auth`, every call but the Handshake needs a token.
    pub fn new(registry: Registry, auth: bool, limits: Limits) -> Result<Self> {
        let cancels = Arc::new(Cancels::default());
        let plans = Arc::new(Plans::default());
        let planner = registry.planner().clone();
        let authenticator = auth.then(|| Authenticator::new(planner.catalog().clone()));
        Ok(Self {
            sql: SqlService::new(planner.clone(), Arc::clone(&cancels), Arc::clone(&plans))?,
            registry,
            planner,
            cancels,
            plans,
            gate: Gate::new(authenticator),
            governor: Arc::new(Governor::new(limits)),
            fleet: None,
        })
    }

    /// This handler, naming in each endpoint the fleet's server for its data (Flight SQL's too),
    /// and running the stages of SQL that exchanges data on the fleet's servers,
    /// `scan_bytes_per_task` of files per scan task.
    pub fn with_fleet(mut self, fleet: Arc<Fleet>, scan_bytes_per_task: usize) -> Self {
        self.sql = self.sql.with_fleet(Arc::clone(&fleet), scan_bytes_per_task);
        self.fleet = Some(fleet);
        self
    }

    /// The worker service that runs other servers' SQL stages, when this server is in a fleet.
    pub(super) fn worker(&self) -> Option<datafusion_distributed::Worker> {
        let fleet = Arc::clone(self.fleet.as_ref()?);
        Some(super::worker::worker(&self.planner, fleet))
    }

    pub(super) fn planner(&self) -> &Planner {
        &self.planner
    }

    pub(super) fn governor(&self) -> Arc<Governor> {
        Arc::clone(&self.governor)
    }

    pub(super) fn gate(&self) -> Gate {
        self.gate.clone()
    }

    /// Checks the caller's credentials for a call that needs `role`.
    async fn allow<T>(&self, request: &Request<T>, role: Role, what: &str) -> Result<()> {
        let verified = request.extensions().get::<Identity>();
        self.gate
            .authorize(request.metadata(), verified, role, what)
            .await
    }

    /// The Flight SQL command in a descriptor, if it holds one.
    fn sql_command(descriptor: &FlightDescriptor) -> Option<arrow_flight::sql::Any> {
        match DescriptorType::try_from(descriptor.r#type) {
            Ok(DescriptorType::Cmd) => sql_message(&descriptor.cmd),
            _ => None,
        }
    }

    fn command(descriptor: &FlightDescriptor) -> Result<Command> {
        match DescriptorType::try_from(descriptor.r#type) {
            Ok(DescriptorType::Path) => Command::from_path(&descriptor.path),
            Ok(DescriptorType::Cmd) => Command::from_json(&descriptor.cmd),
            _ => Err(Error::invalid(
                "unknown descriptor type: expected PATH or CMD",
            )),
        }
    }

    async fn plan(&self, descriptor: &FlightDescriptor) -> Result<(Command, Resolved, Planned)> {
        let command = Self::command(descriptor)?;
        let planner = &self.planner;
        let resolved = planner.resolve(&command).await?;
        let planned = planner.plan(&command, &resolved.sources).await?;
        Ok((command, resolved, planned))
    }

    /// The structure of a single artifact with one (AnnData: shape and element names), for the
    /// flight's metadata. `uns` stays in `describe`: it can be large.
    async fn structure(&self, resolved: &Resolved) -> Option<serde_json::Value> {
        let [record] = resolved.sources.as_slice() else {
            return None;
        };
        // Asking only formats with a structure saves opening parquet listings.
        if !formats::format_of(&record.suffix).has_structure() {
            return None;
        }
        self.planner.describe(record, false).await.ok().flatten()
    }

    fn flight_info(
        &self,
        descriptor: FlightDescriptor,
        command: &Command,
        resolved: &Resolved,
        planned: Planned,
        structure: Option<serde_json::Value>,
    ) -> Result<FlightInfo> {
        let uids: Vec<String> = resolved.sources.iter().map(|s| s.uid.clone()).collect();
        let partition_count = planned.endpoint_count();
        let target_partitions = self.planner.target_partitions();
        let flight = rand::random::<u64>();
        let tickets: Vec<bytes::Bytes> = (0..partition_count)
            .map(|partition| {
                let ticket = TicketSpec {
                    command: command.clone(),
                    uids: uids.clone(),
                    partition,
                    partition_count,
                    flight,
                    target_partitions,
                };
                ticket.encode().into()
            })
            .collect();
        let endpoints = tickets.iter().enumerate().map(|(partition, t)| {
            let endpoint = arrow_flight::FlightEndpoint::new().with_ticket(Ticket::new(t.clone()));
            let shard = fleet::shard_key(&uids, &command.element, partition, partition_count);
            fleet::locate(self.fleet.as_deref(), endpoint, &shard)
        });
        let (records, bytes) = planned.totals();
        let mut metadata = match &resolved.entry {
            Some(entry) => entry.to_json(),
            None => json!({
                "kind": "query",
                "query": command.query,
                "members": resolved.sources.iter().map(|s| Entry::Artifact(s.clone()).to_json()).collect::<Vec<_>>(),
            }),
        };
        if let (Some(map), Some(serde_json::Value::Object(structure))) =
            (metadata.as_object_mut(), structure)
        {
            for (k, v) in structure {
                map.entry(k).or_insert(v);
            }
        }
        let info = FlightInfo::new()
            .try_with_schema(&planned.schema())
            .map_err(|e| Error::internal_from("cannot encode schema", e))?
            .with_descriptor(descriptor)
            .with_endpoints(endpoints.collect())
            .with_total_records(records)
            .with_total_bytes(bytes)
            .with_ordered(true)
            .with_app_metadata(metadata.to_string());
        self.plans.offer(Arc::new(planned), tickets);
        Ok(info)
    }

    /// A listing entry: schema and counts where they come cheaply, the record as metadata.
    async fn list_entry(&self, entry: Entry) -> FlightInfo {
        let planner = &self.planner;
        let info = FlightInfo::new()
            .with_descriptor(FlightDescriptor::new_path(vec![entry.key().to_string()]))
            .with_total_bytes(-1)
            .with_ordered(true)
            // Straight to bytes: no intermediate JSON value per entry.
            .with_app_metadata(serde_json::to_vec(&entry).unwrap_or_default());
        // An artifact's recorded schema is already in FlightInfo's encoding: sent as it is.
        if let Entry::Artifact(a) = &entry
            && let Some(schema) = &a.arrow_schema
        {
            let rows = a.n_observations.and_then(|r| i64::try_from(r).ok());
            return FlightInfo {
                schema: schema.clone().into(),
                ..info.with_total_records(rows.unwrap_or(-1))
            };
        }
        let (sources, rows) = match &entry {
            Entry::Artifact(a) => (Ok(vec![a.clone()]), a.n_observations),
            Entry::Collection(c) => (planner.catalog().artifacts(c.members.clone()).await, None),
        };
        // Schemas recorded at registration answer without opening anything.
        let recorded = sources.as_ref().ok().and_then(|sources| {
            let schemas = sources
                .iter()
                .map(|s| s.schema().map(|schema| (s.key.clone(), schema)))
                .collect::<Option<Vec<_>>>()?;
            crate::query::unify_schemas(&schemas).ok()
        });
        let schema = match (recorded, sources) {
            (Some(schema), _) => schema,
            // A session costs its function registry: made only when something must be opened.
            (None, Ok(sources)) => {
                let ctx = planner.session();
                // One entry that cannot be opened, or opens slowly, never holds the listing up.
                let opened = tokio::time::timeout(
                    LIST_ENTRY_TIMEOUT,
                    planner.union(&ctx, &sources, &ReadRequest::default()),
                )
                .await;
                match opened {
                    Ok(Ok(opened)) => opened.table.schema(),
                    Ok(Err(e)) => {
                        tracing::warn!(key = entry.key(), error = %e, "cannot open for listing");
                        std::sync::Arc::new(Schema::empty())
                    }
                    Err(_) => {
                        tracing::warn!(key = entry.key(), "opening for listing timed out");
                        std::sync::Arc::new(Schema::empty())
                    }
                }
            }
            (None, Err(_)) => std::sync::Arc::new(Schema::empty()),
        };
        let info = info.with_total_records(rows.and_then(|r| i64::try_from(r).ok()).unwrap_or(-1));
        info.clone().try_with_schema(&schema).unwrap_or(info)
    }
}

/// How long ListFlights spends opening one entry whose schema was not recorded.
const LIST_ENTRY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn one<T: Send + 'static>(item: T) -> FlightStream<T> {
    stream::once(async { Ok(item) }).boxed()
}

#[tonic::async_trait]
impl FlightService for FlightHandler {
    type HandshakeStream = FlightStream<HandshakeResponse>;
    type ListFlightsStream = FlightStream<FlightInfo>;
    type DoGetStream = FlightStream<FlightData>;
    type DoPutStream = FlightStream<PutResult>;
    type DoActionStream = FlightStream<arrow_flight::Result>;
    type ListActionsStream = FlightStream<ActionType>;
    type DoExchangeStream = FlightStream<FlightData>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let metadata = request.metadata().clone();
        let mut input = request.into_inner();
        // One request message at most is read: the legacy payload credentials, if any.
        let payload = match self.governor.deadline(input.message()).await? {
            Some(first) => first.payload,
            None => bytes::Bytes::new(),
        };
        // Without auth there is nothing to negotiate; answer so that clients that always
        // handshake can go on.
        let token = self.gate.handshake(&metadata, &payload).await?;
        let answer = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().map(bytes::Bytes::from).unwrap_or_default(),
        };
        let mut response = Response::new(one(answer));
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::internal("token is not a valid header value"))?;
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        self.allow(&request, Role::Read, "ListFlights").await?;
        let filter = RecordFilter::from_json_bytes(&request.get_ref().expression)?;
        let catalog = self.planner.catalog();
        let entries = self.governor.deadline(catalog.list(filter)).await?;
        let this = self.clone();
        let infos: BoxStream<'static, Result<FlightInfo, Status>> = stream::iter(entries)
            .then(move |entry| {
                let this = this.clone();
                async move { Ok(this.list_entry(entry).await) }
            })
            .boxed();
        Ok(Response::new(infos))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.allow(&request, Role::Read, "GetFlightInfo").await?;
        if Self::sql_command(request.get_ref()).is_some() {
            return self
                .governor
                .deadline(self.sql.get_flight_info(request))
                .await;
        }
        let descriptor = request.into_inner();
        let info = self
            .governor
            .deadline(async {
                let (command, resolved, planned) = self.plan(&descriptor).await?;
                let structure = self.structure(&resolved).await;
                self.flight_info(descriptor.clone(), &command, &resolved, planned, structure)
            })
            .await?;
        Ok(Response::new(info))
    }

    async fn poll_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        self.allow(&request, Role::Read, "PollFlightInfo").await?;
        Err(Status::unimplemented(
            "PollFlightInfo: use GetFlightInfo, which answers at once",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        self.allow(&request, Role::Read, "GetSchema").await?;
        let schema = self
            .governor
            .deadline(async {
                match Self::sql_command(request.get_ref()) {
                    Some(command) => self.sql.schema(command).await,
                    None => Ok(self.plan(request.get_ref()).await?.2.schema()),
                }
            })
            .await?;
        let result: SchemaResult = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?;
        Ok(Response::new(result))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        self.allow(&request, Role::Read, "DoGet").await?;
        // The permit is taken before planning, so that waiting calls cost nothing but a queue slot.
        let permit = self.governor.admit().await?;
        let ticket = request.get_ref().ticket.clone();
        let stream = self
            .governor
            .deadline(async {
                if let Some((planned, partition)) = self.plans.take(&ticket) {
                    return Ok(stream_partition(&planned, partition)?);
                }
                if sql_message(&ticket).is_some() {
                    return Ok(self.sql.do_get(request).await?.into_inner());
                }
                let spec = TicketSpec::decode(&ticket)?;
                let planner = self.planner.with_partitions(spec.target_partitions);
                let sources = planner.sources(spec.uids.clone()).await?;
                let planned = planner.plan(&spec.command, &sources).await?;
                if planned.endpoint_count() != spec.partition_count {
                    return Err(Error::Stale(
                        "the data changed since this ticket was issued; ask GetFlightInfo for new tickets"
                            .into(),
                    )
                    .into());
                }
                Ok::<_, Status>(stream_partition(&planned, spec.partition)?)
            })
            .await?;
        let tracked = self.cancels.track(ticket, stream)?;
        Ok(Response::new(self.governor.guard(tracked, permit)))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let app_metadata = match self.put(request).await? {
            PutBody::Json(record) => record.to_string().into(),
            PutBody::Bytes(bytes) => bytes,
        };
        Ok(Response::new(one(PutResult { app_metadata })))
    }

    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        self.allow(&request, Role::Read, "DoExchange").await?;
        Err(Status::unimplemented("DoExchange is not supported"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let kind = request.get_ref().r#type.as_str();
        let role = if actions::WRITES.contains(&kind) {
            Role::Write
        } else {
            Role::Read
        };
        self.allow(&request, role, &format!("the '{kind}' action"))
            .await?;
        if sql::ACTIONS.contains(&kind) {
            return self.governor.deadline(self.sql.do_action(request)).await;
        }
        let action = request.into_inner();
        let body: bytes::Bytes = match action.r#type.as_str() {
            "CancelFlightInfo" => self.sql.cancel_flight_info(&action.body)?,
            // CLOSED: there is no session state to drop.
            "CloseSession" => artiflight_proto::CloseSessionResult { status: 1 }
                .encode_to_vec()
                .into(),
            // An empty SetSessionOptionsResult (no option refused) or GetSessionOptionsResult.
            "SetSessionOptions" | "GetSessionOptions" => bytes::Bytes::new(),
            kind => self
                .governor
                .deadline(actions::run(
                    &self.registry,
                    kind,
                    &action.body,
                    actions::Caller::Client,
                ))
                .await?
                .to_string()
                .into(),
        };
        Ok(Response::new(one(arrow_flight::Result { body })))
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        self.allow(&request, Role::Read, "ListActions").await?;
        let ours =
            actions::ACTIONS
                .iter()
                .chain(actions::FLIGHT_ACTIONS)
                .map(|(name, description)| {
                    Ok(ActionType {
                        r#type: name.to_string(),
                        description: description.to_string(),
                    })
                });
        let sql = self.sql.list_actions(request).await?.into_inner();
        Ok(Response::new(stream::iter(ours).chain(sql).boxed()))
    }
}
