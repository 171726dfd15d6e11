//! The server crate's one error type. Every variant carries the context a user needs (which key,
//! which file, which column); `service::status` turns it into a `tonic::Status` in exactly one place.

use datafusion::error::DataFusionError;

/// Result alias used throughout the server crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while serving artifacts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An unknown key, uid, element or dataset path.
    #[error("{0}")]
    NotFound(String),

    /// Malformed input from a client: JSON, unknown fields, a bad filter, a missing column.
    #[error("{0}")]
    InvalidArgument(String),

    /// A path outside the allowed storage roots, or a write the caller may not make.
    #[error("{0}")]
    PermissionDenied(String),

    /// No credentials, or credentials that match no live token (when auth is on).
    #[error("{0}")]
    Unauthenticated(String),

    /// A limit of the server was reached: concurrent streams, rows or bytes per request.
    #[error("{0}")]
    ResourceExhausted(String),

    /// The request took longer than the server allows (`--request-timeout`).
    #[error("{0}")]
    Timeout(String),

    /// A ticket or handle that no longer matches what it names: the data changed since.
    #[error("{0}")]
    Stale(String),

    /// The server is shutting down and ended the request.
    #[error("{0}")]
    Unavailable(String),

    /// The catalog database failed.
    #[error("catalog: {0}")]
    Catalog(#[from] rusqlite::Error),

    /// Object storage failed while touching `location`.
    #[error("storage error at {location}: {source}")]
    Storage {
        location: String,
        #[source]
        source: object_store::Error,
    },

    /// A local file operation failed.
    #[error("I/O error at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A file is unreadable or corrupt.
    #[error("cannot read {location}: {message}")]
    DataLoss { location: String, message: String },

    /// Planning or executing a query failed; classified by its root cause at the service edge.
    #[error("{0}")]
    Query(DataFusionError),

    /// A bug or an unexpected state of the server itself. `source` is the failure underneath, if
    /// any: the service edge puts the whole chain in the status and the log.
    #[error("internal error: {context}")]
    Internal {
        context: String,
        #[source]
        source: Option<BoxError>,
    },
}

/// Any error, as a cause kept under [`Error::Internal`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Error {
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self::NotFound(what.into())
    }

    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Self::InvalidArgument(what.into())
    }

    pub(crate) fn internal(context: impl Into<String>) -> Self {
        Self::Internal {
            context: context.into(),
            source: None,
        }
    }

    /// An internal error that keeps its cause.
    pub(crate) fn internal_from(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Self::Internal {
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The message with every cause underneath it that adds something, joined by `: `.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            let more = error.to_string();
            if !text.contains(&more) {
                text = format!("{text}: {more}");
            }
            cause = error.source();
        }
        text
    }

    pub(crate) fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_string(),
            source,
        }
    }

    pub(crate) fn storage(location: impl std::fmt::Display, source: object_store::Error) -> Self {
        match source {
            object_store::Error::NotFound { .. } => {
                Self::NotFound(format!("no object at {location}"))
            }
            source => Self::Storage {
                location: location.to_string(),
                source,
            },
        }
    }

    /// Unwraps errors that travelled through DataFusion (our providers return them as
    /// `DataFusionError::External`), so that they keep their own classification.
    pub fn from_datafusion(error: DataFusionError) -> Self {
        match error {
            DataFusionError::External(inner) => match inner.downcast::<Error>() {
                Ok(own) => *own,
                Err(other) => Self::Query(DataFusionError::External(other)),
            },
            DataFusionError::Context(context, inner) => match Self::from_datafusion(*inner) {
                Self::Query(inner) => {
                    Self::Query(DataFusionError::Context(context, Box::new(inner)))
                }
                own => own,
            },
            other => Self::Query(other),
        }
    }
}

/// Runs `future`, turning a panic inside it into a [`Error::DataLoss`] about `location`.
///
/// Readers parse bytes that users control; a reader that panics on a malformed file (some do, on
/// overflowing lengths) must fail the request that read it, never the connection or the server.
pub(crate) async fn guard_reader<T>(
    location: impl std::fmt::Display,
    future: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(future).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => Err(Error::DataLoss {
            location: location.to_string(),
            message: format!(
                "the reader failed on malformed data ({})",
                panic_message(panic.as_ref())
            ),
        }),
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_string())
}

/// `?` on a DataFusion error unwraps our own errors that travelled through it, so they keep
/// their class (a NOT_FOUND from a provider stays NOT_FOUND).
impl From<DataFusionError> for Error {
    fn from(error: DataFusionError) -> Self {
        Self::from_datafusion(error)
    }
}

impl From<Error> for DataFusionError {
    fn from(error: Error) -> Self {
        DataFusionError::External(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn the_chain_names_each_cause_once() {
        let io = std::io::Error::other("disk on fire");
        let error = Error::internal_from("writing the catalog", io);
        assert_eq!(
            error.chain(),
            "internal error: writing the catalog: disk on fire"
        );
        // A cause already in the message is not repeated.
        let error = Error::io("/tmp/x", std::io::Error::other("gone"));
        assert_eq!(error.chain(), "I/O error at /tmp/x: gone");
    }
}
