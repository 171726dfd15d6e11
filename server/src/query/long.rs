//! SQL's `KEY/X`: a matrix in the long form (`obs_name`, `var_name`, `value`), with the name
//! predicates of a query pushed into the matrix read (docs/PROTOCOL.md section 7).
//!
//! `var_name = 'CD3E'` or `var_name IN (...)` becomes a variable selection, `obs_name = ...` or
//! `obs_name IN (...)` a row selection, so only the chunks (or CSR ranges) of the named cells and
//! genes are read; a query that projects no `value` reads no values at all. The pushed filters
//! are `Inexact`: DataFusion still applies them above the scan, so a predicate this table only
//! partly understands can never widen an answer.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::DataType;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{
    BinaryExpr, Cast, Expr, Operator, TableProviderFilterPushDown, TableType, TryCast,
};
use datafusion::physical_plan::ExecutionPlan;

use super::Planner;
use crate::catalog::ArtifactRecord;
use crate::formats::ReadRequest;

/// The long form of one matrix element of one artifact.
pub(crate) struct LongTable {
    planner: Planner,
    source: ArtifactRecord,
    /// The element, with the long layout and no selection.
    request: ReadRequest,
    schema: SchemaRef,
}

impl LongTable {
    pub(crate) fn new(
        planner: Planner,
        source: ArtifactRecord,
        request: ReadRequest,
        schema: SchemaRef,
    ) -> Self {
        Self {
            planner,
            source,
            request,
            schema,
        }
    }
}

impl std::fmt::Debug for LongTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongTable")
            .field("artifact", &self.source.uid)
            .field("element", &self.request.element)
            .finish()
    }
}

/// Which axis a name column selects.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Axis {
    Obs,
    Var,
}

impl Axis {
    fn of(column: &str) -> Option<Self> {
        match column {
            "obs_name" => Some(Axis::Obs),
            "var_name" => Some(Axis::Var),
            _ => None,
        }
    }
}

/// The names a filter allows on one axis, if it is `name = 'x'`, `'x' = name`,
/// `name IN ('x', ...)` or an OR of these over string literals.
fn names(filter: &Expr) -> Option<(Axis, BTreeSet<String>)> {
    // SQL sessions compare on string views: the name column may come cast to one.
    fn column(e: &Expr) -> Option<Axis> {
        match e {
            Expr::Column(c) => Axis::of(&c.name),
            Expr::Cast(Cast { expr, field }) | Expr::TryCast(TryCast { expr, field })
                if matches!(
                    field.data_type(),
                    DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
                ) =>
            {
                column(expr)
            }
            _ => None,
        }
    }
    let text = |e: &Expr| match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)),
            _,
        ) => Some(s.clone()),
        _ => None,
    };
    match filter {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Eq,
            right,
        }) => match (column(left), column(right)) {
            (Some(axis), None) => Some((axis, BTreeSet::from([text(right)?]))),
            (None, Some(axis)) => Some((axis, BTreeSet::from([text(left)?]))),
            _ => None,
        },
        // The optimizer writes short IN lists as ORs of equalities.
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::Or,
            right,
        }) => {
            let (a, mut names_a) = names(left)?;
            let (b, names_b) = names(right)?;
            (a == b).then(|| {
                names_a.extend(names_b);
                (a, names_a)
            })
        }
        Expr::InList(list) if !list.negated => {
            let axis = column(&list.expr)?;
            let names = list.list.iter().map(text).collect::<Option<_>>()?;
            Some((axis, names))
        }
        _ => None,
    }
}

/// A SQL predicate on an index column that selects exactly `names`.
fn in_list(column: &str, names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        return "false".into();
    }
    let quoted: Vec<String> = names
        .iter()
        .map(|n| format!("'{}'", n.replace('\'', "''")))
        .collect();
    format!("\"{column}\" IN ({})", quoted.join(", "))
}

#[async_trait]
impl TableProvider for LongTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::common::Result<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| match names(f) {
                Some(_) => TableProviderFilterPushDown::Inexact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        // Filters are ANDed: each axis keeps the names every filter on it allows.
        let (mut obs, mut var): (Option<BTreeSet<String>>, Option<BTreeSet<String>>) = (None, None);
        for (axis, allowed) in filters.iter().filter_map(names) {
            let slot = match axis {
                Axis::Obs => &mut obs,
                Axis::Var => &mut var,
            };
            *slot = Some(match slot.take() {
                None => allowed,
                Some(known) => known.intersection(&allowed).cloned().collect(),
            });
        }
        let mut request = self.request.clone();
        request.filter = obs.map(|names| in_list("obs_names", &names));
        request.var_filter = var.map(|names| in_list("var_names", &names));
        let ctx = self.planner.session_with(state.config().clone());
        let opened = self
            .planner
            .open(&ctx, &self.source, &request)
            .await
            .map_err(datafusion::error::DataFusionError::from)?;
        opened.table.scan(state, projection, &[], limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col, lit};

    #[test]
    fn understands_name_equality_and_lists_only() {
        let (axis, names_) = names(&col("var_name").eq(lit("CD3E"))).expect("equality");
        assert_eq!((axis, names_.len()), (Axis::Var, 1));
        let (axis, names_) =
            names(&col("obs_name").in_list(vec![lit("a"), lit("b")], false)).expect("list");
        assert_eq!((axis, names_.len()), (Axis::Obs, 2));
        assert!(names(&col("obs_name").in_list(vec![lit("a")], true)).is_none());
        assert!(names(&col("value").eq(lit("a"))).is_none());
        assert!(names(&col("var_name").gt(lit("a"))).is_none());
        let either = col("obs_name")
            .eq(lit("a"))
            .or(col("obs_name").eq(lit("b")));
        assert_eq!(names(&either).map(|(_, n)| n.len()), Some(2));
        let mixed = col("obs_name")
            .eq(lit("a"))
            .or(col("var_name").eq(lit("b")));
        assert!(names(&mixed).is_none());
        assert_eq!(
            in_list("obs_names", &BTreeSet::from(["it's".to_string()])),
            "\"obs_names\" IN ('it''s')"
        );
        assert_eq!(in_list("var_names", &BTreeSet::new()), "false");
    }
}
