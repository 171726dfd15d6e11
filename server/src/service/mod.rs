//! The gRPC edge: Arrow Flight and Flight SQL over tonic, on one port. Decodes descriptors and tickets,
//! checks credentials and limits, calls the query planner and the registry, and converts errors to
//! statuses in one place.

mod actions;
mod auth;
mod cancel;
mod fleet;
mod flight;
mod limits;
mod metrics;
mod plans;
mod sql;
mod status;
mod stream;
mod worker;

use std::future::Future;

use arrow_flight::flight_service_server::FlightServiceServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

pub use actions::{Caller, run as run_action};
pub use fleet::Fleet;
pub use flight::FlightHandler;
pub use limits::{Limits, parse_duration};
pub use metrics::Metrics;

use crate::error::{Error, Result};

/// How often an idle connection is pinged, and how long the answer may take.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A TLS identity: a certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct Tls {
    /// The certificate chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

/// Serves Flight on `listener` until `shutdown` resolves. Then no new calls are taken, running
/// streams get the limits' shutdown grace to finish, and what is still running then is ended
/// with UNAVAILABLE.
///
/// `grpc.health.v1` is served beside Flight, without a token (probes carry none); with
/// `metrics`, Prometheus metrics are served on that listener at `/metrics`.
pub async fn serve(
    listener: TcpListener,
    handler: FlightHandler,
    tls: Option<&Tls>,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let governor = handler.governor();
    let max_message = governor.limits.max_message_bytes;
    let gate = handler.gate();
    let worker = handler.worker();
    let scrape = metrics.map(|listener| {
        tokio::spawn(metrics::serve_metrics(
            listener,
            std::sync::Arc::clone(&governor.metrics),
            handler.planner().clone(),
        ))
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<FlightServiceServer<FlightHandler>>()
        .await;
    let service = FlightServiceServer::new(handler)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message.max(64 * 1024 * 1024));
    // Other servers' SQL stages, behind the same token check as Flight: a task carries the token
    // of the client whose query it belongs to.
    let worker = worker.map(|worker| {
        let server = worker
            .into_worker_server()
            .max_decoding_message_size(max_message);
        auth::CheckedFirst::new(
            server,
            gate.clone(),
            std::sync::Arc::clone(&governor.metrics),
        )
    });
    let service = auth::CheckedFirst::new(service, gate, std::sync::Arc::clone(&governor.metrics));
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
    // A connection's calls are bounded, and a peer that vanished without closing (no FIN) is
    // found by HTTP/2 pings and dropped with everything it held.
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(governor.limits.max_connection_streams.max(1))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL));
    if let Some(tls) = tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        // A client that opens a connection and never finishes the handshake is dropped.
        let config = tonic::transport::ServerTlsConfig::new()
            .identity(identity)
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        builder = builder
            .tls_config(config)
            .map_err(|e| Error::invalid(format!("cannot use the TLS certificate and key: {e}")))?;
    }
    let stopping = std::sync::Arc::clone(&governor);
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: finishing running streams");
        // Load balancers stop sending new calls while the running streams finish.
        health
            .set_not_serving::<FlightServiceServer<FlightHandler>>()
            .await;
        stopping.stop();
    };
    let served = builder
        .add_service(health_service)
        .add_service(service)
        .add_optional_service(worker)
        .serve_with_incoming_shutdown(incoming, signal);
    let result = tokio::select! {
        served = served => served.map_err(|e| Error::internal_from("server failed", e)),
        // Idle connections that a client keeps open do not hold the shutdown up.
        () = governor.hard_stop() => Ok(()),
    };
    if let Some(scrape) = scrape {
        scrape.abort();
    }
    result
}
