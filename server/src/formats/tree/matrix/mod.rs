//! Matrix elements (`X`, `layers`, `obsm`, `varm`, `obsp`, `varp`) read for a selection of rows and
//! columns, in the wire layouts of docs/PROTOCOL.md section 5.
//!
//! Reads are chunk-aware. Selected rows are coalesced into runs: rows in the same chunk (zarr, or
//! chunked HDF5) or a few rows apart (contiguous HDF5) are read as one block, and nothing outside
//! the runs is touched; selected columns are grouped into runs the same way. For CSR, `indptr` is
//! read once and then only the `indices`/`data` ranges of the selected rows. CSC is converted to
//! CSR one block of rows at a time, from the selected columns' ranges, so memory stays bounded.
//!
//! Every storage answers the same: rows and columns come in the order selected, a name repeated
//! in `var_names` repeats its column, and an empty selection has zero width.
//!
//! This file lays out a selection's schema and builds each batch; [`stored`] opens a matrix,
//! [`index`] does the position arithmetic, and [`dense`] and [`sparse`] read the two encodings.
//! It is long because the schema and the batches of every output (four layouts, embeddings,
//! pairs) must agree field by field, and read best side by side.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, FixedSizeListArray, Int32Array, Int64Array, ListArray, RecordBatch,
    RecordBatchOptions, UInt64Array, new_empty_array, new_null_array,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::{cast, concat, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::super::array::{ArrayStore, Dtype, ReadMetrics, data_loss};
use super::super::blocks::BlockSource;
use crate::error::{Error, Result};
use crate::formats::Layout;

mod dense;
mod index;
mod sparse;
mod stored;

use index::ColumnMap;
use stored::Sparse;
pub(crate) use stored::{Encoding, Matrix};

use sparse::densify;

/// Bytes of matrix data per record batch (and per block read).
const BLOCK_BYTES: u64 = 8 << 20;
/// Entries a CSC block is expected to hold: its conversion keeps this many in memory.
const CSC_BLOCK_ENTRIES: u128 = 2 << 20;

/// The rows and columns a request selects from a matrix.
#[derive(Debug, Clone)]
pub(crate) struct Selection {
    /// Row positions in output order: ascending for obs selections; for varm/varp, the order
    /// `var_names` gives, repeats included.
    pub rows: Vec<u64>,
    /// The selected rows' index columns (names, obs columns sent along), in row order.
    pub index: RecordBatch,
    /// Column positions in output order; `None` for every column.
    pub cols: Option<Vec<u64>>,
    /// The selected columns' names, for the wide layout and the schema metadata.
    pub col_names: Option<Vec<String>>,
}

/// What one output row carries.
#[derive(Debug, Clone)]
pub(crate) enum Output {
    /// X and layers: `layout` with the matrix column named `name`.
    Matrix { layout: Layout, name: String },
    /// obsm/varm: `values: FixedSizeList<T, k>`.
    Embedding,
    /// obsp/varp: COO rows `row`, `col`, `value` within the selection.
    Pairs,
}

/// A matrix element restricted to selected rows and columns.
#[derive(Debug)]
pub(crate) struct MatrixSource {
    store: Arc<dyn ArrayStore>,
    element: String,
    encoding: Encoding,
    dtype: Dtype,
    /// Selected row positions, in output order.
    rows: Vec<u64>,
    /// Index columns (names, extra obs columns) of the selected rows, in order.
    index: RecordBatch,
    /// Selected column positions in output order; `None` for all.
    cols: Option<Vec<u64>>,
    n_cols: u64,
    /// The stored matrix's shape.
    shape: [u64; 2],
    output: Output,
    schema: SchemaRef,
    /// Long layout: the selected rows' and columns' names, as strings.
    names: Option<(ArrayRef, ArrayRef)>,
    /// Where the selected stored columns go; `None` for every column as stored.
    columns: Option<ColumnMap>,
}

/// Rows of a sparse matrix: `offsets` per row, column positions within the selection, values.
#[derive(Debug, Clone)]
struct SparseBlock {
    offsets: Vec<i32>,
    indices: Vec<i32>,
    data: ArrayRef,
}

impl MatrixSource {
    pub(crate) fn new(
        store: Arc<dyn ArrayStore>,
        element: &str,
        matrix: Matrix,
        selection: Selection,
        output: Output,
    ) -> Result<Self> {
        let Matrix {
            encoding,
            shape,
            dtype,
        } = matrix;
        let Selection {
            rows,
            index,
            cols,
            col_names,
        } = selection;
        // Positions come from obs and var, which may disagree with a corrupt matrix's shape:
        // every one is checked here, so no read below can fall outside the stored matrix.
        let location = store.location();
        if let Some(row) = rows.iter().find(|&&r| r >= shape[0]) {
            return Err(data_loss(
                location,
                format!("'{element}' has {} rows; row {row} is selected", shape[0]),
            ));
        }
        if let Some(col) = cols.iter().flatten().find(|&&c| c >= shape[1]) {
            return Err(data_loss(
                location,
                format!(
                    "'{element}' has {} columns; column {col} is selected",
                    shape[1]
                ),
            ));
        }
        let columns = match &cols {
            None => None,
            Some(cols) => Some(ColumnMap::new(cols).ok_or_else(|| {
                Error::invalid(format!("too many columns selected from '{element}'"))
            })?),
        };
        let n_cols = cols.as_ref().map(|c| c.len() as u64).unwrap_or(shape[1]);
        let value = dtype.arrow();
        let mut fields: Vec<Field> = index
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let list = |name: &str, n: u64| -> Result<Field> {
            let n = i32::try_from(n).map_err(|_| {
                Error::invalid(format!("'{element}' has too many columns for one row"))
            })?;
            Ok(Field::new(
                name,
                DataType::FixedSizeList(Arc::new(Field::new("item", value.clone(), true)), n),
                false,
            ))
        };
        match &output {
            Output::Matrix {
                layout: Layout::Dense,
                name,
            } => fields.push(list(name, n_cols)?),
            Output::Matrix {
                layout: Layout::Sparse,
                ..
            } => {
                fields.push(Field::new(
                    "indices",
                    DataType::new_list(DataType::Int32, true),
                    false,
                ));
                fields.push(Field::new(
                    "data",
                    DataType::new_list(value.clone(), true),
                    false,
                ));
            }
            Output::Matrix {
                layout: Layout::Wide,
                ..
            } => {
                let names = col_names.clone().unwrap_or_default();
                let mut seen = std::collections::HashSet::new();
                for name in &names {
                    if !seen.insert(name.as_str()) || fields.iter().any(|f| f.name() == name) {
                        return Err(Error::invalid(format!(
                            "the wide layout needs unique column names, but '{name}' occurs twice in \
                             '{element}': select variables with var_names or use the dense layout"
                        )));
                    }
                }
                for name in names {
                    fields.push(Field::new(name, value.clone(), false));
                }
            }
            Output::Matrix {
                layout: Layout::Long,
                ..
            } => {
                fields = vec![
                    Field::new("obs_name", DataType::Utf8, false),
                    Field::new("var_name", DataType::Utf8, false),
                    Field::new("value", value.clone(), false),
                ];
            }
            Output::Embedding => fields.push(list("values", n_cols)?),
            Output::Pairs => {
                fields = vec![
                    Field::new("row", DataType::Int64, false),
                    Field::new("col", DataType::Int64, false),
                    Field::new("value", value.clone(), false),
                ];
            }
        }
        let mut metadata = std::collections::HashMap::new();
        // The long layout is SQL's `KEY/X`: a plain table whose schema must not change with the
        // selection a query pushes into it.
        let long = matches!(
            output,
            Output::Matrix {
                layout: Layout::Long,
                ..
            }
        );
        if !long {
            metadata.insert(
                "artiflight:shape".to_string(),
                serde_json::json!([rows.len(), n_cols]).to_string(),
            );
        }
        if let (Output::Matrix { .. }, Some(names), false) = (&output, &col_names, long) {
            metadata.insert(
                "artiflight:var_names".to_string(),
                serde_json::to_string(names).unwrap_or_default(),
            );
        }
        let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
        let names = match (&output, &col_names) {
            (
                Output::Matrix {
                    layout: Layout::Long,
                    ..
                },
                Some(col_names),
            ) if index.num_columns() > 0 => {
                let obs = cast(index.column(0), &DataType::Utf8).map_err(|e| {
                    Error::internal_from(format!("'{element}': row names are not strings"), e)
                })?;
                let vars: ArrayRef = Arc::new(arrow::array::StringArray::from_iter_values(
                    col_names.iter(),
                ));
                Some((obs, vars))
            }
            (
                Output::Matrix {
                    layout: Layout::Long,
                    ..
                },
                _,
            ) => {
                return Err(Error::internal(format!(
                    "'{element}': the long layout needs row and column names"
                )));
            }
            _ => None,
        };
        Ok(Self {
            store,
            element: element.to_string(),
            encoding,
            dtype,
            rows,
            index,
            cols,
            n_cols,
            shape,
            output,
            schema,
            names,
            columns,
        })
    }

    /// Selected row positions (for partitioning).
    pub(crate) fn rows(&self) -> &[u64] {
        &self.rows
    }

    /// Rows per block so that a block holds about [`BLOCK_BYTES`] of values.
    pub(crate) fn block_rows(&self) -> usize {
        // The long layout repeats both names with every entry: budget for them too.
        let entry = match self.output {
            Output::Matrix {
                layout: Layout::Long,
                ..
            } => self.dtype.width() + 32,
            _ => self.dtype.width(),
        };
        let row_bytes = self.n_cols.max(1).saturating_mul(entry).max(1);
        let rows = (BLOCK_BYTES / row_bytes).max(1);
        match &self.encoding {
            // A CSC block reads the selected columns' ranges once: blocks are sized by the
            // entries they are expected to hold, so that few passes cover the selection.
            Encoding::Sparse(s) if s.csc => {
                let nnz = s.indptr.last().copied().unwrap_or(0).max(0) as u128;
                let cells = (u128::from(self.shape[0]) * u128::from(self.shape[1])).max(1);
                let per_row = (nnz * u128::from(self.n_cols) / cells).max(1);
                let by_entries = u64::try_from(CSC_BLOCK_ENTRIES / per_row).unwrap_or(u64::MAX);
                rows.max(by_entries).max(1) as usize
            }
            _ => rows as usize,
        }
    }

    /// Bytes of the selected values if dense.
    pub(crate) fn dense_bytes(&self) -> u64 {
        (self.rows.len() as u64)
            .saturating_mul(self.n_cols)
            .saturating_mul(self.dtype.width())
    }

    fn fail(&self, what: impl std::fmt::Display) -> Error {
        data_loss(self.store.location(), format!("'{}': {what}", self.element))
    }

    /// Rows `range` of the selection in the long layout: every entry of dense storage, the nonzeros
    /// of sparse storage. Without `values` nothing but the structure is read.
    fn long_rows(&self, range: Range<usize>, values: bool) -> Result<Vec<ArrayRef>> {
        let (obs, vars) = self
            .names
            .as_ref()
            .ok_or_else(|| self.fail("the long layout needs row and column names"))?;
        let n = range.len();
        let (row, col, values) = match &self.encoding {
            Encoding::Sparse(_) => {
                let block = self.sparse_rows(range.clone(), values)?;
                let mut row = Vec::with_capacity(block.indices.len());
                for r in 0..n {
                    let count = (block.offsets[r + 1] - block.offsets[r]) as usize;
                    row.extend(std::iter::repeat_n((range.start + r) as u64, count));
                }
                let col = block.indices.iter().map(|&c| c as u64).collect();
                (row, col, block.data)
            }
            Encoding::Dense { .. } => {
                let n_cols = self.n_cols;
                let entries = (n as u64).saturating_mul(n_cols) as usize;
                let values = if values {
                    self.dense_rows(range.clone())?
                } else {
                    new_null_array(&self.dtype.arrow(), entries)
                };
                let row = (0..n as u64)
                    .flat_map(|r| std::iter::repeat_n(range.start as u64 + r, n_cols as usize))
                    .collect();
                let col: Vec<u64> = (0..n as u64).flat_map(|_| 0..n_cols).collect();
                (row, col, values)
            }
        };
        let obs = take(obs, &UInt64Array::from(row), None).map_err(|e| self.fail(e))?;
        let vars = take(vars, &UInt64Array::from(col), None).map_err(|e| self.fail(e))?;
        Ok(vec![obs, vars, values])
    }
}

fn concat_or_empty(parts: &[ArrayRef], dtype: &DataType) -> Result<ArrayRef, String> {
    match parts {
        [] => Ok(new_empty_array(dtype)),
        [one] => Ok(Arc::clone(one)),
        many => {
            let refs: Vec<&dyn Array> = many.iter().map(|a| a.as_ref()).collect();
            concat(&refs).map_err(|e| e.to_string())
        }
    }
}

impl BlockSource for MatrixSource {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn read(&self, range: Range<usize>, projection: Option<&[usize]>) -> Result<RecordBatch> {
        let n = range.len();
        let n_cols = self.n_cols;
        let wants = |i: usize| projection.is_none_or(|p| p.contains(&i));
        // Columns that the projection drops are never read: placeholders of the right length
        // stand in for them until the batch is projected.
        let mut columns: Vec<ArrayRef> = Vec::new();
        let rows = match &self.output {
            Output::Pairs => {
                let block = self.sparse_rows(range.clone(), wants(2))?;
                let mut row = Vec::with_capacity(block.indices.len());
                for r in 0..n {
                    let count = (block.offsets[r + 1] - block.offsets[r]) as usize;
                    row.extend(std::iter::repeat_n((range.start + r) as i64, count));
                }
                columns.push(Arc::new(Int64Array::from(row)));
                columns.push(Arc::new(Int64Array::from_iter_values(
                    block.indices.iter().map(|&c| c as i64),
                )));
                columns.push(block.data);
                columns[0].len()
            }
            Output::Matrix {
                layout: Layout::Long,
                ..
            } => {
                columns = self.long_rows(range, wants(2))?;
                columns[0].len()
            }
            output => {
                columns.extend(self.index.slice(range.start, n).columns().iter().cloned());
                let first = columns.len();
                let item = Arc::new(Field::new("item", self.dtype.arrow(), true));
                match output {
                    Output::Matrix {
                        layout: Layout::Sparse,
                        ..
                    } => {
                        let block = self.sparse_rows(range, wants(first + 1))?;
                        let offsets = OffsetBuffer::new(block.offsets.into());
                        let indices = Int32Array::from(block.indices);
                        columns.push(Arc::new(ListArray::new(
                            Arc::new(Field::new("item", DataType::Int32, true)),
                            offsets.clone(),
                            Arc::new(indices),
                            None,
                        )));
                        columns.push(Arc::new(ListArray::new(item, offsets, block.data, None)));
                    }
                    Output::Matrix {
                        layout: Layout::Wide,
                        ..
                    } => {
                        let wanted: Vec<u64> =
                            (0..n_cols).filter(|&c| wants(first + c as usize)).collect();
                        let values = if wanted.is_empty() {
                            None
                        } else {
                            Some(self.dense_rows(range)?)
                        };
                        for c in 0..n_cols {
                            match &values {
                                Some(values) if wants(first + c as usize) => {
                                    let idx = UInt64Array::from_iter_values(
                                        (0..n as u64).map(|r| r * n_cols + c),
                                    );
                                    columns
                                        .push(take(values, &idx, None).map_err(|e| self.fail(e))?);
                                }
                                _ => columns.push(new_null_array(&self.dtype.arrow(), n)),
                            }
                        }
                    }
                    _ => {
                        let size =
                            i32::try_from(n_cols).map_err(|_| self.fail("too many columns"))?;
                        let values = if wants(first) {
                            self.dense_rows(range)?
                        } else {
                            new_null_array(&self.dtype.arrow(), n.saturating_mul(n_cols as usize))
                        };
                        // With no column selected, the list's length cannot be read off its
                        // values: it is the number of rows.
                        columns.push(Arc::new(
                            FixedSizeListArray::try_new_with_length(item, size, values, None, n)
                                .map_err(|e| self.fail(e))?,
                        ));
                    }
                }
                n
            }
        };
        let (schema, columns) = match projection {
            Some(p) => (
                Arc::new(self.schema.project(p).map_err(|e| self.fail(e))?),
                p.iter()
                    .map(|&i| {
                        columns
                            .get(i)
                            .cloned()
                            .ok_or_else(|| self.fail(format!("no column {i}")))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => (Arc::clone(&self.schema), columns),
        };
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        RecordBatch::try_new_with_options(schema, columns, &options).map_err(|e| self.fail(e))
    }

    fn records(&self, rows: usize) -> Option<usize> {
        match (&self.output, &self.encoding) {
            (Output::Pairs, _) => None,
            (
                Output::Matrix {
                    layout: Layout::Long,
                    ..
                },
                Encoding::Dense { .. },
            ) => rows.checked_mul(usize::try_from(self.n_cols).ok()?),
            (
                Output::Matrix {
                    layout: Layout::Long,
                    ..
                },
                Encoding::Sparse(_),
            ) => None,
            _ => Some(rows),
        }
    }

    fn metrics(&self) -> ReadMetrics {
        self.store.metrics()
    }

    fn describe(&self) -> String {
        format!(
            "'{}' of {}, {} of {} rows x {} of {} columns",
            self.element,
            self.store.location(),
            self.rows.len(),
            self.shape[0],
            self.n_cols,
            self.shape[1]
        )
    }
}
