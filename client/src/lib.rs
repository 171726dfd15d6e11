//! A Rust client for artiflight servers.
//!
//! Wraps Arrow Flight with artiflight's descriptors: name what to read with a [`Request`], then
//! stream or collect its record batches from every endpoint, in order.
//!
//! ```no_run
//! use artiflight_client::{Client, Request};
//!
//! # async fn example() -> Result<(), artiflight_client::Error> {
//! let mut client = Client::connect("grpc://127.0.0.1:8815").await?;
//! let request = Request::key("sharded_parquet")
//!     .filter("louvain = 3 AND n_genes > 700")
//!     .columns(["cell_type", "n_genes"])
//!     .limit(5);
//! let (schema, batches) = client.collect(&request).await?;
//! println!("{schema:?}: {} batches", batches.len());
//! # Ok(()) }
//! ```

mod request;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow_flight::encode::DictionaryHandling;
use arrow_flight::error::FlightError;
use arrow_flight::{Action, FlightClient, FlightInfo, PutResult, encode::FlightDataEncoderBuilder};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::transport::{Channel, Endpoint};

pub use request::Request;
pub use tonic::Code;

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error status.
    #[error("{code:?}: {message}")]
    Status { code: Code, message: String },
    /// No connection could be made.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The server's answer could not be decoded.
    #[error("cannot decode the server's answer: {0}")]
    Decode(String),
    /// The caller passed something unusable.
    #[error("{0}")]
    InvalidInput(String),
}

impl Error {
    /// The gRPC status code, for errors that came from the server.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<FlightError> for Error {
    fn from(e: FlightError) -> Self {
        match e {
            FlightError::Tonic(status) => Error::Status {
                code: status.code(),
                message: status.message().to_string(),
            },
            other => Error::Decode(other.to_string()),
        }
    }
}

impl From<ArrowError> for Error {
    fn from(e: ArrowError) -> Self {
        Error::Decode(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Decode(format!("invalid JSON: {e}"))
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach a server that asks for credentials or serves TLS.
///
/// ```no_run
/// use artiflight_client::{Client, Options};
/// # async fn example() -> Result<(), artiflight_client::Error> {
/// let options = Options {
///     token: Some(std::env::var("ARTIFLIGHT_TOKEN").unwrap_or_default()),
///     ca_pem: Some(std::fs::read("ca.pem").unwrap_or_default()),
/// };
/// let client = Client::connect_with("grpc+tls://127.0.0.1:8815", &options).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// A token (`artiflight token create`), sent as `authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// PEM certificates to trust for TLS, in addition to the system's.
    pub ca_pem: Option<Vec<u8>>,
}

/// A connection to one artiflight server, and to the fleet servers its endpoints name.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    token: Option<String>,
    url: String,
    options: Options,
    /// Connections to the servers that endpoints' locations name, opened on first use.
    peers: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Client>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("Client")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `grpc://host:port` (also `http://`; `grpc+tls://` and `https://` for TLS).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, &Options::default()).await
    }

    /// Connects with credentials or trusted certificates.
    pub async fn connect_with(url: &str, options: &Options) -> Result<Self> {
        let http = if let Some(rest) = url.strip_prefix("grpc+tls://") {
            format!("https://{rest}")
        } else if let Some(rest) = url
            .strip_prefix("grpc://")
            .or_else(|| url.strip_prefix("grpc+tcp://"))
        {
            format!("http://{rest}")
        } else {
            url.to_string()
        };
        let tls = http.starts_with("https://");
        let mut endpoint = Endpoint::from_shared(http).map_err(|e| Error::Connect {
            url: url.to_string(),
            source: e,
        })?;
        if tls {
            let mut config = tonic::transport::ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = &options.ca_pem {
                config = config.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(config).map_err(|e| Error::Connect {
                url: url.to_string(),
                source: e,
            })?;
        }
        let channel = endpoint.connect().await.map_err(|e| Error::Connect {
            url: url.to_string(),
            source: e,
        })?;
        Ok(Self {
            channel,
            token: options.token.clone(),
            url: url.to_string(),
            options: options.clone(),
            peers: Default::default(),
        })
    }

    /// The client for the server at `uri`, with the same token and certificates: this one for
    /// its own address, else a connection kept for later endpoints.
    async fn at(&self, uri: &str) -> Result<Client> {
        if uri == self.url || uri.starts_with("arrow-flight-reuse-connection:") {
            return Ok(self.clone());
        }
        let known = match self.peers.lock() {
            Ok(peers) => peers.get(uri).cloned(),
            Err(poisoned) => poisoned.into_inner().get(uri).cloned(),
        };
        if let Some(peer) = known {
            return Ok(peer);
        }
        // Connected outside the lock; two endpoints racing to one new server connect twice and
        // the second connection is kept.
        let peer = Self::connect_with(uri, &self.options).await?;
        match self.peers.lock() {
            Ok(mut peers) => peers.insert(uri.to_string(), peer.clone()),
            Err(poisoned) => poisoned.into_inner().insert(uri.to_string(), peer.clone()),
        };
        Ok(peer)
    }

    /// Starts one endpoint's stream at its first location, falling back to this server when the
    /// endpoint names none or its location cannot be reached: any server serves any ticket.
    async fn do_get(
        &self,
        ticket: arrow_flight::Ticket,
        location: Option<String>,
    ) -> Result<BoxStream<'static, Result<RecordBatch>>> {
        if let Some(uri) = location
            && let Ok(peer) = self.at(&uri).await
            && let Ok(stream) = peer.flight().do_get(ticket.clone()).await
        {
            return Ok(stream.map_err(Error::from).boxed());
        }
        let stream = self.flight().do_get(ticket).await?;
        Ok(stream.map_err(Error::from).boxed())
    }

    /// The underlying Flight client, for anything this crate does not wrap; it sends the token.
    pub fn flight(&self) -> FlightClient {
        let mut client = FlightClient::new(self.channel.clone());
        if let Some(token) = &self.token {
            // A token that is not a valid header value is sent as nothing: the server answers
            // UNAUTHENTICATED, which says more than a local error would.
            let _ = client.add_header("authorization", &format!("Bearer {token}"));
        }
        client
    }

    /// Latest artifacts and collections, optionally filtered by a record filter such as
    /// `{"suffix": ".parquet"}`.
    pub async fn list(&self, filter: Option<serde_json::Value>) -> Result<Vec<FlightInfo>> {
        let expression = filter.map(|f| f.to_string()).unwrap_or_default();
        let stream = self.flight().list_flights(expression).await?;
        Ok(stream.try_collect().await?)
    }

    /// The flight's schema, counts, endpoints and record.
    pub async fn info(&self, request: &Request) -> Result<FlightInfo> {
        Ok(self.flight().get_flight_info(request.descriptor()).await?)
    }

    /// Streams the flight's batches, endpoint after endpoint, with its announced schema.
    pub async fn get(
        &self,
        request: &Request,
    ) -> Result<(SchemaRef, BoxStream<'static, Result<RecordBatch>>)> {
        let info = self.info(request).await?;
        self.get_info(&info)
    }

    /// Streams the batches of a flight already described by `info`.
    pub fn get_info(
        &self,
        info: &FlightInfo,
    ) -> Result<(SchemaRef, BoxStream<'static, Result<RecordBatch>>)> {
        let schema = std::sync::Arc::new(info.clone().try_decode_schema()?);
        let endpoints: Vec<_> = info
            .endpoint
            .iter()
            .filter_map(|e| {
                let location = e.location.first().map(|l| l.uri.clone());
                e.ticket.clone().map(|ticket| (ticket, location))
            })
            .collect();
        let this = self.clone();
        let batches = futures::stream::iter(endpoints)
            .then(move |(ticket, location)| {
                let this = this.clone();
                async move { this.do_get(ticket, location).await }
            })
            .try_flatten()
            .boxed();
        Ok((schema, batches))
    }

    /// Reads the whole flight into memory.
    pub async fn collect(&self, request: &Request) -> Result<(SchemaRef, Vec<RecordBatch>)> {
        let (schema, stream) = self.get(request).await?;
        Ok((schema, stream.try_collect().await?))
    }

    /// Uploads batches as a new parquet artifact (or a new version of `key`); returns its record.
    pub async fn put(&self, key: &str, batches: Vec<RecordBatch>) -> Result<serde_json::Value> {
        let schema = batches
            .first()
            .map(|b| b.schema())
            .ok_or_else(|| Error::InvalidInput("put needs at least one batch".into()))?;
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_dictionary_handling(DictionaryHandling::Resend)
            .with_flight_descriptor(Some(arrow_flight::FlightDescriptor::new_path(vec![
                key.to_string(),
            ])))
            .build(futures::stream::iter(batches.into_iter().map(Ok)));
        let results: Vec<PutResult> = self.flight().do_put(data).await?.try_collect().await?;
        let result = results
            .first()
            .ok_or_else(|| Error::Decode("DoPut returned no result".into()))?;
        Ok(serde_json::from_slice(&result.app_metadata)?)
    }

    /// Runs an action (`register`, `create_collection`, `describe`, `list_versions`, `delete`).
    pub async fn action(&self, name: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let stream = self
            .flight()
            .do_action(Action::new(name, body.to_string()))
            .await?;
        let bodies: Vec<bytes::Bytes> = stream.try_collect().await?;
        let body = bodies
            .first()
            .ok_or_else(|| Error::Decode(format!("action '{name}' returned nothing")))?;
        Ok(serde_json::from_slice(body)?)
    }
}
