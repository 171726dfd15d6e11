//! Parquet, CSV and Arrow IPC files, single or as folders of (hive-partitioned) shards, through
//! DataFusion's listing tables: partition pruning, row-group and page statistics, projection and
//! limit pushdown come from there.

use std::sync::Arc;

use arrow::datatypes::DataType;
use async_trait::async_trait;
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::logical_expr::{Expr, cast, lit, when};
use datafusion::prelude::SessionContext;

use super::{Format, Opened, ReadRequest};
use crate::error::{Error, Result};
use crate::storage::Located;

/// The listing-table formats.
pub struct Listing;

/// pyarrow writes this for a null partition value.
const HIVE_NULL: &str = "__HIVE_DEFAULT_PARTITION__";

#[async_trait]
impl Format for Listing {
    fn name(&self) -> &'static str {
        "parquet/csv/arrow"
    }

    fn claims(&self, suffix: &str) -> bool {
        matches!(suffix, ".parquet" | ".csv" | ".arrow" | ".feather" | ".ipc")
    }

    async fn open(
        &self,
        ctx: &SessionContext,
        located: &Located,
        request: &ReadRequest,
    ) -> Result<Opened> {
        if let Some(option) = request.matrix_option() {
            return Err(Error::invalid(format!(
                "'{option}' applies to AnnData matrix elements only"
            )));
        }
        if let Some(first) = request.element.first() {
            return Err(Error::not_found(format!(
                "element '{first}' does not exist: '{}' is a table without elements",
                located.url
            )));
        }
        let ext = super::format_suffix(located, "");
        let state = ctx.state();
        let format: Arc<dyn FileFormat> = match ext.as_str() {
            // Built from the session's options, so that pruning and page-index settings apply.
            ".parquet" => Arc::new(
                ParquetFormat::default().with_options(state.table_options().parquet.clone()),
            ),
            ".csv" => Arc::new(CsvFormat::default().with_has_header(true)),
            _ => Arc::new(ArrowFormat),
        };
        let partitions = if located.is_folder {
            hive_partitions(located)?
        } else {
            Vec::new()
        };
        // DataFusion reads a partition value as a literal of its column's type, so a null
        // partition (pyarrow's `__HIVE_DEFAULT_PARTITION__`) is listed as text and turned into
        // a null of the column's type above the listing.
        let nulls: Vec<(String, DataType)> = partitions
            .iter()
            .filter(|p| p.has_null)
            .map(|p| (p.name.clone(), p.data_type.clone()))
            .collect();
        let partitions: Vec<(String, DataType)> = partitions
            .into_iter()
            .map(|p| {
                let listed = if p.has_null {
                    DataType::Utf8
                } else {
                    p.data_type
                };
                (p.name, listed)
            })
            .collect();
        let table_url =
            ListingTableUrl::parse(located.url.as_str()).map_err(Error::from_datafusion)?;
        let options = ListingOptions::new(format)
            .with_file_extension(ext)
            .with_table_partition_cols(partitions);
        let schema = options
            .infer_schema(&state, &table_url)
            .await
            .map_err(|e| read_error(located, e))?;
        let config = ListingTableConfig::new(table_url)
            .with_listing_options(options)
            .with_schema(schema);
        let table = ListingTable::try_new(config).map_err(|e| read_error(located, e))?;
        let table: Arc<dyn TableProvider> = Arc::new(table);
        if nulls.is_empty() {
            return Ok(Opened {
                table,
                selected: false,
            });
        }
        let columns = table
            .schema()
            .fields()
            .iter()
            .map(|field| {
                let column = Expr::Column(Column::new_unqualified(field.name()));
                match nulls.iter().find(|(name, _)| name == field.name()) {
                    None => Ok(column),
                    Some((name, data_type)) => Ok(cast(
                        when(
                            column.clone().eq(lit(HIVE_NULL)),
                            lit(ScalarValue::Utf8(None)),
                        )
                        .otherwise(column)?,
                        data_type.clone(),
                    )
                    .alias(name)),
                }
            })
            .collect::<datafusion::error::Result<Vec<_>>>()
            .map_err(Error::from_datafusion)?;
        let view = ctx
            .read_table(table)
            .and_then(|df| df.select(columns))
            .map_err(Error::from_datafusion)?
            .into_view();
        Ok(Opened {
            table: view,
            selected: false,
        })
    }
}

fn read_error(located: &Located, e: datafusion::error::DataFusionError) -> Error {
    match Error::from_datafusion(e) {
        Error::Query(e) => Error::DataLoss {
            location: located.url.to_string(),
            message: e.to_string(),
        },
        other => other,
    }
}

/// A partition column from `key=value` folder names.
struct Partition {
    name: String,
    data_type: DataType,
    /// Some folder names it null (`key=__HIVE_DEFAULT_PARTITION__`).
    has_null: bool,
}

/// Partition columns from `key=value` folder names, typed as pyarrow.dataset infers them:
/// Int32 when every value is an integer that fits, else Utf8; `__HIVE_DEFAULT_PARTITION__` is
/// null of either.
fn hive_partitions(located: &Located) -> Result<Vec<Partition>> {
    // Name, all values integers, some value null.
    let mut columns: Option<Vec<(String, bool, bool)>> = None;
    for file in &located.files {
        let rel = located.relative(file);
        let dirs: Vec<&str> = rel.split('/').collect();
        let pairs: Vec<(&str, &str)> = dirs[..dirs.len().saturating_sub(1)]
            .iter()
            .filter_map(|d| d.split_once('='))
            .collect();
        match &mut columns {
            None => {
                columns = Some(
                    pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), is_int32(v), *v == HIVE_NULL))
                        .collect(),
                );
            }
            Some(known) => {
                if known.len() != pairs.len()
                    || known.iter().zip(&pairs).any(|((k, _, _), (k2, _))| k != k2)
                {
                    return Err(Error::invalid(format!(
                        "'{}' mixes partition layouts: '{rel}' does not follow the others",
                        located.url
                    )));
                }
                for ((_, int, null), (_, v)) in known.iter_mut().zip(&pairs) {
                    *int &= is_int32(v);
                    *null |= *v == HIVE_NULL;
                }
            }
        }
    }
    Ok(columns
        .unwrap_or_default()
        .into_iter()
        .map(|(name, int, has_null)| Partition {
            name,
            data_type: if int { DataType::Int32 } else { DataType::Utf8 },
            has_null,
        })
        .collect())
}

fn is_int32(value: &str) -> bool {
    value == HIVE_NULL || value.parse::<i32>().is_ok()
}
