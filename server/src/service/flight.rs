//! The Arrow Flight service.

use std::pin::Pin;

use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaAsIpc, SchemaResult, Ticket,
};
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use tonic::{Request, Response, Status, Streaming};

use super::actions;
use crate::catalog::{Entry, RecordFilter};
use crate::error::{Error, Result};
use crate::formats::{AnnData, Format, Request as OpenRequest};
use crate::query::{Command, Planned, Resolved, TicketSpec};
use crate::registry::Registry;

type FlightStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Flight service: one per server, cheap to clone.
#[derive(Clone)]
pub struct FlightHandler {
    registry: Registry,
}

impl FlightHandler {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
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
        let planner = self.registry.planner();
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
        // Only the array format has a structure; asking it saves opening parquet listings.
        if !AnnData.claims(&record.suffix) {
            return None;
        }
        self.registry
            .planner()
            .describe(record, false)
            .await
            .ok()
            .flatten()
    }

    fn flight_info(
        descriptor: FlightDescriptor,
        command: &Command,
        resolved: &Resolved,
        planned: &Planned,
        structure: Option<serde_json::Value>,
    ) -> Result<FlightInfo> {
        let uids: Vec<String> = resolved.sources.iter().map(|s| s.uid.clone()).collect();
        let partition_count = planned.endpoint_count();
        let endpoints = (0..partition_count).map(|partition| {
            let ticket = TicketSpec {
                command: command.clone(),
                uids: uids.clone(),
                partition,
                partition_count,
            };
            arrow_flight::FlightEndpoint::new().with_ticket(Ticket::new(ticket.encode()))
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
        Ok(FlightInfo::new()
            .try_with_schema(&planned.schema())
            .map_err(|e| Error::Internal(format!("cannot encode schema: {e}")))?
            .with_descriptor(descriptor)
            .with_endpoints(endpoints.collect())
            .with_total_records(records)
            .with_total_bytes(bytes)
            .with_ordered(true)
            .with_app_metadata(metadata.to_string()))
    }

    /// A listing entry: schema and counts where they come cheaply, the record as metadata.
    async fn list_entry(&self, entry: Entry) -> FlightInfo {
        let planner = self.registry.planner();
        let ctx = planner.session();
        let (sources, rows) = match &entry {
            Entry::Artifact(a) => (Ok(vec![a.clone()]), a.n_observations),
            Entry::Collection(c) => {
                let uids = c.members.clone();
                (
                    planner.catalog().run(move |s| s.artifacts(&uids)).await,
                    None,
                )
            }
        };
        let schema = match sources {
            Ok(sources) => match planner.union(&ctx, &sources, &OpenRequest::default()).await {
                Ok(opened) => opened.table.schema(),
                Err(e) => {
                    tracing::warn!(key = entry.key(), error = %e, "cannot open for listing");
                    std::sync::Arc::new(Schema::empty())
                }
            },
            Err(_) => std::sync::Arc::new(Schema::empty()),
        };
        let info = FlightInfo::new()
            .with_descriptor(FlightDescriptor::new_path(vec![entry.key().to_string()]))
            .with_total_records(rows.and_then(|r| i64::try_from(r).ok()).unwrap_or(-1))
            .with_total_bytes(-1)
            .with_ordered(true)
            .with_app_metadata(entry.to_json().to_string());
        info.clone().try_with_schema(&schema).unwrap_or(info)
    }

    async fn put(&self, request: Request<Streaming<FlightData>>) -> Result<serde_json::Value> {
        let mut input = request.into_inner();
        let first = input
            .message()
            .await
            .map_err(|s| Error::invalid(format!("DoPut stream failed: {}", s.message())))?
            .ok_or_else(|| Error::invalid("DoPut sent no data"))?;
        let descriptor = first
            .flight_descriptor
            .clone()
            .ok_or_else(|| Error::invalid("DoPut's first message carries no descriptor"))?;
        let (key, add_column) = match (
            DescriptorType::try_from(descriptor.r#type),
            descriptor.path.as_slice(),
        ) {
            (Ok(DescriptorType::Path), [key]) => (key.clone(), None),
            (Ok(DescriptorType::Cmd), _) => {
                let command: actions::AddColumnPut = serde_json::from_slice(&descriptor.cmd)
                    .map_err(|e| Error::invalid(format!("invalid DoPut command: {e}")))?;
                (command.key.clone(), Some(command))
            }
            _ => {
                return Err(Error::invalid(
                    "DoPut takes a path descriptor [KEY], or a command {\"action\": \"add_column\", ...}",
                ));
            }
        };
        let data = stream::once(async { Ok(first) }).chain(input.map_err(FlightError::from));
        let mut batches = FlightRecordBatchStream::new_from_flight_data(data);
        if let Some(command) = add_column {
            let mut columns = Vec::new();
            while let Some(batch) = batches.try_next().await.map_err(flight_input_error)? {
                if batch.num_columns() != 1 {
                    return Err(Error::invalid(format!(
                        "add_column takes one column, got {}",
                        batch.num_columns()
                    )));
                }
                columns.push(batch.column(0).clone());
            }
            let refs: Vec<&dyn arrow::array::Array> = columns.iter().map(|c| c.as_ref()).collect();
            let values = arrow::compute::concat(&refs)
                .map_err(|e| Error::invalid(format!("add_column values: {e}")))?;
            let (record, _) = self
                .registry
                .add_column(&key, &command.element, &command.name, values)
                .await?;
            return Ok(Entry::Artifact(record).to_json());
        }
        let first_batch = batches.try_next().await.map_err(flight_input_error)?;
        let schema = match (&first_batch, batches.schema()) {
            (Some(batch), _) => batch.schema(),
            (None, Some(schema)) => schema.clone(),
            (None, None) => return Err(Error::invalid("DoPut sent no schema")),
        };
        let rest = batches.map_err(flight_input_error);
        let all = stream::iter(first_batch.map(Ok)).chain(rest);
        let (record, _) = self.registry.put(&key, None, schema, all.boxed()).await?;
        Ok(Entry::Artifact(record).to_json())
    }
}

fn flight_input_error(e: FlightError) -> Error {
    Error::invalid(format!("cannot decode uploaded data: {e}"))
}

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
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        // Without auth there is nothing to negotiate; answer so that clients that always
        // handshake can go on.
        Ok(Response::new(one(HandshakeResponse::default())))
    }

    async fn list_flights(
        &self,
        request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        let filter = RecordFilter::from_json_bytes(&request.get_ref().expression)?;
        let entries = self
            .registry
            .planner()
            .catalog()
            .run(move |c| c.list(&filter))
            .await?;
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
        let descriptor = request.into_inner();
        let (command, resolved, planned) = self.plan(&descriptor).await?;
        let structure = self.structure(&resolved).await;
        Ok(Response::new(Self::flight_info(
            descriptor, &command, &resolved, &planned, structure,
        )?))
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented(
            "PollFlightInfo: use GetFlightInfo, which answers at once",
        ))
    }

    async fn get_schema(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        let (_, _, planned) = self.plan(request.get_ref()).await?;
        let schema = planned.schema();
        let result: SchemaResult = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?;
        Ok(Response::new(result))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let spec = TicketSpec::decode(&request.get_ref().ticket)?;
        let planner = self.registry.planner();
        let sources = planner.sources(spec.uids.clone()).await?;
        let planned = planner.plan(&spec.command, &sources).await?;
        if planned.endpoint_count() != spec.partition_count {
            return Err(Error::invalid(
                "the data changed since this ticket was issued; ask GetFlightInfo for new tickets",
            )
            .into());
        }
        let schema = planned.schema();
        // Pull-based: tonic asks for the next message only when the client can take it, and
        // dropping the response (a vanished client) drops the scan.
        let batches = planned
            .execute(spec.partition)?
            .map_err(|e| FlightError::Tonic(Box::new(Status::from(Error::from_datafusion(e)))));
        let flight = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_dictionary_handling(DictionaryHandling::Resend)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(flight.boxed()))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let record = self.put(request).await?;
        Ok(Response::new(one(PutResult {
            app_metadata: record.to_string().into(),
        })))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("DoExchange is not supported"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        let body = actions::run(&self.registry, &action.r#type, &action.body).await?;
        Ok(Response::new(one(arrow_flight::Result {
            body: body.to_string().into(),
        })))
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        let types = actions::ACTIONS.iter().map(|(name, description)| {
            Ok(ActionType {
                r#type: name.to_string(),
                description: description.to_string(),
            })
        });
        Ok(Response::new(stream::iter(types).boxed()))
    }
}
