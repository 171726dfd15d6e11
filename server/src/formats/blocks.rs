//! An execution plan over array stores: each partition is a list of row blocks, and each block is
//! read on a blocking thread and becomes one record batch.
//!
//! At most two blocks of a partition are in flight (one being read, one waiting to be sent), so a
//! full scan of a matrix larger than memory streams with bounded memory, and a client that goes
//! away stops the reads after the current block.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Statistics};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{
    Boundedness, EmissionType, ReplaceChildrenOptions,
};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    SendableRecordBatchStream, StatisticsArgs,
};
use futures::{StreamExt, stream};

use super::array::ReadMetrics;
use crate::error::{Error, Result, panic_message};

/// Something that reads record batches by row blocks. Implementations block; [`BlockExec`] calls
/// them on blocking threads.
pub(crate) trait BlockSource: Send + Sync + fmt::Debug + 'static {
    /// The full (unprojected) schema.
    fn schema(&self) -> SchemaRef;

    /// Reads the source's rows `rows` (positions in its own row order), projected.
    fn read(&self, rows: Range<usize>, projection: Option<&[usize]>) -> Result<RecordBatch>;

    /// How many records `rows` of the source's rows make, where that is known without reading
    /// (one per row, unless a row expands into several, as sparse entries in the long layout).
    /// Planners answer `count(*)` from this, so it must be exact or `None`.
    fn records(&self, rows: usize) -> Option<usize> {
        Some(rows)
    }

    /// What the underlying store has read so far.
    fn metrics(&self) -> ReadMetrics;

    /// A short description for `EXPLAIN`.
    fn describe(&self) -> String;
}

/// Reads a [`BlockSource`]: one partition per list of blocks.
#[derive(Debug)]
pub(crate) struct BlockExec {
    source: Arc<dyn BlockSource>,
    partitions: Vec<Vec<Range<usize>>>,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BlockExec {
    pub(crate) fn new(
        source: Arc<dyn BlockSource>,
        partitions: Vec<Vec<Range<usize>>>,
        projection: Option<Vec<usize>>,
    ) -> Result<Self> {
        let full = source.schema();
        let schema = match &projection {
            Some(p) => Arc::new(
                full.project(p)
                    .map_err(|e| Error::internal_from("projecting a block table", e))?,
            ),
            None => full,
        };
        // An empty selection still has one (empty) partition, so the flight has an endpoint.
        let partitions = if partitions.is_empty() {
            vec![Vec::new()]
        } else {
            partitions
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(partitions.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            source,
            partitions,
            projection,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    fn rows(&self, partition: Option<usize>) -> usize {
        let count = |blocks: &Vec<Range<usize>>| blocks.iter().map(|b| b.len()).sum::<usize>();
        match partition {
            Some(p) => self.partitions.get(p).map(count).unwrap_or(0),
            None => self.partitions.iter().map(count).sum(),
        }
    }
}

impl DisplayAs for BlockExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "BlockExec: {}, partitions={}, rows={}",
            self.source.describe(),
            self.partitions.len(),
            self.rows(None)
        )
    }
}

impl ExecutionPlan for BlockExec {
    fn name(&self) -> &'static str {
        "BlockExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::common::Result<TreeNodeRecursion>,
    ) -> datafusion::common::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
        _: ReplaceChildrenOptions,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        _: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::common::Result<SendableRecordBatchStream> {
        let blocks = self.partitions.get(partition).cloned().ok_or_else(|| {
            DataFusionError::Internal(format!("BlockExec has no partition {partition}"))
        })?;
        let reads = MetricBuilder::new(&self.metrics).counter("store_reads", partition);
        let bytes = MetricBuilder::new(&self.metrics).counter("store_bytes_read", partition);
        let source = Arc::clone(&self.source);
        let projection = self.projection.clone();
        let batches = stream::iter(blocks)
            .map(move |rows| {
                let source = Arc::clone(&source);
                let projection = projection.clone();
                let (reads, bytes): (Count, Count) = (reads.clone(), bytes.clone());
                async move {
                    let task = tokio::task::spawn_blocking(move || {
                        let before = source.metrics();
                        let batch = source.read(rows, projection.as_deref());
                        let after = source.metrics();
                        reads.add(after.reads.saturating_sub(before.reads) as usize);
                        bytes.add(after.bytes.saturating_sub(before.bytes) as usize);
                        batch
                    });
                    match task.await {
                        Ok(batch) => batch.map_err(DataFusionError::from),
                        Err(e) if e.is_panic() => Err(Error::DataLoss {
                            location: "the array store".into(),
                            message: format!(
                                "the reader failed on malformed data ({})",
                                panic_message(e.into_panic().as_ref())
                            ),
                        }
                        .into()),
                        Err(e) => Err(DataFusionError::External(Box::new(e))),
                    }
                }
            })
            .buffered(2);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            batches,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> datafusion::common::Result<Arc<Statistics>> {
        let records = self.source.records(self.rows(args.partition()));
        let stats = Statistics::new_unknown(&self.schema)
            .with_num_rows(records.map_or(Precision::Absent, Precision::Exact));
        Ok(Arc::new(stats))
    }
}

/// Splits `n` rows into blocks of at most `block` rows, then groups consecutive blocks into at
/// most `max_partitions` partitions of similar size. `boundary` is the row chunking of the
/// underlying array: partition boundaries fall on chunk boundaries (given the row positions
/// `rows` in the array), so that no chunk is read by two endpoints.
pub(crate) fn split(
    rows: &[u64],
    block: usize,
    max_partitions: usize,
    boundary: u64,
) -> Vec<Vec<Range<usize>>> {
    let n = rows.len();
    if n == 0 {
        return Vec::new();
    }
    let block = block.max(1);
    let boundary = boundary.max(1);
    // Blocks end at the last selected row of a chunk once they hold `block` rows or more, so a
    // chunk is decoded once per block rather than once per neighbouring block.
    let mut blocks = Vec::new();
    let mut start = 0;
    for i in 1..=n {
        let at_end = i == n;
        let chunk_edge = !at_end && rows[i] / boundary != rows[i - 1] / boundary;
        if at_end || (i - start >= block && chunk_edge) || i - start >= block * 4 {
            blocks.push(start..i);
            start = i;
        }
    }
    let parts = max_partitions.clamp(1, blocks.len());
    let per = blocks.len().div_ceil(parts);
    blocks.chunks(per).map(|c| c.to_vec()).collect()
}

/// A [`BlockSource`] with its partitioning, as a DataFusion table.
#[derive(Debug)]
pub(crate) struct BlockTable {
    source: Arc<dyn BlockSource>,
    partitions: Vec<Vec<Range<usize>>>,
}

impl BlockTable {
    pub(crate) fn new(source: Arc<dyn BlockSource>, partitions: Vec<Vec<Range<usize>>>) -> Self {
        Self { source, partitions }
    }
}

#[async_trait::async_trait]
impl TableProvider for BlockTable {
    fn schema(&self) -> SchemaRef {
        self.source.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(BlockExec::new(
            Arc::clone(&self.source),
            self.partitions.clone(),
            projection.cloned(),
        )?))
    }
}

/// [`split`] for a contiguous run of `n` rows: blocks of `block` rows rounded to whole chunks of
/// `chunk` rows, grouped into at most `max_partitions` partitions.
pub(crate) fn split_range(
    n: usize,
    block: usize,
    max_partitions: usize,
    chunk: u64,
) -> Vec<Vec<Range<usize>>> {
    if n == 0 {
        return Vec::new();
    }
    let chunk = chunk.clamp(1, n as u64) as usize;
    let block = block.max(1).div_ceil(chunk) * chunk;
    let blocks: Vec<Range<usize>> = (0..n)
        .step_by(block)
        .map(|s| s..(s + block).min(n))
        .collect();
    let parts = max_partitions.clamp(1, blocks.len());
    let per = blocks.len().div_ceil(parts);
    blocks.chunks(per).map(|c| c.to_vec()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row once, in order, across partitions.
    fn flat(parts: &[Vec<Range<usize>>]) -> Vec<usize> {
        parts.iter().flatten().flat_map(|r| r.clone()).collect()
    }

    #[test]
    fn split_covers_rows_in_order_and_cuts_partitions_at_chunks() {
        // Rows 0, 3, 6, ... of an array chunked by 10 rows.
        let rows: Vec<u64> = (0..1000).map(|i| i * 3).collect();
        for (block, parts) in [(1, 1), (7, 2), (50, 4), (5000, 8)] {
            let split = split(&rows, block, parts, 10);
            assert!(split.len() <= parts.max(1));
            assert_eq!(flat(&split), (0..1000).collect::<Vec<_>>());
            // A partition never starts inside a chunk that the previous one read.
            for pair in split.windows(2) {
                let last = pair[0].last().map(|r| rows[r.end - 1] / 10);
                let first = pair[1].first().map(|r| rows[r.start] / 10);
                assert_ne!(last, first, "block {block}, parts {parts}");
            }
            for blocks in &split {
                assert!(blocks.iter().all(|r| r.len() <= block.max(1) * 4));
            }
        }
        assert!(split(&[], 10, 4, 1).is_empty());
    }

    #[test]
    fn split_range_rounds_blocks_to_whole_chunks() {
        let parts = split_range(1000, 30, 3, 64);
        assert_eq!(flat(&parts), (0..1000).collect::<Vec<_>>());
        assert!(parts.len() <= 3);
        for r in parts.iter().flatten() {
            assert_eq!(r.start % 64, 0, "{r:?} starts mid-chunk");
        }
        assert_eq!(split_range(5, 100, 4, 1), vec![vec![0..5]]);
        assert!(split_range(0, 10, 2, 1).is_empty());
    }
}
