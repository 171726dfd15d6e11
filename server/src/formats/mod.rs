//! One module per format. Each turns a located artifact into a DataFusion [`TableProvider`], so
//! planning, pushdown and streaming above it are shared. Adding a format is adding a module and
//! one line in [`FORMATS`].

mod array;
mod blocks;
mod listing;
mod tree;

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::TableProvider;
use datafusion::common::stats::Precision;
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::storage::Located;
pub use array::ReadMetrics;
pub use listing::Listing;
pub use tree::ArrayTree;
pub(crate) use tree::{add_column, json_values};

/// How a matrix element is laid out on the wire (docs/PROTOCOL.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Dense,
    Sparse,
    Wide,
    /// One row per entry: `obs_name`, `var_name`, `value`; nonzeros only for sparse storage. SQL
    /// reads X this way, as `KEY/X`.
    Long,
}

/// What to open: an element and the selection a command asks for.
///
/// Formats whose elements are plain tables leave `filter` and `columns` to the planner; AnnData
/// applies them itself, because a filter on `obs` selects the rows of `X`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadRequest {
    pub element: Vec<String>,
    pub filter: Option<String>,
    pub columns: Option<Vec<String>>,
    pub var_filter: Option<String>,
    pub var_names: Option<Vec<String>>,
    pub obs_range: Option<[u64; 2]>,
    /// Rows of `obs` by position, as validated runs (see `query::Command`).
    pub obs_ranges: Option<Vec<[u64; 2]>>,
    pub layout: Option<Layout>,
}

impl ReadRequest {
    /// Just an element, no selection.
    pub fn element(element: &[String]) -> Self {
        Self {
            element: element.to_vec(),
            ..Default::default()
        }
    }

    /// Fields that only AnnData elements understand, if any is set.
    pub fn matrix_option(&self) -> Option<&'static str> {
        if self.var_filter.is_some() {
            Some("var_filter")
        } else if self.var_names.is_some() {
            Some("var_names")
        } else if self.obs_range.is_some() {
            Some("obs_range")
        } else if self.obs_ranges.is_some() {
            Some("obs_ranges")
        } else if self.layout.is_some() {
            Some("layout")
        } else {
            None
        }
    }
}

/// An opened element.
pub struct Opened {
    pub table: Arc<dyn TableProvider>,
    /// True if the table already applies the request's `filter` and `columns`.
    pub selected: bool,
}

/// What registration learns about an artifact by opening it.
#[derive(Debug, Clone, Default)]
pub struct Inspection {
    pub otype: Option<String>,
    pub n_observations: Option<u64>,
    /// The table's schema, kept in the catalog for listings.
    pub schema: Option<arrow::datatypes::SchemaRef>,
}

/// A readable format.
#[async_trait]
pub trait Format: Send + Sync {
    /// A short name for messages.
    fn name(&self) -> &'static str;

    /// Whether this format reads artifacts with `suffix` (for a folder of shards, `""`, the
    /// suffix of its files is passed).
    fn claims(&self, suffix: &str) -> bool;

    /// Opens the requested element of the artifact (no element: its main table).
    async fn open(
        &self,
        ctx: &SessionContext,
        located: &Located,
        request: &ReadRequest,
    ) -> Result<Opened>;

    /// The artifact's structure for `describe` and flight metadata (AnnData's shape and elements,
    /// an HDF5/zarr tree), if it has one. Without `values`, nested data (AnnData's `uns`) is
    /// listed by name only, which reads no arrays.
    async fn describe(
        &self,
        _located: &Located,
        _values: bool,
    ) -> Result<Option<serde_json::Value>> {
        Ok(None)
    }

    /// Whether artifacts of this format have a structure (elements, shapes) for [`describe`]:
    /// callers that only want a structure skip the others without opening them.
    ///
    /// [`describe`]: Format::describe
    fn has_structure(&self) -> bool {
        false
    }

    /// The SQL tables an artifact shows, as element paths: `[[]]`, the default, is the artifact
    /// as one table. `otype` is the object type registration recorded.
    fn sql_tables(&self, _otype: Option<&str>) -> Vec<Vec<String>> {
        vec![Vec::new()]
    }

    /// How SQL reads `element` of artifact `key`: the request to open, `None` if the path names no
    /// table, or an error that says which paths do.
    fn sql_request(&self, _key: &str, element: &[String]) -> Result<Option<ReadRequest>> {
        Ok(element.is_empty().then(ReadRequest::default))
    }

    /// What registration records: the object type and the number of observations, where known
    /// without a full scan.
    async fn inspect(&self, ctx: &SessionContext, located: &Located) -> Result<Inspection> {
        let table = self
            .open(ctx, located, &ReadRequest::default())
            .await?
            .table;
        let plan = table
            .scan(&ctx.state(), None, &[], None)
            .await
            .map_err(Error::from_datafusion)?;
        let rows = match crate::dataframe::statistics(plan.as_ref()).map(|s| s.num_rows) {
            Some(Precision::Exact(n)) => Some(n as u64),
            _ => None,
        };
        Ok(Inspection {
            otype: Some("DataFrame".into()),
            n_observations: rows,
            schema: Some(table.schema()),
        })
    }
}

/// Every format this build reads.
pub static FORMATS: &[&dyn Format] = &[&Listing, &ArrayTree];

/// The format of an artifact recorded with `suffix`, for decisions made from the catalog alone
/// (SQL tables, structure). A folder of shards (`""`) reads as a listing.
pub fn format_of(suffix: &str) -> &'static dyn Format {
    FORMATS
        .iter()
        .copied()
        .find(|f| f.claims(suffix))
        .unwrap_or(&Listing)
}

/// The suffix recorded for an artifact: the file's extension, `.zarr` for a zarr store, or `""` for
/// a plain folder of shards.
pub fn artifact_suffix(located: &Located) -> String {
    let name = located
        .url
        .path_segments()
        .and_then(|mut s| s.rfind(|s| !s.is_empty()).map(str::to_string))
        .unwrap_or_default();
    match name.rfind('.') {
        Some(dot) if !located.is_folder || name.ends_with(".zarr") => {
            name[dot..].to_ascii_lowercase()
        }
        _ => String::new(),
    }
}

/// The suffix that picks the format: the artifact's own, or for a folder its files' most common one.
fn format_suffix(located: &Located, suffix: &str) -> String {
    if !suffix.is_empty() {
        return suffix.to_string();
    }
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for file in &located.files {
        if let Some(ext) = file.location.extension() {
            *counts
                .entry(format!(".{}", ext.to_ascii_lowercase()))
                .or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(ext, _)| ext)
        .unwrap_or_default()
}

/// The format that reads `located`.
pub fn format_for(located: &Located, suffix: &str) -> Result<&'static dyn Format> {
    let suffix = format_suffix(located, suffix);
    FORMATS
        .iter()
        .copied()
        .find(|f| f.claims(&suffix))
        .ok_or_else(|| {
            Error::invalid(format!(
                "no reader for '{}' (suffix '{suffix}')",
                located.url
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::{Layout, format_of};
    use crate::error::Error;

    fn path(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_record_suffix_picks_its_format() {
        for suffix in [".h5ad", ".h5", ".zarr"] {
            assert!(format_of(suffix).has_structure(), "{suffix}");
        }
        // A folder of shards and plain files read as one table.
        for suffix in ["", ".parquet", ".csv", ".arrow"] {
            let format = format_of(suffix);
            assert!(!format.has_structure(), "{suffix}");
            assert_eq!(format.sql_tables(None), vec![Vec::<String>::new()]);
            assert!(matches!(format.sql_request("k", &[]), Ok(Some(_))));
            assert!(matches!(format.sql_request("k", &path(&["obs"])), Ok(None)));
        }
    }

    #[test]
    fn an_anndata_shows_its_elements_to_sql() -> Result<(), Box<dyn std::error::Error>> {
        let tree = format_of(".h5ad");
        assert_eq!(
            tree.sql_tables(Some("AnnData")),
            vec![path(&["obs"]), path(&["var"]), path(&["X"])]
        );
        // SpatialData and other trees list no tables, yet a SpatialData table reads by its path.
        assert!(tree.sql_tables(Some("SpatialData")).is_empty());
        assert!(tree.sql_tables(None).is_empty());
        let x = tree
            .sql_request("k", &path(&["X"]))?
            .ok_or("X is a table")?;
        assert_eq!(x.layout, Some(Layout::Long));
        let obs = tree.sql_request("k", &path(&["tables", "t", "obs"]))?;
        assert_eq!(obs.map(|r| r.layout), Some(None));
        assert!(tree.sql_request("k", &path(&["uns"]))?.is_none());
        // The bare key names no one table: the error says which do.
        match tree.sql_request("k", &[]) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("\"k/obs\""), "{m}"),
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        Ok(())
    }
}
