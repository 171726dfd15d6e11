//! The one conversion from [`Error`] to `tonic::Status` (SPEC section 6).
//!
//! User errors name the key, column or parse error; internal errors are logged with their chain
//! and returned without the server's internals.

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use tonic::Status;

use crate::error::Error;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::NotFound(m) => Status::not_found(m),
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::Unauthenticated(m) => Status::unauthenticated(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::Timeout(m) => Status::deadline_exceeded(m),
            Error::Unavailable(m) => Status::unavailable(m),
            Error::Stale(m) => Status::failed_precondition(m),
            Error::DataLoss { .. } => {
                tracing::error!(%error, "unreadable data");
                Status::data_loss(error.to_string())
            }
            Error::Query(e) => classify(e),
            Error::Catalog(_) | Error::Storage { .. } | Error::Io { .. } | Error::Internal(_) => {
                tracing::error!(error = ?error, "internal error");
                Status::internal(error.to_string())
            }
        }
    }
}

/// Classifies a DataFusion error by its root cause: the user's SQL or columns are
/// INVALID_ARGUMENT, a failing read is INTERNAL.
fn classify(error: DataFusionError) -> Status {
    let message = error.strip_backtrace();
    match error.find_root() {
        DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::SQL(..)
        | DataFusionError::NotImplemented(_) => Status::invalid_argument(message),
        DataFusionError::ArrowError(e, _)
            if matches!(
                e.as_ref(),
                ArrowError::CastError(_)
                    | ArrowError::ParseError(_)
                    | ArrowError::InvalidArgumentError(_)
                    | ArrowError::DivideByZero
                    | ArrowError::ArithmeticOverflow(_)
            ) =>
        {
            Status::invalid_argument(message)
        }
        DataFusionError::ResourcesExhausted(_) => Status::resource_exhausted(message),
        DataFusionError::ParquetError(e) if is_user_predicate_error(e) => {
            Status::invalid_argument(message)
        }
        DataFusionError::ParquetError(_) => {
            tracing::error!(error = %message, "corrupt parquet");
            Status::data_loss(message)
        }
        _ => {
            tracing::error!(error = %message, "query failed");
            Status::internal(message)
        }
    }
}

/// Whether a parquet read failed because the pushed-down filter could not be evaluated on the
/// data: `cell_type IN (1, 2)` casts every cell type to a number. The parquet reader keeps only
/// the text of the error it wraps (`Error evaluating filter predicate: ArrowError(CastError(..))`),
/// so the cause is read from there; a corrupt file gives other messages.
fn is_user_predicate_error(error: &parquet::errors::ParquetError) -> bool {
    let text = error.to_string();
    text.contains("Error evaluating filter predicate")
        && [
            "CastError(",
            "ParseError(",
            "InvalidArgumentError(",
            "DivideByZero",
            "ArithmeticOverflow(",
        ]
        .iter()
        .any(|cause| text.contains(cause))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn external_errors_keep_their_class() {
        let wrapped = DataFusionError::External(Box::new(Error::not_found("no key 'x'")));
        assert_eq!(
            Status::from(Error::from_datafusion(wrapped)).code(),
            Code::NotFound
        );
        let plan = DataFusionError::Plan("No field named nope".into());
        assert_eq!(
            Status::from(Error::from_datafusion(plan)).code(),
            Code::InvalidArgument
        );
    }
}
