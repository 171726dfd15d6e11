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
        let frame = self.frame("obs", "obs_names", true).await?;
        let frame = match self.request.obs_range {
            Some([a, b]) => frame.restrict(a..b),
            None => frame,
        };
        let mut columns = vec!["obs_names".to_string()];
        columns.extend(self.request.columns.iter().flatten().cloned());
        self.select(frame, self.request.filter.as_deref(), columns)
            .await
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
