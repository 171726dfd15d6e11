//! The gRPC edge: Arrow Flight and Flight SQL over tonic, on one port. Decodes descriptors and tickets,
//! calls the query planner and the registry, and converts errors to statuses in one place.

mod actions;
mod cancel;
mod flight;
mod sql;
mod status;

use std::future::Future;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

pub use flight::FlightHandler;

use crate::error::{Error, Result};

/// Largest message a client may send (DoPut batches).
const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Serves Flight on `listener` until `shutdown` resolves; in-flight streams are then finished.
pub async fn serve(
    listener: TcpListener,
    handler: FlightHandler,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let service = FlightServiceServer::new(handler)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Small answers (GetFlightInfo, actions, the end of a stream) must not wait for the peer's
    // delayed ACK: without TCP_NODELAY each costs about 40 ms.
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        if let Ok(stream) = &stream
            && let Err(e) = stream.set_nodelay(true)
        {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        stream
    });
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| Error::Internal(format!("server failed: {e}")))
}
