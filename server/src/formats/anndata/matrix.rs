//! Matrix elements (`X`, `layers`, `obsm`, `varm`, `obsp`, `varp`) read for a selection of rows and
//! columns, in the wire layouts of SPEC section 5.
//!
//! Reads are chunk-aware. Selected rows are coalesced into runs: rows in the same chunk (zarr, or
//! chunked HDF5) or a few rows apart (contiguous HDF5) are read as one block, and nothing outside
//! the runs is touched. For CSR, `indptr` is read once and then only the `indices`/`data` ranges of
//! the selected rows. CSC is read column by column (only the selected columns' ranges) and
//! converted to CSR for the selected rows.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, FixedSizeListArray, Int32Array, Int64Array, ListArray,
    RecordBatch, UInt64Array, new_empty_array,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::{cast, concat, filter, take};
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};

use super::super::array::{ArrayInfo, ArrayStore, Dtype, Node, ReadMetrics, data_loss, join};
use super::super::blocks::BlockSource;
use crate::error::{Error, Result};
use crate::query::Layout;

/// Bytes of matrix data per record batch (and per block read).
const BLOCK_BYTES: u64 = 8 << 20;

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

impl Sparse {
    pub(crate) fn is_csc(&self) -> bool {
        self.csc
    }
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
    /// Row positions, ascending.
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
    /// Selected row positions, ascending.
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
    /// The CSR of the whole selection, built once for CSC storage.
    converted: OnceLock<Result<SparseBlock, String>>,
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
        metadata.insert(
            "artiflight:shape".to_string(),
            serde_json::json!([rows.len(), n_cols]).to_string(),
        );
        if let (Output::Matrix { .. }, Some(names)) = (&output, &col_names) {
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
            converted: OnceLock::new(),
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
        let row_bytes = (self.n_cols.max(1) * entry).max(1);
        (BLOCK_BYTES / row_bytes).max(1) as usize
    }

    /// Bytes of the selected values if dense.
    pub(crate) fn dense_bytes(&self) -> u64 {
        self.rows.len() as u64 * self.n_cols * self.dtype.width()
    }

    fn fail(&self, what: impl std::fmt::Display) -> Error {
        data_loss(self.store.location(), format!("'{}': {what}", self.element))
    }

    /// Reads the dense values of `rows` (array positions, ascending), `rows.len() * n_cols`
    /// elements in row-major order, selected columns in output order.
    fn read_dense(&self, path: &str, info: &ArrayInfo, rows: &[u64]) -> Result<ArrayRef> {
        let width = info.shape.get(1).copied().unwrap_or(1);
        let (c0, c1) = match &self.cols {
            Some(cols) if !cols.is_empty() => (
                *cols.iter().min().unwrap_or(&0),
                cols.iter().max().unwrap_or(&0) + 1,
            ),
            Some(_) => (0, 0),
            None => (0, width),
        };
        let span = c1 - c0;
        // Rows closer than this are read together: for a chunked array, anything in the same
        // chunk; for a contiguous one, gaps of up to 64 KiB (cheaper than another read call).
        let row_bytes = (span * self.dtype.width()).max(1);
        let chunk = info.chunks.as_ref().and_then(|c| c.first().copied());
        let runs = coalesce(rows, |a, b| match chunk {
            Some(c) => a / c == b / c,
            None => (b - a) * row_bytes <= 64 << 10,
        });
        let identity = runs
            .iter()
            .all(|run| run[run.len() - 1] - run[0] + 1 == run.len() as u64);
        let read_run = |run: &&[u64]| -> Result<(u64, ArrayRef)> {
            let (first, last) = (run[0], run[run.len() - 1]);
            let (start, count) = if info.shape.len() == 2 {
                (vec![first, c0], vec![last - first + 1, span])
            } else {
                (vec![first], vec![last - first + 1])
            };
            Ok((first, self.store.read(path, &start, &count)?))
        };
        // Runs are read on every core: zarr decodes chunks in parallel, and contiguous HDF5 is
        // read with `pread` (other HDF5 reads queue on libhdf5's lock, which costs nothing more).
        let parts: Vec<(u64, ArrayRef)> = if runs.len() > 1 {
            use rayon::prelude::*;
            runs.par_iter().map(read_run).collect::<Result<_>>()?
        } else {
            runs.iter().map(read_run).collect::<Result<_>>()?
        };
        let cols_identity = match &self.cols {
            None => true,
            Some(cols) => {
                cols.iter().enumerate().all(|(i, &c)| c == c0 + i as u64)
                    && span == cols.len() as u64
            }
        };
        let arrays: Vec<&dyn Array> = parts.iter().map(|(_, a)| a.as_ref()).collect();
        let all = if arrays.len() == 1 {
            Arc::clone(&parts[0].1)
        } else if arrays.is_empty() {
            new_empty_array(&self.dtype.arrow())
        } else {
            concat(&arrays).map_err(|e| self.fail(e))?
        };
        if identity && cols_identity {
            return Ok(all);
        }
        // Gather the selected rows and columns out of the runs read.
        let mut take_idx: Vec<u64> = Vec::with_capacity(rows.len() * self.n_cols as usize);
        let mut base = 0u64;
        let mut rows_iter = rows.iter().peekable();
        for (first, part) in &parts {
            let n_read = part.len() as u64 / span.max(1);
            while let Some(&&r) = rows_iter.peek() {
                if r >= first + n_read {
                    break;
                }
                let row_base = base + (r - first) * span;
                match &self.cols {
                    None => take_idx.extend((0..span).map(|j| row_base + j)),
                    Some(cols) => take_idx.extend(cols.iter().map(|&c| row_base + c - c0)),
                }
                rows_iter.next();
            }
            base += part.len() as u64;
        }
        take(&all, &UInt64Array::from(take_idx), None).map_err(|e| self.fail(e))
    }

    /// Reads the selected rows of a CSR matrix, columns remapped to selection positions.
    ///
    /// Rows whose extents are close in the data arrays (in the same chunk, or a small gap apart)
    /// are read as one range, up to [`MAX_RANGE`] elements; each range is read and its rows'
    /// entries gathered at once (ranges in parallel where the store gains from it), so only the
    /// selected entries outlive the read.
    fn read_csr(&self, sparse: &Sparse, rows: &[u64]) -> Result<SparseBlock> {
        let extents: Vec<(u64, u64)> = rows
            .iter()
            .map(|&r| {
                match (
                    sparse.indptr.get(r as usize),
                    sparse.indptr.get(r as usize + 1),
                ) {
                    (Some(&a), Some(&b)) => Ok((a as u64, b as u64)),
                    _ => Err(self.fail(format!("row {r} is outside indptr"))),
                }
            })
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
                Some(last) if a <= last.1 + gap && b.saturating_sub(last.0) <= MAX_RANGE => {
                    last.1 = last.1.max(b);
                    last.2.end = i + 1;
                }
                _ => ranges.push((a, b, i..i + 1)),
            }
        }
        let map = self.col_map(self.shape[1])?;
        let gather = |(a, b, covered): &(u64, u64, Range<usize>)| -> Result<Piece> {
            let mut piece = Piece::default();
            if b == a {
                piece.counts = vec![0; covered.len()];
                piece.data = new_empty_array(&self.dtype.arrow());
                return Ok(piece);
            }
            let indices = self.store.read(&sparse.indices, &[*a], &[b - a])?;
            let data = self.store.read(&sparse.data, &[*a], &[b - a])?;
            let indices =
                Ints::of(&indices).ok_or_else(|| self.fail("indices are not integers"))?;
            let mut take_idx: Vec<u64> = Vec::new();
            let mut row_entries: Vec<(i32, u64)> = Vec::new();
            for &(ra, rb) in &extents[covered.clone()] {
                row_entries.clear();
                for k in ra..rb {
                    let pos = k - a;
                    let col = indices
                        .get(pos as usize)
                        .ok_or_else(|| self.fail("indices out of range"))?;
                    let new = match &map {
                        None if col >= 0 && (col as u64) < self.n_cols => col as i32,
                        None => return Err(self.fail(format!("column index {col} out of bounds"))),
                        Some(map) => match map.get(col as usize) {
                            Some(&n) if n >= 0 => n,
                            Some(_) => continue,
                            None => {
                                return Err(self.fail(format!("column index {col} out of bounds")));
                            }
                        },
                    };
                    row_entries.push((new, pos));
                }
                if map.is_some() {
                    row_entries.sort_unstable_by_key(|e| e.0);
                }
                piece.counts.push(row_entries.len());
                for &(new, pos) in &row_entries {
                    piece.indices.push(new);
                    take_idx.push(pos);
                }
            }
            let identity = take_idx.len() == data.len()
                && take_idx.iter().enumerate().all(|(i, &p)| i as u64 == p);
            piece.data = if identity {
                data
            } else {
                take(&data, &UInt64Array::from(take_idx), None).map_err(|e| self.fail(e))?
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

    /// Old column position -> selection position (-1: not selected), or `None` for all columns.
    fn col_map(&self, n_minor: u64) -> Result<Option<Vec<i32>>> {
        let Some(cols) = &self.cols else {
            return Ok(None);
        };
        let mut map = vec![-1i32; n_minor as usize];
        for (new, &old) in cols.iter().enumerate() {
            let slot = map
                .get_mut(old as usize)
                .ok_or_else(|| self.fail(format!("column {old} out of bounds")))?;
            *slot = new as i32;
        }
        Ok(Some(map))
    }

    /// Converts a CSC matrix to the CSR of the whole selection, reading only the selected
    /// columns' ranges.
    fn convert_csc(&self, sparse: &Sparse) -> Result<SparseBlock> {
        let n_major = sparse.indptr.len().saturating_sub(1) as u64;
        let cols: Vec<u64> = match &self.cols {
            Some(c) => c.clone(),
            None => (0..n_major).collect(),
        };
        let n_obs = self.shape[0];
        let mut row_map = vec![-1i64; n_obs as usize];
        for (new, &old) in self.rows.iter().enumerate() {
            if let Some(slot) = row_map.get_mut(old as usize) {
                *slot = new as i64;
            }
        }
        // Triplets (selection row, selection col, position in the gathered data).
        let mut triplets: Vec<(i32, i32, u64)> = Vec::new();
        let mut data_parts: Vec<ArrayRef> = Vec::new();
        let mut gathered = 0u64;
        // Read column ranges in ascending storage order, a bounded number of elements at a time.
        let mut order: Vec<(usize, u64)> = cols.iter().copied().enumerate().collect();
        order.sort_unstable_by_key(|&(_, c)| c);
        const MAX_READ: u64 = 4 << 20;
        let mut i = 0;
        while i < order.len() {
            let (a, _) = self.extent_csc(sparse, order[i].1)?;
            let mut j = i;
            let mut b = a;
            while j < order.len() {
                let (ca, cb) = self.extent_csc(sparse, order[j].1)?;
                if ca > b + 4096 || (cb - a > MAX_READ && j > i) {
                    break;
                }
                b = b.max(cb);
                j += 1;
            }
            if b > a {
                let idx = self.store.read(&sparse.indices, &[a], &[b - a])?;
                let idx = Ints::of(&idx).ok_or_else(|| self.fail("indices are not integers"))?;
                let data = self.store.read(&sparse.data, &[a], &[b - a])?;
                let mut keep: Vec<u64> = Vec::new();
                for &(new_col, col) in &order[i..j] {
                    let (ca, cb) = self.extent_csc(sparse, col)?;
                    for k in ca..cb {
                        let row = idx
                            .get((k - a) as usize)
                            .ok_or_else(|| self.fail("indices out of range"))?;
                        let new_row = *row_map
                            .get(row as usize)
                            .ok_or_else(|| self.fail(format!("row index {row} out of bounds")))?;
                        if new_row >= 0 {
                            triplets.push((
                                new_row as i32,
                                new_col as i32,
                                gathered + keep.len() as u64,
                            ));
                            keep.push(k - a);
                        }
                    }
                }
                if !keep.is_empty() {
                    gathered += keep.len() as u64;
                    data_parts.push(
                        take(&data, &UInt64Array::from(keep), None).map_err(|e| self.fail(e))?,
                    );
                }
            }
            i = j.max(i + 1);
        }
        triplets.sort_unstable_by_key(|t| (t.0, t.1));
        let mut offsets = vec![0i32; self.rows.len() + 1];
        for t in &triplets {
            offsets[t.0 as usize + 1] += 1;
        }
        for k in 1..offsets.len() {
            offsets[k] += offsets[k - 1];
        }
        let indices = triplets.iter().map(|t| t.1).collect();
        let data = concat_or_empty(&data_parts, &self.dtype.arrow()).map_err(|e| self.fail(e))?;
        let data = take(
            &data,
            &UInt64Array::from_iter_values(triplets.iter().map(|t| t.2)),
            None,
        )
        .map_err(|e| self.fail(e))?;
        Ok(SparseBlock {
            offsets,
            indices,
            data,
        })
    }

    fn extent_csc(&self, sparse: &Sparse, col: u64) -> Result<(u64, u64)> {
        match (
            sparse.indptr.get(col as usize),
            sparse.indptr.get(col as usize + 1),
        ) {
            (Some(&a), Some(&b)) => Ok((a as u64, b as u64)),
            _ => Err(self.fail(format!("column {col} is outside indptr"))),
        }
    }

    /// Rows `range` of the selection as a sparse block.
    fn sparse_rows(&self, range: Range<usize>) -> Result<SparseBlock> {
        let rows = &self.rows[range.clone()];
        match &self.storage {
            Storage::Sparse(s) if !s.csc => self.read_csr(s, rows),
            Storage::Sparse(s) => {
                let all = self
                    .converted
                    .get_or_init(|| self.convert_csc(s).map_err(|e| e.to_string()))
                    .as_ref()
                    .map_err(|e| self.fail(e))?;
                let (a, b) = (all.offsets[range.start], all.offsets[range.end]);
                Ok(SparseBlock {
                    offsets: all.offsets[range.start..=range.end]
                        .iter()
                        .map(|o| o - a)
                        .collect(),
                    indices: all.indices[a as usize..b as usize].to_vec(),
                    data: all.data.slice(a as usize, (b - a) as usize),
                })
            }
            Storage::Dense { path, info } => {
                let values = self.read_dense(path, info, rows)?;
                sparsify(&values, rows.len(), self.n_cols).map_err(|e| self.fail(e))
            }
        }
    }

    /// Rows `range` of the selection in the long layout: every entry of dense storage, the nonzeros
    /// of sparse storage.
    fn long_rows(&self, range: Range<usize>) -> Result<Vec<ArrayRef>> {
        let (obs, vars) = self
            .names
            .as_ref()
            .ok_or_else(|| self.fail("the long layout needs row and column names"))?;
        let n = range.len();
        let (row, col, values) = match &self.storage {
            Storage::Sparse(_) => {
                let block = self.sparse_rows(range.clone())?;
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
                let values = self.dense_rows(range.clone())?;
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

    /// Rows `range` of the selection as dense values (`rows * n_cols`, row-major).
    fn dense_rows(&self, range: Range<usize>) -> Result<ArrayRef> {
        match &self.storage {
            Storage::Dense { path, info } => self.read_dense(path, info, &self.rows[range]),
            Storage::Sparse(_) => {
                let n = range.len();
                let block = self.sparse_rows(range)?;
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
        let mut columns: Vec<ArrayRef> = Vec::new();
        let n_cols = self.n_cols;
        match &self.output {
            Output::Pairs => {
                let block = self.sparse_rows(range.clone())?;
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
            }
            Output::Matrix {
                layout: Layout::Long,
                ..
            } => columns = self.long_rows(range)?,
            output => {
                columns.extend(self.index.slice(range.start, n).columns().iter().cloned());
                let item = Arc::new(Field::new("item", self.dtype.arrow(), true));
                match output {
                    Output::Matrix {
                        layout: Layout::Sparse,
                        ..
                    } => {
                        let block = self.sparse_rows(range)?;
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
                        let values = self.dense_rows(range)?;
                        for c in 0..n_cols {
                            let idx = UInt64Array::from_iter_values(
                                (0..n as u64).map(|r| r * n_cols + c),
                            );
                            columns.push(take(&values, &idx, None).map_err(|e| self.fail(e))?);
                        }
                    }
                    _ => {
                        let values = self.dense_rows(range)?;
                        let size =
                            i32::try_from(n_cols).map_err(|_| self.fail("too many columns"))?;
                        columns.push(Arc::new(
                            FixedSizeListArray::try_new(item, size, values, None)
                                .map_err(|e| self.fail(e))?,
                        ));
                    }
                }
            }
        }
        let batch =
            RecordBatch::try_new(Arc::clone(&self.schema), columns).map_err(|e| self.fail(e))?;
        match projection {
            Some(p) => batch.project(p).map_err(|e| self.fail(e)),
            None => Ok(batch),
        }
    }

    fn metrics(&self) -> ReadMetrics {
        self.store.metrics()
    }

    fn describe(&self) -> String {
        format!("'{}' of {}", self.element, self.store.location())
    }
}
