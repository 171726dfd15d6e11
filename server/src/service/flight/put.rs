//! DoPut: uploads stored as parquet artifacts, one-column uploads for `add_column`, and Flight SQL
//! parameters bound to a prepared statement. Every client message is checked from its IPC header
//! before anything decodes it (`crate::ipc`).

use arrow::array::RecordBatch;
use arrow_flight::FlightData;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_descriptor::DescriptorType;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Status, Streaming};

use super::FlightHandler;
use crate::catalog::{Entry, Role};
use crate::error::{Error, Result};
use crate::service::actions;
use crate::service::auth::Identity;

impl FlightHandler {
    pub(super) async fn put(&self, request: Request<Streaming<FlightData>>) -> Result<PutBody> {
        // Binding a prepared statement's parameters reads; anything else DoPut does writes, so
        // the role is checked once the first message says which it is.
        self.allow(&request, Role::Read, "DoPut").await?;
        let metadata = request.metadata().clone();
        let verified = request.extensions().get::<Identity>().cloned();
        let mut input = request.into_inner();
        let first = input
            .message()
            .await
            .map_err(input_status)?
            .ok_or_else(|| Error::invalid("DoPut sent no data"))?;
        let descriptor = first
            .flight_descriptor
            .clone()
            .ok_or_else(|| Error::invalid("DoPut's first message carries no descriptor"))?;
        let data = stream::once(async { Ok(first) })
            .chain(input.map_err(FlightError::from))
            .and_then(|data| async move {
                // Compressed buffers are refused before anything decodes them (see `ipc`).
                crate::ipc::check_header(&data.data_header, data.data_body.len())
                    .map_err(|e| FlightError::ExternalError(Box::new(e)))?;
                Ok(data)
            });
        if let Some(command) = Self::sql_command(&descriptor) {
            return self.put_sql(command, data.boxed()).await;
        }
        self.gate
            .authorize(&metadata, verified.as_ref(), Role::Write, "DoPut")
            .await?;
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
            return Ok(PutBody::Json(Entry::Artifact(record).to_json()));
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
        Ok(PutBody::Json(Entry::Artifact(record).to_json()))
    }
    /// A Flight SQL DoPut: parameters bound to a prepared statement; every write is refused.
    async fn put_sql(
        &self,
        command: arrow_flight::sql::Any,
        data: BoxStream<'static, Result<FlightData, FlightError>>,
    ) -> Result<PutBody> {
        use arrow_flight::sql::{Command as SqlCommand, DoPutPreparedStatementResult};
        let command = SqlCommand::try_from(command)
            .map_err(|e| Error::invalid(format!("malformed Flight SQL command: {e}")))?;
        let SqlCommand::CommandPreparedStatementQuery(query) = command else {
            return Err(Error::PermissionDenied(format!(
                "{} is refused: artiflight serves its artifacts read-only through SQL. Add data \
                 with DoPut on a path descriptor or the 'register' action.",
                command
                    .type_url()
                    .trim_start_matches("type.googleapis.com/arrow.flight.protocol.sql.")
            )));
        };
        // Parameters are one row: more than a few messages is not a parameter set, and nothing
        // past that is read.
        let mut stream = FlightRecordBatchStream::new_from_flight_data(data);
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut rows = 0usize;
        while let Some(batch) = stream.try_next().await.map_err(flight_input_error)? {
            rows += batch.num_rows();
            batches.push(batch);
            if rows > 1 || batches.len() > 16 {
                return Err(Error::invalid(
                    "bind one row of parameters per execution, got more",
                ));
            }
        }
        let handle = self
            .sql
            .bind(&query.prepared_statement_handle, batches)
            .await?;
        let result = DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle),
        };
        Ok(PutBody::Bytes(result.encode_to_vec().into()))
    }
}

/// What DoPut answers: a record as JSON, or a Flight SQL message.
pub(super) enum PutBody {
    Json(serde_json::Value),
    Bytes(bytes::Bytes),
}

fn flight_input_error(e: FlightError) -> Error {
    match e {
        FlightError::Tonic(status) => input_status(*status),
        FlightError::ExternalError(e) => match e.downcast::<Error>() {
            Ok(e) => *e,
            Err(e) => Error::invalid(format!("cannot decode uploaded data: {e}")),
        },
        e => Error::invalid(format!("cannot decode uploaded data: {e}")),
    }
}

/// An error reading what the client sends: a message over the size limit is the client's to fix.
fn input_status(status: Status) -> Error {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            Error::ResourceExhausted(format!(
                "{} (the server's --max-message-size): send smaller batches",
                status.message()
            ))
        }
        _ => Error::invalid(format!("the uploaded stream failed: {}", status.message())),
    }
}
