//! The streams the service answers with: record batches encoded as Flight data, one plan
//! partition at a time. A leaf of the service: Flight, Flight SQL, cancellation and limits all
//! speak in these.

use std::pin::Pin;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::FlightData;
use arrow_flight::encode::{DictionaryHandling, FlightDataEncoderBuilder};
use arrow_flight::error::FlightError;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::Status;

use crate::error::{Error, Result};
use crate::query::Planned;

/// A response stream of the Flight service.
pub(super) type FlightStream<T> =
    Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Streams record batches as Flight data. Dictionaries are resent rather than hydrated, so that
/// categoricals stay dictionaries and match the announced schema.
pub(super) fn batches_to_flight(
    schema: SchemaRef,
    batches: BoxStream<'static, Result<RecordBatch, FlightError>>,
) -> FlightStream<FlightData> {
    FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_dictionary_handling(DictionaryHandling::Resend)
        .build(batches)
        .map_err(Status::from)
        .boxed()
}

/// Streams one partition of a plan. Pull-based: tonic asks for the next message only when the
/// client can take it, and dropping the response (a vanished client) drops the scan.
pub(super) fn stream_partition(
    planned: &Planned,
    partition: usize,
) -> Result<FlightStream<FlightData>> {
    let batches = planned
        .execute(partition)?
        .map_err(|e| FlightError::Tonic(Box::new(Status::from(Error::from_datafusion(e)))));
    Ok(batches_to_flight(planned.schema(), batches.boxed()))
}
