//! A SQL statement as it travels in prepared-statement handles and tickets, and what is done to
//! its text and plan before it runs: only queries pass, `?` placeholders are numbered, parameters
//! are bound, and results go out in plain types.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use artiflight_proto::{SQL_STATEMENT_VERSION, SqlStatement};
use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, cast};
use datafusion::sql::parser::Statement as ParsedStatement;
use datafusion::sql::sqlparser::ast::{self, visit_expressions_mut};
use prost::Message;

use crate::error::{Error, Result};

/// The largest parameter set a handle or ticket may carry (one row of values).
const MAX_PARAMETER_BYTES: usize = 1 << 20;

/// A SQL statement as it travels in prepared-statement handles and tickets.
///
/// ```
/// use artiflight_server::query::Statement;
/// let statement = Statement::new("SELECT 1");
/// assert_eq!(Statement::decode(&statement.encode().unwrap()).unwrap(), statement);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Statement {
    pub sql: String,
    /// Bound parameters: one row, `$1` from the first column.
    pub parameters: Option<RecordBatch>,
    /// Ticket only: the entry uid each table name resolved to.
    pub versions: BTreeMap<String, String>,
    pub partition: usize,
    pub partition_count: usize,
    /// Ticket only: which flight it belongs to (random per GetFlightInfo); cancels go by it.
    pub flight: u64,
    /// Ticket only: the target partitions the flight was planned with (0: the server's own).
    pub target_partitions: usize,
}

impl Statement {
    pub fn new(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            ..Default::default()
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>> {
        let parameters = match &self.parameters {
            Some(batch) => {
                let mut writer = StreamWriter::try_new(Vec::new(), &batch.schema())
                    .and_then(|mut w| w.write(batch).map(|_| w))
                    .map_err(|e| Error::internal_from("cannot encode parameters", e))?;
                writer
                    .finish()
                    .map_err(|e| Error::internal_from("cannot encode parameters", e))?;
                writer
                    .into_inner()
                    .map_err(|e| Error::internal_from("cannot encode parameters", e))?
            }
            None => Vec::new(),
        };
        Ok(SqlStatement {
            version: SQL_STATEMENT_VERSION,
            sql: self.sql.clone(),
            parameters,
            versions: self.versions.clone().into_iter().collect(),
            partition: self.partition as u32,
            partition_count: self.partition_count as u32,
            flight: self.flight,
            target_partitions: u32::try_from(self.target_partitions).unwrap_or(0),
        }
        .encode_to_vec())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let message = SqlStatement::decode(bytes)
            .map_err(|e| Error::invalid(format!("malformed statement handle: {e}")))?;
        if message.version != SQL_STATEMENT_VERSION {
            return Err(Error::invalid(format!(
                "statement handle version {} is not supported (this server reads version \
                 {SQL_STATEMENT_VERSION}); prepare the statement again",
                message.version
            )));
        }
        if message.partition_count > 0 && message.partition >= message.partition_count {
            return Err(Error::invalid("malformed ticket: partition out of range"));
        }
        let parameters = if message.parameters.is_empty() {
            None
        } else {
            // One row of parameters: anything larger is not a parameter set.
            if message.parameters.len() > MAX_PARAMETER_BYTES {
                return Err(Error::invalid(format!(
                    "the statement's parameters take {} bytes; at most {MAX_PARAMETER_BYTES} are \
                     accepted",
                    message.parameters.len()
                )));
            }
            crate::ipc::check_stream(&message.parameters)?;
            let bad = |e: arrow::error::ArrowError| {
                Error::invalid(format!("malformed parameters in statement handle: {e}"))
            };
            // The headers are checked above; a decoder panic on what they cannot show is still
            // this request's error, never the server's.
            std::panic::catch_unwind(|| {
                let mut reader =
                    StreamReader::try_new(message.parameters.as_slice(), None).map_err(bad)?;
                reader.next().transpose().map_err(bad)
            })
            .unwrap_or_else(|_| Err(Error::invalid("malformed parameters in statement handle")))?
        };
        Ok(Self {
            sql: message.sql,
            parameters,
            versions: message.versions.into_iter().collect(),
            partition: message.partition as usize,
            partition_count: message.partition_count as usize,
            flight: message.flight,
            target_partitions: message.target_partitions as usize,
        })
    }
}

/// Refuses anything but queries before planning, so that no statement with side effects starts.
pub(super) fn refuse_writes(statement: &ParsedStatement, sql: &str) -> Result<()> {
    let allowed = match statement {
        ParsedStatement::Statement(s) => matches!(
            s.as_ref(),
            ast::Statement::Query(_)
                | ast::Statement::ShowTables { .. }
                | ast::Statement::ShowColumns { .. }
                | ast::Statement::ExplainTable { .. }
        ),
        ParsedStatement::Explain(explain) => return refuse_writes(&explain.statement, sql),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Error::PermissionDenied(read_only(
            sql,
            "only queries run".to_string(),
        )))
    }
}

pub(super) fn read_only(sql: &str, detail: String) -> String {
    let verb = sql
        .split_whitespace()
        .next()
        .unwrap_or("this")
        .to_uppercase();
    format!(
        "{verb} statements are refused: artiflight serves its artifacts read-only through SQL \
         ({detail}). Add data with DoPut or the 'register' action."
    )
}

/// Numbers JDBC-style `?` placeholders `$1`, `$2`, ... in the order they appear, which is the
/// order clients bind them in.
pub(super) fn number_placeholders(statement: &mut ParsedStatement) {
    let ParsedStatement::Statement(statement) = statement else {
        return;
    };
    let mut n = 0;
    let _ = visit_expressions_mut(statement.as_mut(), |expr| {
        if let ast::Expr::Value(value) = expr
            && let ast::Value::Placeholder(p) = &mut value.value
            && p == "?"
        {
            n += 1;
            *p = format!("${n}");
        }
        ControlFlow::<()>::Continue(())
    });
}

/// Casts string and binary views in the result to plain strings and binaries, which every Flight
/// SQL client reads (JDBC's among them).
pub(super) fn plain_types(plan: LogicalPlan) -> Result<LogicalPlan> {
    let plain = |t: &DataType| match t {
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        _ => None,
    };
    let schema = Arc::clone(plan.schema());
    if !schema
        .fields()
        .iter()
        .any(|f| plain(f.data_type()).is_some())
    {
        return Ok(plan);
    }
    let columns = schema.iter().map(|(qualifier, field)| {
        let column = Expr::Column(Column::from((qualifier, field)));
        match plain(field.data_type()) {
            Some(to) => cast(column, to).alias_qualified(qualifier.cloned(), field.name()),
            None => column,
        }
    });
    Ok(LogicalPlanBuilder::from(plan).project(columns)?.build()?)
}

/// Binds the first row of `parameters` to `$1`, `$2`, ..., cast to the types the query infers
/// (a Python int arrives as Int64, the column may be Int32).
pub(super) fn bind(plan: LogicalPlan, parameters: &RecordBatch) -> Result<LogicalPlan> {
    if parameters.num_rows() != 1 {
        return Err(Error::invalid(format!(
            "bind one row of parameters per execution, got {}",
            parameters.num_rows()
        )));
    }
    let types = plan.get_parameter_types()?;
    let values = parameters
        .columns()
        .iter()
        .enumerate()
        .map(|(i, column)| {
            let value = ScalarValue::try_from_array(column, 0)?;
            match types.get(&format!("${}", i + 1)) {
                Some(Some(expected)) if *expected != value.data_type() => {
                    value.cast_to(expected).map_err(|e| {
                        Error::invalid(format!("parameter ${}: {}", i + 1, e.strip_backtrace()))
                    })
                }
                _ => Ok(value),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(plan.with_param_values(values)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    fn parse(sql: &str) -> ParsedStatement {
        let ctx = SessionContext::new();
        ctx.state()
            .sql_to_statement(sql, &datafusion::config::Dialect::Generic)
            .expect("parses")
    }

    #[test]
    fn refuses_everything_but_queries() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "DELETE FROM t",
            "UPDATE t SET a = 1",
            "CREATE TABLE t (a INT)",
            "DROP TABLE t",
            "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION '/tmp/x'",
            "COPY (SELECT 1) TO '/tmp/x.parquet'",
            "EXPLAIN INSERT INTO t VALUES (1)",
            "SET datafusion.execution.batch_size = 1",
        ] {
            let err = refuse_writes(&parse(sql), sql).expect_err(sql);
            assert!(matches!(err, Error::PermissionDenied(_)), "{sql}: {err}");
        }
        for sql in [
            "SELECT 1",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "EXPLAIN SELECT 1",
            "SHOW TABLES",
        ] {
            refuse_writes(&parse(sql), sql).expect(sql);
        }
    }

    #[test]
    fn numbers_question_marks_in_order() {
        let mut statement = parse("SELECT a FROM t WHERE a > ? AND b = ? AND c = $1");
        number_placeholders(&mut statement);
        let text = statement.to_string();
        assert!(text.contains("a > $1 AND b = $2 AND c = $1"), "{text}");
    }

    #[test]
    fn statements_round_trip_with_parameters() -> Result<()> {
        let batch = RecordBatch::try_from_iter([(
            "$1",
            Arc::new(arrow::array::Int64Array::from(vec![7])) as arrow::array::ArrayRef,
        )])
        .map_err(|e| Error::internal_from("test batch", e))?;
        let statement = Statement {
            sql: "SELECT $1".into(),
            parameters: Some(batch),
            versions: [("t".to_string(), "u".to_string())].into(),
            partition: 1,
            partition_count: 2,
            flight: 7,
            target_partitions: 5,
        };
        assert_eq!(Statement::decode(&statement.encode()?)?, statement);
        assert!(Statement::decode(b"\xff\x01").is_err());
        Ok(())
    }
}
