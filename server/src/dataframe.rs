//! DataFusion helpers that formats and planning share: a client's filter and column list applied
//! to a DataFrame with the client's errors, and a plan's statistics. A leaf: it knows neither
//! formats nor commands, so both can use it.

use std::sync::Arc;

use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::{ExecutionPlan, StatisticsArgs, StatisticsContext};
use datafusion::prelude::{DataFrame, SessionContext};

use crate::error::{Error, Result};

/// The plan's overall statistics (row counts from parquet footers, for one), if it has any.
pub fn statistics(plan: &dyn ExecutionPlan) -> Option<Arc<datafusion::common::Statistics>> {
    StatisticsContext::new()
        .compute(plan, &StatisticsArgs::new())
        .ok()
}

/// Filters `df` by a SQL boolean expression; a parse error or a missing column is
/// INVALID_ARGUMENT with the parser's message.
pub(crate) fn apply_filter(ctx: &SessionContext, df: DataFrame, filter: &str) -> Result<DataFrame> {
    let invalid = |e: datafusion::error::DataFusionError| {
        Error::invalid(format!(
            "invalid filter '{filter}': {}",
            e.strip_backtrace()
        ))
    };
    let expr = ctx.parse_sql_expr(filter, df.schema()).map_err(invalid)?;
    // A filter is a whole expression: `$1` or `?` would fail only when executed, as if the
    // server had erred (found by tests/e2e/fuzz.rs).
    if expr
        .exists(|e| Ok(matches!(e, Expr::Placeholder(_))))
        .unwrap_or(false)
    {
        return Err(Error::invalid(format!(
            "invalid filter '{filter}': parameters ($1, ?) are for Flight SQL prepared statements; \
             write the value into the filter"
        )));
    }
    let df = df.filter(expr).map_err(invalid)?;
    // Types are coerced when the plan is analyzed, later, where a filter comparing a number with
    // a struct or a boolean with a range would surface as DataFusion's internal error: check now.
    // Read in place: cloning the session's state per request would copy its function registry.
    let state = ctx.state_ref();
    let state = state.read();
    state
        .analyzer()
        .execute_and_check(df.logical_plan().clone(), state.config_options(), |_, _| {})
        .map_err(invalid)?;
    Ok(df)
}

/// Projects `df` to `columns`, in that order; an unknown column is INVALID_ARGUMENT naming it.
pub(crate) fn select_columns(df: DataFrame, columns: &[String]) -> Result<DataFrame> {
    let names: Vec<&str> = columns.iter().map(String::as_str).collect();
    df.select_columns(&names)
        .map_err(|e| Error::invalid(format!("invalid columns: {}", e.strip_backtrace())))
}
