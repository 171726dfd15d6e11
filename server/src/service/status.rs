//! The one conversion from [`Error`] to `tonic::Status` (docs/PROTOCOL.md section 6).
//!
//! User errors name the key, column or parse error; internal errors are logged with their chain
//! and returned without the server's internals.

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use tonic::Status;

use crate::error::Error;

impl From<Error> for Status {
    /// The status a client sees: its class, and a message that names keys, elements, columns and
    /// flags but never the server's file paths (the log keeps the whole error).
    fn from(error: Error) -> Self {
        let status = classify_error(error);
        if status.message().contains('/') {
            Status::new(status.code(), private(status.message()))
        } else {
            status
        }
    }
}

/// The message with every local path (`/srv/data/x.parquet`, `file:///srv/...`) cut to the
/// file's name: a client learns what is broken, and nothing of the server's directories.
///
/// ```text
/// cannot read artifact 'k' at file:///srv/data/objects/a.parquet: truncated
/// cannot read artifact 'k' at .../a.parquet: truncated
/// ```
pub(crate) fn private(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    // Not `:`, which `s3://bucket/key` has before its slashes.
    let boundary = |c: char| c.is_whitespace() || "'\"`(=[,".contains(c);
    let mut previous: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        let at_boundary = previous.is_none_or(boundary);
        let starts = rest.starts_with("file://") || rest.starts_with('/');
        if at_boundary && starts {
            let end = rest
                .find(|c: char| c.is_whitespace() || "'\"`)],".contains(c))
                .unwrap_or(rest.len());
            let token = &rest[..end];
            let path = token.trim_start_matches("file://");
            // A path has a directory and a name: `/`, ` / ` (division) and `//` are not paths.
            if path.starts_with('/') && path[1..].contains('/') && path.len() > 3 {
                let tail = token.trim_end_matches(['.', ':', ';']);
                // The file's own name stays: it names what is broken, and shows no directory.
                let folder = tail.ends_with('/');
                let name = tail
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap_or_default();
                out.push_str(".../");
                out.push_str(name);
                if folder {
                    out.push('/');
                }
                out.push_str(&token[tail.len()..]);
                previous = token.chars().last();
                rest = &rest[end..];
                continue;
            }
        }
        out.push(c);
        previous = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

fn classify_error(error: Error) -> Status {
    {
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
            Error::Catalog(_)
            | Error::Storage { .. }
            | Error::Io { .. }
            | Error::Internal { .. } => {
                let chain = error.chain();
                tracing::error!(error = %chain, "internal error");
                Status::internal(chain)
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
        DataFusionError::ResourcesExhausted(_) => Status::resource_exhausted(format!(
            "{message} (the server's query memory, --max-query-memory, is used up even after \
             spilling to disk: narrow the query, or ask for a larger bound)"
        )),
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
    fn errors_never_show_local_paths() {
        let error = Error::DataLoss {
            location: "artifact 'k' at file:///srv/lab/objects/ab.parquet".into(),
            message: "Object at location /srv/lab/objects/ab.parquet not found".into(),
        };
        let status = Status::from(error);
        assert_eq!(status.code(), Code::DataLoss);
        assert_eq!(
            status.message(),
            "cannot read artifact 'k' at .../ab.parquet: Object at location .../ab.parquet not found"
        );
        // Division, table names with slashes and remote URLs are not local paths.
        for kept in [
            "invalid filter 'a / 2 > b'",
            "no table \"pbmc68k.h5ad/X\"",
            "no object at s3://bucket/a/b.parquet",
        ] {
            assert_eq!(private(kept), kept);
        }
        assert_eq!(private("('/a/b.h5', 3)"), "('.../b.h5', 3)");
        assert_eq!(private("at file:///srv/x.zarr/."), "at .../x.zarr/.");
    }

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
