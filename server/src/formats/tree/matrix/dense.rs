//! Dense matrices: selected rows and columns read as runs of chunks (or of nearby rows and
//! columns in contiguous HDF5), every run on its own core.

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, UInt64Array, new_empty_array};
use arrow::compute::take;

use super::index::{ColumnMap, ascending, coalesce};
use super::{Encoding, MatrixSource, concat_or_empty, densify};
use crate::error::Result;
use crate::formats::array::ArrayInfo;

impl MatrixSource {
    /// Reads the dense values of `rows` (array positions, ascending and unique),
    /// `rows.len() * n_cols` elements in row-major order, selected columns in output order.
    ///
    /// Rows are coalesced into runs (rows in one chunk, or a small gap apart) and so are the
    /// selected columns; each run of rows is read once per run of columns, so a sparse column
    /// selection reads only the column chunks (or stretches) that hold selected columns.
    pub(super) fn read_dense(
        &self,
        path: &str,
        info: &ArrayInfo,
        rows: &[u64],
    ) -> Result<ArrayRef> {
        let two_d = info.shape.len() == 2;
        let width = if two_d { info.shape[1] } else { 1 };
        if rows.is_empty() || self.n_cols == 0 {
            return Ok(new_empty_array(&self.dtype.arrow()));
        }
        let item = self.dtype.width().max(1);
        let col_chunk = info.chunks.as_ref().and_then(|c| c.get(1).copied());
        let (col_runs, col_place) = match self.columns.as_ref().map(ColumnMap::stored) {
            None => (std::iter::once(0..width).collect::<Vec<_>>(), None),
            Some(stored) => {
                let runs: Vec<Range<u64>> = coalesce(stored, |a, b| match col_chunk {
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
        // Each read returns exactly its run's rows (compact, in order) of its columns.
        let read_one = |&(k, j): &(usize, usize)| -> Result<ArrayRef> {
            let run = row_runs[k];
            let cols = &col_runs[j];
            let part = if two_d {
                self.store.read_row_selection(path, run, cols.clone())?
            } else {
                let (first, last) = (run[0], run[run.len() - 1]);
                let block = self.store.read(path, &[first], &[last - first + 1])?;
                if last - first + 1 == run.len() as u64 {
                    block
                } else {
                    let idx = UInt64Array::from_iter_values(run.iter().map(|r| r - first));
                    take(&block, &idx, None).map_err(|e| self.fail(e))?
                }
            };
            let expected = run.len() as u64 * (cols.end - cols.start);
            if part.len() as u64 != expected {
                return Err(self.fail(format!(
                    "a read of {expected} values returned {}",
                    part.len()
                )));
            }
            Ok(part)
        };
        // Reads run on every core where the store gains from it: zarr decodes chunks in parallel,
        // contiguous HDF5 is read with `pread`; other HDF5 reads would queue on libhdf5's lock.
        let parts: Vec<ArrayRef> = if reads.len() > 1 && self.store.concurrent_reads(path) {
            use rayon::prelude::*;
            reads.par_iter().map(read_one).collect::<Result<_>>()?
        } else {
            reads.iter().map(read_one).collect::<Result<_>>()?
        };
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
        if parts.len() == 1 && cols_whole {
            return Ok(Arc::clone(&parts[0]));
        }
        let all = concat_or_empty(&parts, &self.dtype.arrow()).map_err(|e| self.fail(e))?;
        // Every column in stored order: the parts are the selected rows in order already.
        let Some(place) = col_place else {
            return Ok(all);
        };
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
            for i in 0..run.len() as u64 {
                for &(j, offset) in &place {
                    let len = col_runs[j].end - col_runs[j].start;
                    take_idx.push(base[k * col_runs.len() + j] + i * len + offset);
                }
            }
        }
        take(&all, &UInt64Array::from(take_idx), None).map_err(|e| self.fail(e))
    }

    /// Rows `range` of the selection as dense values (`rows * n_cols`, row-major), in selection
    /// order.
    pub(super) fn dense_rows(&self, range: Range<usize>) -> Result<ArrayRef> {
        match &self.encoding {
            Encoding::Dense { path, info } => {
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
            Encoding::Sparse(_) => {
                let n = range.len();
                let block = self.sparse_rows(range, true)?;
                densify(&block, n, self.n_cols, &self.dtype.arrow()).map_err(|e| self.fail(e))
            }
        }
    }
}
