//! What a request selects from an AnnData: the rows of `obs` (`obs_range`, `filter`) and the
//! variables of `var` (`var_filter`, `var_names` in the order given), each with the index columns
//! sent along. Filters run in DataFusion over the dataframe, so they are the SQL of every other
//! table.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{Schema, UInt64Type};

use super::frame::{Frame, ROW_INDEX};
use super::{Element, frame_table};
use crate::dataframe::{apply_filter, select_columns};
use crate::error::{Error, Result};

impl Element<'_> {
    /// Rows of `obs` that the request selects (`obs_range`, `filter`), ascending, with their
    /// names and the requested `columns`.
    pub(super) async fn select_obs(&self) -> Result<(Vec<u64>, RecordBatch)> {
        let mut columns = vec!["obs_names".to_string()];
        columns.extend(self.request.columns.iter().flatten().cloned());
        self.select_obs_with(columns).await
    }

    /// [`Self::select_obs`], with `columns` of obs for each row.
    pub(super) async fn select_obs_with(
        &self,
        columns: Vec<String>,
    ) -> Result<(Vec<u64>, RecordBatch)> {
        let mut frame = self.frame("obs", "obs_names", true).await?;
        if let Some([a, b]) = self.request.obs_range {
            frame = frame.restrict(a..b);
        }
        let ranges = self.request.obs_ranges.as_deref();
        // Only the span of the ranges is read; rows between them are dropped below.
        if let (Some([first, _]), Some([_, last])) = (
            ranges.and_then(|r| r.first()),
            ranges.and_then(|r| r.last()),
        ) {
            frame = frame.restrict(*first..*last);
        }
        let (positions, index) = self
            .select(frame, self.request.filter.as_deref(), columns)
            .await?;
        match ranges {
            Some(ranges) => keep_in_ranges(positions, index, ranges),
            None => Ok((positions, index)),
        }
    }

    /// Variables the request selects (`var_filter`, then `var_names` in the order given), with
    /// their names.
    pub(super) async fn select_vars(&self) -> Result<(Vec<u64>, RecordBatch)> {
        self.select_vars_with(vec!["var_names".into()]).await
    }

    /// [`Self::select_vars`], with `columns` of var (the first being `var_names`) for each.
    pub(super) async fn select_vars_with(
        &self,
        columns: Vec<String>,
    ) -> Result<(Vec<u64>, RecordBatch)> {
        let frame = self.frame("var", "var_names", true).await?;
        let (mut positions, mut index) = self
            .select(frame, self.request.var_filter.as_deref(), columns)
            .await?;
        if let Some(names) = &self.request.var_names {
            let column = index.column(0);
            let strings = arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8)
                .map_err(|e| Error::internal_from("var_names", e))?;
            let strings = strings.as_string::<i32>();
            let mut by_name = std::collections::HashMap::with_capacity(strings.len());
            for (i, name) in strings.iter().enumerate() {
                if let Some(name) = name {
                    by_name.entry(name.to_string()).or_insert(i);
                }
            }
            let mut take = Vec::with_capacity(names.len());
            for name in names {
                match by_name.get(name) {
                    Some(&i) => take.push(i as u64),
                    None => {
                        return Err(Error::not_found(format!(
                            "no variable '{name}' in var_names{}",
                            if self.request.var_filter.is_some() {
                                " (after var_filter)"
                            } else {
                                ""
                            }
                        )));
                    }
                }
            }
            let take = arrow::array::UInt64Array::from(take);
            index = RecordBatch::try_new(
                index.schema(),
                index
                    .columns()
                    .iter()
                    .map(|c| arrow::compute::take(c, &take, None))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::internal_from("reordering the obs index", e))?,
            )
            .map_err(|e| Error::internal_from("reordering the obs index", e))?;
            positions = take
                .values()
                .iter()
                .map(|&i| positions[i as usize])
                .collect();
        }
        Ok((positions, index))
    }

    /// Runs `filter` and `columns` over a dataframe (with its row index) in DataFusion.
    async fn select(
        &self,
        frame: Frame,
        filter: Option<&str>,
        columns: Vec<String>,
    ) -> Result<(Vec<u64>, RecordBatch)> {
        let table = frame_table(frame, 1);
        let mut df = self.ctx.read_table(table)?;
        if let Some(filter) = filter {
            df = apply_filter(self.ctx, df, filter)?;
        }
        let mut wanted = columns;
        wanted.push(ROW_INDEX.to_string());
        df = select_columns(df, &wanted)?;
        let schema: Arc<Schema> = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        let batch = concat_batches(&schema, &batches)
            .map_err(|e| Error::internal_from("the obs selection", e))?;
        let last = batch.num_columns() - 1;
        let positions = batch
            .column(last)
            .as_primitive::<UInt64Type>()
            .values()
            .to_vec();
        let index = batch
            .project(&(0..last).collect::<Vec<_>>())
            .map_err(|e| Error::internal_from("the obs selection", e))?;
        // Metadata that DataFusion adds to fields is not part of our index.
        let plain = Schema::new(index.schema().fields().clone());
        let index = index
            .with_schema(Arc::new(plain))
            .map_err(|e| Error::internal_from("the obs selection", e))?;
        Ok((positions, index))
    }
}

/// Keeps the rows whose position falls in one of `ranges`. Both are ascending, so one pass over
/// each decides every row.
fn keep_in_ranges(
    positions: Vec<u64>,
    batch: RecordBatch,
    ranges: &[[u64; 2]],
) -> Result<(Vec<u64>, RecordBatch)> {
    let mut next = 0;
    let keep: Vec<bool> = positions
        .iter()
        .map(|&p| {
            while ranges.get(next).is_some_and(|&[_, stop]| stop <= p) {
                next += 1;
            }
            ranges.get(next).is_some_and(|&[start, _]| start <= p)
        })
        .collect();
    let mask = arrow::array::BooleanArray::from(keep);
    let batch = arrow::compute::filter_record_batch(&batch, &mask)
        .map_err(|e| Error::internal_from("the obs_ranges selection", e))?;
    let positions = positions
        .into_iter()
        .zip(mask.values().iter())
        .filter_map(|(p, kept)| kept.then_some(p))
        .collect();
    Ok((positions, batch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::UInt64Array;

    #[test]
    fn ranges_keep_exactly_their_rows() -> Result<()> {
        let positions: Vec<u64> = vec![0, 2, 3, 4, 7, 8, 9, 12];
        let column = Arc::new(UInt64Array::from(positions.clone()));
        let batch = RecordBatch::try_from_iter([("p", column as arrow::array::ArrayRef)])
            .map_err(|e| Error::internal_from("test batch", e))?;
        let (kept, batch) = keep_in_ranges(positions, batch, &[[1, 3], [4, 5], [8, 12]])?;
        assert_eq!(kept, vec![2, 4, 8, 9]);
        assert_eq!(
            batch
                .column(0)
                .as_primitive::<UInt64Type>()
                .values()
                .to_vec(),
            kept
        );
        Ok(())
    }
}
