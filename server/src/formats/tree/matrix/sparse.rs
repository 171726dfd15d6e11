//! Sparse matrices: CSR rows read by their `indptr` extents, CSC converted to rows one block at a
//! time, columns remapped to the selection (a column named twice fills two positions).

use std::ops::Range;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, UInt64Array, new_empty_array,
    new_null_array,
};
use arrow::compute::{cast, concat, filter, take};
use arrow::datatypes::{DataType, Int64Type};

use super::index::ascending;
use super::{Encoding, MatrixSource, Sparse, SparseBlock, concat_or_empty};
use crate::error::Result;

impl MatrixSource {
    /// The output positions that stored column `col` fills (several where `var_names` repeats a
    /// name), or `None` when every column is selected as stored.
    pub(super) fn targets_of(&self, col: u64) -> Option<&[(u64, u32)]> {
        Some(self.columns.as_ref()?.targets_of(col))
    }

    /// Reads the selected rows (ascending, unique) of a CSR matrix, columns remapped to selection
    /// positions. Without `values`, only the structure is read and the values are nulls.
    ///
    /// Rows whose extents are close in the data arrays (in the same chunk, or a small gap apart)
    /// are read as one range, up to [`MAX_RANGE`] elements; each range is read and its rows'
    /// entries gathered at once (ranges in parallel where the store gains from it), so only the
    /// selected entries outlive the read.
    pub(super) fn read_csr(
        &self,
        sparse: &Sparse,
        rows: &[u64],
        values: bool,
    ) -> Result<SparseBlock> {
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
                if self.columns.is_some() {
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
        // On a store that serialises reads (libhdf5), threads would only queue for its lock: a
        // 1 % CSR selection from a chunked h5ad took 80-110 ms that way, 53-57 ms in one thread.
        let parallel = ranges.len() > 1 && self.store.concurrent_reads(&sparse.data);
        let pieces: Vec<Piece> = if parallel {
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
    pub(super) fn read_csc(
        &self,
        sparse: &Sparse,
        rows: &[u64],
        values: bool,
    ) -> Result<SparseBlock> {
        let (Some(&lo), Some(&hi)) = (rows.first(), rows.last()) else {
            return Ok(SparseBlock {
                offsets: vec![0],
                indices: Vec::new(),
                data: new_empty_array(&self.dtype.arrow()),
            });
        };
        let every: Vec<u64>;
        let stored: &[u64] = match &self.columns {
            Some(columns) => columns.stored(),
            None => {
                every = (0..sparse.indptr.len().saturating_sub(1) as u64).collect();
                &every
            }
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
    pub(super) fn extent(&self, sparse: &Sparse, major: u64) -> Result<(u64, u64)> {
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
    pub(super) fn sparse_rows(&self, range: Range<usize>, values: bool) -> Result<SparseBlock> {
        let wanted = &self.rows[range];
        let sorted = ascending(wanted);
        let rows = sorted.as_ref().map_or(wanted, |(rows, _)| rows.as_slice());
        let block = match &self.encoding {
            Encoding::Sparse(s) if !s.csc => self.read_csr(s, rows, values)?,
            Encoding::Sparse(s) => self.read_csc(s, rows, values)?,
            Encoding::Dense { path, info } => {
                let dense = self.read_dense(path, info, rows)?;
                sparsify(&dense, rows.len(), self.n_cols).map_err(|e| self.fail(e))?
            }
        };
        match sorted {
            None => Ok(block),
            Some((_, place)) => reorder_sparse(&block, &place).map_err(|e| self.fail(e)),
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

/// The nonzero entries of dense row-major values.
pub(super) fn sparsify(
    values: &ArrayRef,
    n_rows: usize,
    n_cols: u64,
) -> Result<SparseBlock, String> {
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
pub(super) fn densify(
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
