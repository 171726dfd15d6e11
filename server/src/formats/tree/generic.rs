//! Generic HDF5 and zarr datasets, `[KEY, "group/sub/dataset"]`: a 1-D dataset is one column
//! `values`, a 2-D one is `values: FixedSizeList<T, n_cols>`, one row per row, read in blocks of
//! whole chunks.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, FixedSizeListArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::TableProvider;
use datafusion::prelude::SessionContext;

use super::blocking;
use crate::error::{Error, Result};
use crate::formats::array::{ArrayInfo, ArrayStore, Node, ReadMetrics, data_loss};
use crate::formats::blocks::{BlockSource, BlockTable, split_range};

/// Bytes per record batch.
const BLOCK_BYTES: u64 = 8 << 20;
/// Bytes per endpoint, above which a dataset splits into several.
const ENDPOINT_BYTES: u64 = 64 << 20;

/// Opens the dataset that `element` names (its path, as one string or as parts).
pub(super) async fn open(
    ctx: &SessionContext,
    store: Arc<dyn ArrayStore>,
    element: &[String],
) -> Result<Arc<dyn TableProvider>> {
    let path = element.join("/");
    let s = Arc::clone(&store);
    let (path, info) = blocking(move || resolve(s.as_ref(), &path)).await?;
    let rows = info.shape.first().copied().unwrap_or(1) as usize;
    let row_bytes = (info.row_len().max(1) * info.dtype.width()).max(1);
    let target = ctx.state().config().target_partitions().max(1);
    let parts = ((rows as u64 * row_bytes).div_ceil(ENDPOINT_BYTES) as usize).clamp(1, target);
    let block = (BLOCK_BYTES / row_bytes).max(1) as usize;
    let partitions = split_range(rows, block, parts, info.row_chunk());
    let source = Dataset::new(store, path, info)?;
    Ok(Arc::new(BlockTable::new(Arc::new(source), partitions)))
}

/// The dataset at `path`; without a path, the store's only dataset.
fn resolve(store: &dyn ArrayStore, path: &str) -> Result<(String, ArrayInfo)> {
    let location = store.location();
    match store.node(path)? {
        Some(Node::Array(info)) => Ok((path.to_string(), info)),
        Some(Node::Group) => {
            let children = store.children(path)?;
            if path.is_empty()
                && children.len() == 1
                && let Some(Node::Array(info)) = store.node(&children[0])?
            {
                return Ok((children[0].clone(), info));
            }
            Err(Error::not_found(format!(
                "'{}' in {location} is a group, not a dataset; name a dataset as \
                 [KEY, \"group/sub/dataset\"] (its children: {children:?})",
                if path.is_empty() { "/" } else { path }
            )))
        }
        None => Err(Error::not_found(format!(
            "no dataset '{path}' in {location}"
        ))),
    }
}

/// One dataset read in row blocks.
#[derive(Debug)]
struct Dataset {
    store: Arc<dyn ArrayStore>,
    path: String,
    info: ArrayInfo,
    schema: SchemaRef,
}

impl Dataset {
    fn new(store: Arc<dyn ArrayStore>, path: String, info: ArrayInfo) -> Result<Self> {
        let value = info.dtype.arrow();
        let data_type = match info.shape.len() {
            0 | 1 => value,
            2 => {
                let n = i32::try_from(info.shape[1]).map_err(|_| {
                    Error::invalid(format!("dataset '{path}' has too many columns"))
                })?;
                DataType::FixedSizeList(Arc::new(Field::new("item", value, true)), n)
            }
            d => {
                return Err(Error::invalid(format!(
                    "dataset '{path}' in {} has {d} dimensions; 1-D and 2-D datasets are served",
                    store.location()
                )));
            }
        };
        let mut metadata = std::collections::HashMap::new();
        metadata.insert(
            "artiflight:shape".to_string(),
            serde_json::json!(info.shape).to_string(),
        );
        let schema = Arc::new(Schema::new_with_metadata(
            vec![Field::new("values", data_type, false)],
            metadata,
        ));
        Ok(Self {
            store,
            path,
            info,
            schema,
        })
    }
}

impl BlockSource for Dataset {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn read(&self, rows: Range<usize>, projection: Option<&[usize]>) -> Result<RecordBatch> {
        let values: ArrayRef = if self.info.shape.is_empty() {
            self.store.read(&self.path, &[], &[])?
        } else {
            self.store
                .read_rows(&self.path, &self.info, rows.start as u64..rows.end as u64)?
        };
        let column: ArrayRef = match self.schema.field(0).data_type() {
            DataType::FixedSizeList(item, n) => Arc::new(
                FixedSizeListArray::try_new(Arc::clone(item), *n, values, None).map_err(|e| {
                    data_loss(self.store.location(), format!("'{}': {e}", self.path))
                })?,
            ),
            _ => values,
        };
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), vec![column])
            .map_err(|e| data_loss(self.store.location(), format!("'{}': {e}", self.path)))?;
        match projection {
            Some(p) => batch
                .project(p)
                .map_err(|e| Error::internal_from(format!("projecting '{}'", self.path), e)),
            None => Ok(batch),
        }
    }

    fn metrics(&self) -> ReadMetrics {
        self.store.metrics()
    }

    fn describe(&self) -> String {
        format!("dataset '{}' of {}", self.path, self.store.location())
    }
}
