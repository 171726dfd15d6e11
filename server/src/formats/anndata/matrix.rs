//! Matrix elements (`X`, `layers`, `obsm`, `varm`, `obsp`, `varp`) read for a selection of rows and
//! columns, in the wire layouts of SPEC section 5.
//!
//! Reads are chunk-aware. Selected rows are coalesced into runs: rows in the same chunk (zarr, or
//! chunked HDF5) or a few rows apart (contiguous HDF5) are read as one block, and nothing outside
//! the runs is touched; selected columns are grouped into runs the same way. For CSR, `indptr` is
//! read once and then only the `indices`/`data` ranges of the selected rows. CSC is converted to
//! CSR one block of rows at a time, from the selected columns' ranges, so memory stays bounded.
//!
//! Every storage answers the same: rows and columns come in the order selected, a name repeated
//! in `var_names` repeats its column, and an empty selection has zero width.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Int32Array, Int64Array, ListArray,
    RecordBatch, RecordBatchOptions, UInt64Array, new_empty_array, new_null_array,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::{cast, concat, filter, take};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};

use super::super::array::{ArrayInfo, ArrayStore, Dtype, Node, ReadMetrics, data_loss, join};
use super::super::blocks::BlockSource;
use crate::error::{Error, Result};
use crate::formats::Layout;

/// Bytes of matrix data per record batch (and per block read).
const BLOCK_BYTES: u64 = 8 << 20;
/// Entries a CSC block is expected to hold: its conversion keeps this many in memory.
const CSC_BLOCK_ENTRIES: u128 = 2 << 20;

/// How a matrix is stored.
#[derive(Debug, Clone)]
pub(crate) enum Storage {
    Dense { path: String, info: ArrayInfo },
    Sparse(Sparse),
}

/// A `csr_matrix` or `csc_matrix` group.
#[derive(Debug, Clone)]
pub(crate) struct Sparse {
    data: String,
    indices: String,
    data_info: ArrayInfo,
    /// `indptr`, read once.
    indptr: Arc<Vec<i64>>,
    csc: bool,
}

/// A matrix element as stored: its storage, shape and value type.
#[derive(Debug, Clone)]
pub(crate) struct Matrix {
    pub storage: Storage,
    pub shape: [u64; 2],
    pub dtype: Dtype,
}

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

impl Matrix {
    /// Opens the matrix at `path`: a 2-D array, or a sparse group. Anything else is refused,
    /// naming the element.
    pub(crate) fn open(store: &dyn ArrayStore, path: &str) -> Result<Self> {
        let location = store.location();
        match store.node(path)? {
            None => Err(Error::not_found(format!(
                "no element '{path}' in {location}"
            ))),
            Some(Node::Array(info)) => {
                let [rows, cols] = match info.shape.as_slice() {
                    [r, c] => [*r, *c],
                    [r] => [*r, 1],
                    other => {
                        return Err(Error::invalid(format!(
                            "element '{path}' in {location} has {} dimensions; only 1-D and 2-D \
                             matrices are served",
                            other.len()
                        )));
                    }
                };
                let dtype = info.dtype;
                if dtype == Dtype::Utf8 {
                    return Err(Error::invalid(format!(
                        "element '{path}' in {location} is a string array, not a matrix"
                    )));
                }
                Ok(Matrix {
                    storage: Storage::Dense {
                        path: path.to_string(),
                        info,
                    },
                    shape: [rows, cols],
                    dtype,
                })
            }
            Some(Node::Group) => {
                let attrs = store.attrs(path)?;
                let encoding = attrs
                    .get("encoding-type")
                    .and_then(|v| v.as_str())
                    .unwrap_or("(none)");
                let csc = match encoding {
                    "csr_matrix" => false,
                    "csc_matrix" => true,
                    other => {
                        return Err(Error::invalid(format!(
                            "element '{path}' in {location} has encoding '{other}', which cannot be \
                             served as a matrix"
                        )));
                    }
                };
                let shape: Vec<u64> = attrs
                    .get("shape")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                    .unwrap_or_default();
                let [rows, cols] = shape.as_slice() else {
                    return Err(data_loss(
                        location,
                        format!("'{path}' has no valid 'shape'"),
                    ));
                };
                let data = join(path, "data");
                let indices = join(path, "indices");
                let data_info = store.array(&data)?;
                let indices_info = store.array(&indices)?;
                if !matches!(indices_info.dtype, Dtype::Int32 | Dtype::Int64) {
                    return Err(data_loss(
                        location,
                        format!(
                            "'{path}/indices' is {}, not int32 or int64",
                            indices_info.dtype.numpy()
                        ),
                    ));
                }
                let indptr = store.read_all_kept(&join(path, "indptr"))?;
                let indptr = cast(&indptr, &DataType::Int64)
                    .map_err(|e| data_loss(location, format!("'{path}/indptr': {e}")))?;
                let indptr: Vec<i64> = indptr.as_primitive::<Int64Type>().values().to_vec();
                let major = if csc { *cols } else { *rows };
                let nnz = data_info.shape.first().copied().unwrap_or(0);
                let valid = indptr.len() as u64 == major + 1
                    && indptr.windows(2).all(|w| w[0] <= w[1])
                    && indptr.first() == Some(&0)
                    && indptr.last().is_some_and(|&l| l as u64 <= nnz)
                    && indices_info.shape.first().copied().unwrap_or(0) == nnz;
                if !valid {
                    return Err(data_loss(
                        location,
                        format!(
                            "'{path}' is not a valid sparse matrix (indptr does not match its shape)"
                        ),
                    ));
                }
                let dtype = data_info.dtype;
                Ok(Matrix {
                    storage: Storage::Sparse(Sparse {
                        data,
                        indices,
                        data_info,
                        indptr: Arc::new(indptr),
                        csc,
                    }),
                    shape: [*rows, *cols],
                    dtype,
                })
            }
        }
    }
}

impl Storage {
    /// Whether this is a CSC matrix, which is converted to rows one block at a time.
    pub(crate) fn is_csc(&self) -> bool {
        matches!(self, Storage::Sparse(s) if s.csc)
    }

    /// Rows per storage chunk, where partitions should split.
    pub(crate) fn row_chunk(&self) -> u64 {
        match self {
            Storage::Dense { info, .. } => info.row_chunk(),
            Storage::Sparse(_) => 1,
        }
    }
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
    storage: Storage,
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
    /// The selected stored columns, ascending, each with the output position it fills (a column
    /// named twice in `var_names` fills two); `None` for every column as stored.
    targets: Option<Vec<(u64, u32)>>,
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
            storage,
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
        let targets = match &cols {
            None => None,
            Some(cols) => {
                let mut targets = cols
                    .iter()
                    .enumerate()
                    .map(|(new, &old)| {
                        u32::try_from(new).map(|new| (old, new)).map_err(|_| {
                            Error::invalid(format!("too many columns selected from '{element}'"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                targets.sort_unstable();
                Some(targets)
            }
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
                    Error::Internal(format!("'{element}': row names are not strings: {e}"))
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
                return Err(Error::Internal(format!(
                    "'{element}': the long layout needs row and column names"
                )));
            }
            _ => None,
        };
        Ok(Self {
            store,
            element: element.to_string(),
            storage,
            dtype,
            rows,
            index,
            cols,
            n_cols,
            shape,
            output,
            schema,
            names,
            targets,
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
        match &self.storage {
            // A CSC block reads the selected columns' ranges once: blocks are sized by the
            // entries they are expected to hold, so that few passes cover the selection.
            Storage::Sparse(s) if s.csc => {
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

    /// Reads the dense values of `rows` (array positions, ascending and unique),
    /// `rows.len() * n_cols` elements in row-major order, selected columns in output order.
    ///
    /// Rows are coalesced into runs (rows in one chunk, or a small gap apart) and so are the
    /// selected columns; each run of rows is read once per run of columns, so a sparse column
    /// selection reads only the column chunks (or stretches) that hold selected columns.
    fn read_dense(&self, path: &str, info: &ArrayInfo, rows: &[u64]) -> Result<ArrayRef> {
        let two_d = info.shape.len() == 2;
        let width = if two_d { info.shape[1] } else { 1 };
        if rows.is_empty() || self.n_cols == 0 {
            return Ok(new_empty_array(&self.dtype.arrow()));
        }
        let item = self.dtype.width().max(1);
        let col_chunk = info.chunks.as_ref().and_then(|c| c.get(1).copied());
        let (col_runs, col_place) = match &self.targets {
            None => (std::iter::once(0..width).collect::<Vec<_>>(), None),
            Some(targets) => {
                let stored: Vec<u64> = dedup_sorted(targets.iter().map(|t| t.0));
                let runs: Vec<Range<u64>> = coalesce(&stored, |a, b| match col_chunk {
                    Some(c) => a / c.max(1) == b / c.max(1),
                    None => (b - a).saturating_mul(item) <= 64 << 10,
                })
                .into_iter()
                .map(|run| run[0]..run[run.len() - 1] + 1)
                .collect();
                let cols = self.cols.as_deref().unwrap_or_default();
                let place = cols
                    .iter()
                    .map(|c| {
                        let j = runs.partition_point(|r| r.end <= *c);
                        (j, c - runs[j].start)
                    })
                    .collect::<Vec<_>>();
                (runs, Some(place))
            }
        };
        // Rows closer than this are read together: for a chunked array, anything in the same
        // chunk; for a contiguous one, gaps of up to 64 KiB (cheaper than another read call).
        let read_width: u64 = col_runs.iter().map(|r| r.end - r.start).sum();
        let row_bytes = read_width.saturating_mul(item).max(1);
        let row_chunk = info.chunks.as_ref().and_then(|c| c.first().copied());
        let row_runs = coalesce(rows, |a, b| match row_chunk {
            Some(c) => a / c.max(1) == b / c.max(1),
            None => (b - a).saturating_mul(row_bytes) <= 64 << 10,
        });
        let reads: Vec<(usize, usize)> = (0..row_runs.len())
            .flat_map(|k| (0..col_runs.len()).map(move |j| (k, j)))
            .collect();
        let read_one = |&(k, j): &(usize, usize)| -> Result<ArrayRef> {
            let run = row_runs[k];
            let (first, last) = (run[0], run[run.len() - 1]);
            let cols = &col_runs[j];
            let (start, count) = if two_d {
                (
                    vec![first, cols.start],
                    vec![last - first + 1, cols.end - cols.start],
                )
            } else {
                (vec![first], vec![last - first + 1])
            };
            let part = self.store.read(path, &start, &count)?;
            let expected = (last - first + 1) * (cols.end - cols.start);
            if part.len() as u64 != expected {
                return Err(self.fail(format!(
                    "a read of {expected} values returned {}",
                    part.len()
                )));
            }
            Ok(part)
        };
        // Reads run on every core: zarr decodes chunks in parallel, and contiguous HDF5 is read
        // with `pread` (other HDF5 reads queue on libhdf5's lock, which costs nothing more).
        let parts: Vec<ArrayRef> = if reads.len() > 1 {
            use rayon::prelude::*;
            reads.par_iter().map(read_one).collect::<Result<_>>()?
        } else {
            reads.iter().map(read_one).collect::<Result<_>>()?
        };
        let rows_whole = row_runs
            .iter()
            .all(|run| run[run.len() - 1] - run[0] + 1 == run.len() as u64);
        let cols_whole = match &self.cols {
            None => true,
            Some(cols) => {
                col_runs.len() == 1
                    && cols.len() as u64 == read_width
                    && cols
                        .iter()
                        .enumerate()
                        .all(|(i, &c)| c == col_runs[0].start + i as u64)
            }
        };
        if parts.len() == 1 && rows_whole && cols_whole {
            return Ok(Arc::clone(&parts[0]));
        }
        let all = concat_or_empty(&parts, &self.dtype.arrow()).map_err(|e| self.fail(e))?;
        // Where each part starts in `all`.
        let mut base = Vec::with_capacity(parts.len());
        let mut at = 0u64;
        for part in &parts {
            base.push(at);
            at += part.len() as u64;
        }
        let n_out = rows.len().saturating_mul(self.n_cols as usize);
        let mut take_idx: Vec<u64> = Vec::with_capacity(n_out);
        for (k, run) in row_runs.iter().enumerate() {
            let first = run[0];
            for &r in *run {
                match &col_place {
                    None => {
                        let row_base = base[k * col_runs.len()] + (r - first) * width;
                        take_idx.extend((0..width).map(|c| row_base + c));
                    }
                    Some(place) => {
                        for &(j, offset) in place {
                            let len = col_runs[j].end - col_runs[j].start;
                            take_idx
                                .push(base[k * col_runs.len() + j] + (r - first) * len + offset);
                        }
                    }
                }
            }
        }
        take(&all, &UInt64Array::from(take_idx), None).map_err(|e| self.fail(e))
    }

    /// The output positions that stored column `col` fills (several where `var_names` repeats a
    /// name), or `None` when every column is selected as stored.
    fn targets_of(&self, col: u64) -> Option<&[(u64, u32)]> {
        let targets = self.targets.as_deref()?;
        let a = targets.partition_point(|t| t.0 < col);
        let b = a + targets[a..].partition_point(|t| t.0 == col);
        Some(&targets[a..b])
    }

    /// Reads the selected rows (ascending, unique) of a CSR matrix, columns remapped to selection
    /// positions. Without `values`, only the structure is read and the values are nulls.
    ///
    /// Rows whose extents are close in the data arrays (in the same chunk, or a small gap apart)
    /// are read as one range, up to [`MAX_RANGE`] elements; each range is read and its rows'
    /// entries gathered at once (ranges in parallel where the store gains from it), so only the
    /// selected entries outlive the read.
    fn read_csr(&self, sparse: &Sparse, rows: &[u64], values: bool) -> Result<SparseBlock> {
        let extents: Vec<(u64, u64)> = rows
            .iter()
            .map(|&r| self.extent(sparse, r))
            .collect::<Result<_>>()?;
        let data_chunk = sparse
            .data_info
            .chunks
            .as_ref()
            .and_then(|c| c.first().copied());
        let gap = data_chunk.unwrap_or((64 << 10) / self.dtype.width().max(1));
        // (first element, end element, the rows it covers as positions in `rows`).
        let mut ranges: Vec<(u64, u64, Range<usize>)> = Vec::new();
        for (i, &(a, b)) in extents.iter().enumerate() {
            match ranges.last_mut() {
                Some(last)
                    if a <= last.1.saturating_add(gap) && b.saturating_sub(last.0) <= MAX_RANGE =>
                {
                    last.1 = last.1.max(b);
                    last.2.end = i + 1;
                }
                _ => ranges.push((a, b, i..i + 1)),
            }
        }
        let n_stored = self.shape[1];
        let gather = |(a, b, covered): &(u64, u64, Range<usize>)| -> Result<Piece> {
            let mut piece = Piece::default();
            if b <= a {
                piece.counts = vec![0; covered.len()];
                piece.data = new_empty_array(&self.dtype.arrow());
                return Ok(piece);
            }
            let indices = self.store.read(&sparse.indices, &[*a], &[b - a])?;
            let indices =
                Ints::of(&indices).ok_or_else(|| self.fail("indices are not integers"))?;
            let mut take_idx: Vec<u64> = Vec::new();
            let mut row_entries: Vec<(u32, u64)> = Vec::new();
            for &(ra, rb) in &extents[covered.clone()] {
                row_entries.clear();
                for k in ra..rb {
                    let pos = k - a;
                    let col = indices
                        .get(pos as usize)
                        .ok_or_else(|| self.fail("indices out of range"))?;
                    if col < 0 || col as u64 >= n_stored {
                        return Err(self.fail(format!("column index {col} out of bounds")));
                    }
                    match self.targets_of(col as u64) {
                        None => row_entries.push((col as u32, pos)),
                        Some(targets) => {
                            row_entries.extend(targets.iter().map(|&(_, new)| (new, pos)))
                        }
                    }
                }
                if self.targets.is_some() {
                    row_entries.sort_unstable_by_key(|e| e.0);
                }
                piece.counts.push(row_entries.len());
                for &(new, pos) in &row_entries {
                    piece.indices.push(new as i32);
                    take_idx.push(pos);
                }
            }
            piece.data = if !values {
                new_null_array(&self.dtype.arrow(), take_idx.len())
            } else {
                let data = self.store.read(&sparse.data, &[*a], &[b - a])?;
                let identity = take_idx.len() == data.len()
                    && take_idx.iter().enumerate().all(|(i, &p)| i as u64 == p);
                if identity {
                    data
                } else {
                    take(&data, &UInt64Array::from(take_idx), None).map_err(|e| self.fail(e))?
                }
            };
            Ok(piece)
        };
        let pieces: Vec<Piece> = if ranges.len() > 1 {
            use rayon::prelude::*;
            ranges.par_iter().map(gather).collect::<Result<_>>()?
        } else {
            ranges.iter().map(gather).collect::<Result<_>>()?
        };
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0i32);
        let mut indices = Vec::new();
        let mut total = 0usize;
        for piece in &pieces {
            for &count in &piece.counts {
                total += count;
                offsets.push(i32::try_from(total).map_err(|_| self.fail("block too large"))?);
            }
            indices.extend_from_slice(&piece.indices);
        }
        let parts: Vec<ArrayRef> = pieces.into_iter().map(|p| p.data).collect();
        let data = concat_or_empty(&parts, &self.dtype.arrow()).map_err(|e| self.fail(e))?;
        Ok(SparseBlock {
            offsets,
            indices,
            data,
        })
    }

    /// The selected rows (ascending, unique) of a CSC matrix, as CSR.
    ///
    /// Each call converts one block: it reads the selected columns' ranges (a bounded number of
    /// elements at a time) and keeps the entries of this block's rows, so memory is bounded by
    /// the block, whatever the size of the matrix. Values are read only around the kept entries.
    fn read_csc(&self, sparse: &Sparse, rows: &[u64], values: bool) -> Result<SparseBlock> {
        let (Some(&lo), Some(&hi)) = (rows.first(), rows.last()) else {
            return Ok(SparseBlock {
                offsets: vec![0],
                indices: Vec::new(),
                data: new_empty_array(&self.dtype.arrow()),
            });
        };
        let n_major = sparse.indptr.len().saturating_sub(1) as u64;
        let stored: Vec<u64> = match &self.targets {
            Some(targets) => dedup_sorted(targets.iter().map(|t| t.0)),
            None => (0..n_major).collect(),
        };
        // (row in the block, output column, position among the kept entries).
        let mut triplets: Vec<(u32, u32, u64)> = Vec::new();
        let mut data_parts: Vec<ArrayRef> = Vec::new();
        let mut kept = 0u64;
        const MAX_READ: u64 = 4 << 20;
        let mut i = 0;
        while i < stored.len() {
            let (a, _) = self.extent(sparse, stored[i])?;
            let mut j = i;
            let mut b = a;
            while j < stored.len() {
                let (ca, cb) = self.extent(sparse, stored[j])?;
                if ca > b.saturating_add(4096) || (cb - a > MAX_READ && j > i) {
                    break;
                }
                b = b.max(cb);
                j += 1;
            }
            if b > a {
                let idx = self.store.read(&sparse.indices, &[a], &[b - a])?;
                let idx = Ints::of(&idx).ok_or_else(|| self.fail("indices are not integers"))?;
                let mut keep: Vec<u64> = Vec::new();
                for &col in &stored[i..j] {
                    let (ca, cb) = self.extent(sparse, col)?;
                    for k in ca..cb {
                        let row = idx
                            .get((k - a) as usize)
                            .ok_or_else(|| self.fail("indices out of range"))?;
                        if row < 0 || row as u64 >= self.shape[0] {
                            return Err(self.fail(format!("row index {row} out of bounds")));
                        }
                        let row = row as u64;
                        if row < lo || row > hi {
                            continue;
                        }
                        let Ok(at) = rows.binary_search(&row) else {
                            continue;
                        };
                        let at = at as u32;
                        let position = kept + keep.len() as u64;
                        match self.targets_of(col) {
                            None => triplets.push((at, col as u32, position)),
                            Some(targets) => {
                                triplets.extend(targets.iter().map(|&(_, new)| (at, new, position)))
                            }
                        }
                        keep.push(k - a);
                    }
                }
                if let (Some(&first), Some(&last)) = (keep.first(), keep.last()) {
                    kept += keep.len() as u64;
                    if values {
                        // Columns are read in storage order, so kept positions ascend.
                        let data =
                            self.store
                                .read(&sparse.data, &[a + first], &[last - first + 1])?;
                        let local = UInt64Array::from_iter_values(keep.iter().map(|k| k - first));
                        data_parts.push(take(&data, &local, None).map_err(|e| self.fail(e))?);
                    }
                }
            }
            i = j.max(i + 1);
        }
        triplets.sort_unstable_by_key(|t| (t.0, t.1));
        let mut offsets = vec![0i32; rows.len() + 1];
        let mut counts = vec![0usize; rows.len()];
        for t in &triplets {
            counts[t.0 as usize] += 1;
        }
        let mut total = 0usize;
        for (r, count) in counts.iter().enumerate() {
            total += count;
            offsets[r + 1] = i32::try_from(total).map_err(|_| self.fail("block too large"))?;
        }
        let indices = triplets.iter().map(|t| t.1 as i32).collect();
        let data = if values {
            let data =
                concat_or_empty(&data_parts, &self.dtype.arrow()).map_err(|e| self.fail(e))?;
            take(
                &data,
                &UInt64Array::from_iter_values(triplets.iter().map(|t| t.2)),
                None,
            )
            .map_err(|e| self.fail(e))?
        } else {
            new_null_array(&self.dtype.arrow(), triplets.len())
        };
        Ok(SparseBlock {
            offsets,
            indices,
            data,
        })
    }

    /// Where major position `major` (a CSR row, a CSC column) lies in `indices` and `data`.
    fn extent(&self, sparse: &Sparse, major: u64) -> Result<(u64, u64)> {
        let at = usize::try_from(major).map_err(|_| self.fail("position out of range"))?;
        match (
            sparse.indptr.get(at),
            at.checked_add(1).and_then(|n| sparse.indptr.get(n)),
        ) {
            (Some(&a), Some(&b)) if 0 <= a && a <= b => Ok((a as u64, b as u64)),
            _ => Err(self.fail(format!("position {major} is outside indptr"))),
        }
    }

    /// Rows `range` of the selection as a sparse block, in selection order (which for varm/varp
    /// rows is the order `var_names` gives, repeats included). Without `values`, only the
    /// structure is read.
    fn sparse_rows(&self, range: Range<usize>, values: bool) -> Result<SparseBlock> {
        let wanted = &self.rows[range];
        let sorted = ascending(wanted);
        let rows = sorted.as_ref().map_or(wanted, |(rows, _)| rows.as_slice());
        let block = match &self.storage {
            Storage::Sparse(s) if !s.csc => self.read_csr(s, rows, values)?,
            Storage::Sparse(s) => self.read_csc(s, rows, values)?,
            Storage::Dense { path, info } => {
                let dense = self.read_dense(path, info, rows)?;
                sparsify(&dense, rows.len(), self.n_cols).map_err(|e| self.fail(e))?
            }
        };
        match sorted {
            None => Ok(block),
            Some((_, place)) => reorder_sparse(&block, &place).map_err(|e| self.fail(e)),
        }
    }

    /// Rows `range` of the selection in the long layout: every entry of dense storage, the nonzeros
    /// of sparse storage. Without `values` nothing but the structure is read.
    fn long_rows(&self, range: Range<usize>, values: bool) -> Result<Vec<ArrayRef>> {
        let (obs, vars) = self
            .names
            .as_ref()
            .ok_or_else(|| self.fail("the long layout needs row and column names"))?;
        let n = range.len();
        let (row, col, values) = match &self.storage {
            Storage::Sparse(_) => {
                let block = self.sparse_rows(range.clone(), values)?;
                let mut row = Vec::with_capacity(block.indices.len());
                for r in 0..n {
                    let count = (block.offsets[r + 1] - block.offsets[r]) as usize;
                    row.extend(std::iter::repeat_n((range.start + r) as u64, count));
                }
                let col = block.indices.iter().map(|&c| c as u64).collect();
                (row, col, block.data)
            }
            Storage::Dense { .. } => {
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

    /// Rows `range` of the selection as dense values (`rows * n_cols`, row-major), in selection
    /// order.
    fn dense_rows(&self, range: Range<usize>) -> Result<ArrayRef> {
        match &self.storage {
            Storage::Dense { path, info } => {
                let wanted = &self.rows[range];
                match ascending(wanted) {
                    None => self.read_dense(path, info, wanted),
                    Some((rows, place)) => {
                        let values = self.read_dense(path, info, &rows)?;
                        let n_cols = self.n_cols;
                        let idx = UInt64Array::from_iter_values(
                            place
                                .iter()
                                .flat_map(|&p| (0..n_cols).map(move |c| p as u64 * n_cols + c)),
                        );
                        take(&values, &idx, None).map_err(|e| self.fail(e))
                    }
                }
            }
            Storage::Sparse(_) => {
                let n = range.len();
                let block = self.sparse_rows(range, true)?;
                densify(&block, n, self.n_cols, &self.dtype.arrow()).map_err(|e| self.fail(e))
            }
        }
    }
}

/// The most elements one sparse range read may span (indices and data each).
const MAX_RANGE: u64 = 1 << 20;

/// The entries of the rows one sparse range covers: per row a count, then the remapped column
/// positions and the values.
#[derive(Debug)]
struct Piece {
    counts: Vec<usize>,
    indices: Vec<i32>,
    data: ArrayRef,
}

impl Default for Piece {
    fn default() -> Self {
        Self {
            counts: Vec::new(),
            indices: Vec::new(),
            data: new_empty_array(&DataType::Null),
        }
    }
}

/// Sparse indices as stored (int32 or int64), read without widening them.
enum Ints<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl<'a> Ints<'a> {
    fn of(array: &'a ArrayRef) -> Option<Self> {
        match array.data_type() {
            DataType::Int32 => Some(Ints::I32(
                array.as_primitive::<arrow::datatypes::Int32Type>().values(),
            )),
            DataType::Int64 => Some(Ints::I64(array.as_primitive::<Int64Type>().values())),
            _ => None,
        }
    }

    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Ints::I32(v) => v.get(i).map(|&x| i64::from(x)),
            Ints::I64(v) => v.get(i).copied(),
        }
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

/// Requested positions as reads want them: ascending and unique, with where each requested
/// position is among them. `None` when the request already ascends without repeats.
fn ascending(positions: &[u64]) -> Option<(Vec<u64>, Vec<usize>)> {
    if positions.windows(2).all(|w| w[0] < w[1]) {
        return None;
    }
    let rows = dedup_sorted(positions.iter().copied());
    let place = positions
        .iter()
        .map(|p| rows.binary_search(p).unwrap_or_else(|i| i))
        .collect();
    Some((rows, place))
}

/// The distinct values, ascending.
fn dedup_sorted(values: impl Iterator<Item = u64>) -> Vec<u64> {
    let mut values: Vec<u64> = values.collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// The rows of `block` in the order `place` gives (row `i` of the result is row `place[i]`).
fn reorder_sparse(block: &SparseBlock, place: &[usize]) -> Result<SparseBlock, String> {
    let mut offsets = Vec::with_capacity(place.len() + 1);
    offsets.push(0i32);
    let mut indices = Vec::new();
    let mut take_idx: Vec<u64> = Vec::new();
    for &p in place {
        let (a, b) = match (block.offsets.get(p), block.offsets.get(p + 1)) {
            (Some(&a), Some(&b)) => (a as usize, b as usize),
            _ => return Err(format!("row {p} is outside the block")),
        };
        indices.extend_from_slice(&block.indices[a..b]);
        take_idx.extend((a..b).map(|k| k as u64));
        offsets.push(i32::try_from(indices.len()).map_err(|_| "block too large".to_string())?);
    }
    let data = take(&block.data, &UInt64Array::from(take_idx), None).map_err(|e| e.to_string())?;
    Ok(SparseBlock {
        offsets,
        indices,
        data,
    })
}

/// Groups ascending positions into runs of neighbours.
fn coalesce(rows: &[u64], near: impl Fn(u64, u64) -> bool) -> Vec<&[u64]> {
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=rows.len() {
        if i == rows.len() || !near(rows[i - 1], rows[i]) {
            if i > start {
                runs.push(&rows[start..i]);
            }
            start = i;
        }
    }
    runs
}

/// The nonzero entries of dense row-major values.
fn sparsify(values: &ArrayRef, n_rows: usize, n_cols: u64) -> Result<SparseBlock, String> {
    let zero = cast(&Int64Array::from(vec![0]), values.data_type()).map_err(|e| e.to_string())?;
    let zero = arrow::array::Scalar::new(zero);
    let nonzero: BooleanArray =
        arrow::compute::kernels::cmp::neq(values, &zero).map_err(|e| e.to_string())?;
    let mut offsets = Vec::with_capacity(n_rows + 1);
    offsets.push(0i32);
    let mut indices = Vec::new();
    let n_cols = n_cols as usize;
    for r in 0..n_rows {
        for c in 0..n_cols {
            if nonzero.value(r * n_cols + c) {
                indices.push(c as i32);
            }
        }
        offsets.push(i32::try_from(indices.len()).map_err(|_| "block too large".to_string())?);
    }
    let data = filter(values, &nonzero).map_err(|e| e.to_string())?;
    Ok(SparseBlock {
        offsets,
        indices,
        data,
    })
}

/// Dense row-major values of a sparse block.
fn densify(
    block: &SparseBlock,
    n_rows: usize,
    n_cols: u64,
    dtype: &DataType,
) -> Result<ArrayRef, String> {
    let zero = cast(&Int64Array::from(vec![0]), dtype).map_err(|e| e.to_string())?;
    let with_zero = concat(&[block.data.as_ref(), zero.as_ref()]).map_err(|e| e.to_string())?;
    let zero_at = block.data.len() as u64;
    let n_cols = n_cols as usize;
    let mut idx = vec![zero_at; n_rows * n_cols];
    for r in 0..n_rows {
        let (a, b) = (block.offsets[r] as usize, block.offsets[r + 1] as usize);
        for k in a..b {
            idx[r * n_cols + block.indices[k] as usize] = k as u64;
        }
    }
    take(&with_zero, &UInt64Array::from(idx), None).map_err(|e| e.to_string())
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
        match (&self.output, &self.storage) {
            (Output::Pairs, _) => None,
            (
                Output::Matrix {
                    layout: Layout::Long,
                    ..
                },
                Storage::Dense { .. },
            ) => rows.checked_mul(usize::try_from(self.n_cols).ok()?),
            (
                Output::Matrix {
                    layout: Layout::Long,
                    ..
                },
                Storage::Sparse(_),
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
