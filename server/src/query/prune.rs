//! Pruning files by their statistics while planning, so that a flight has no endpoint for files
//! the filter rules out.
//!
//! DataFusion prunes files by statistics when a scan opens them: a partition whose files all
//! fail the filter still becomes an endpoint, and a client pays a round trip and a re-plan for an
//! empty stream. The statistics are already known at planning (parquet footers, collected with
//! the listing), so this rule drops those files there, and the file groups left empty with them.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::pruning::PrunableStatistics;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::physical_plan::{
    FileGroup, FileScanConfig, FileScanConfigBuilder, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;
use datafusion::physical_plan::ExecutionPlan;

/// Drops parquet files whose statistics prove the scan's predicate false.
///
/// Only scans under a chain of single-input operators are pruned: each of those works on any
/// number of input partitions, and fewer file groups only ever mean fewer partitions. One group
/// is always kept, possibly empty, so that a flight keeps an endpoint.
#[derive(Debug, Default)]
pub(crate) struct PruneFilesByStatistics;

impl PhysicalOptimizerRule for PruneFilesByStatistics {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !config.execution.parquet.pruning || !is_linear(plan.as_ref()) {
            return Ok(plan);
        }
        plan.transform_up(|node| {
            Ok(match pruned_scan(node.as_ref()) {
                Some(pruned) => Transformed::yes(pruned),
                None => Transformed::no(node),
            })
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "prune_files_by_statistics"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

fn is_linear(plan: &dyn ExecutionPlan) -> bool {
    match plan.children().as_slice() {
        [] => true,
        [child] => is_linear(child.as_ref()),
        _ => false,
    }
}

/// The scan without the files its predicate rules out, if it can drop any.
fn pruned_scan(node: &dyn ExecutionPlan) -> Option<Arc<dyn ExecutionPlan>> {
    let scan = (node as &dyn std::any::Any).downcast_ref::<DataSourceExec>()?;
    let config = scan.data_source().downcast_ref::<FileScanConfig>()?;
    let source = config.file_source();
    source.downcast_ref::<ParquetSource>()?;
    let predicate = source.filter()?;
    let pruning = PruningPredicateBuilder::new()
        .with_file_schema(Arc::clone(source.table_schema().table_schema()))
        .try_build(predicate)
        .ok()?;
    if pruning.always_true() {
        return None;
    }
    let files: Vec<_> = config
        .file_groups
        .iter()
        .flat_map(FileGroup::iter)
        .collect();
    // Without statistics for every file nothing is known; such files are simply kept.
    let statistics = files
        .iter()
        .map(|f| f.statistics.clone())
        .collect::<Option<Vec<_>>>()?;
    let keep = pruning
        .prune(&PrunableStatistics::new(
            statistics,
            // File statistics list the file's columns, then the partition columns' values.
            Arc::clone(source.table_schema().table_schema()),
        ))
        .ok()?;
    if keep.iter().all(|k| *k) {
        return None;
    }
    let mut keep = keep.into_iter();
    let mut groups: Vec<FileGroup> = config
        .file_groups
        .iter()
        .map(|group| {
            let kept: Vec<_> = group
                .iter()
                .filter(|_| keep.next().unwrap_or(true))
                .cloned()
                .collect();
            FileGroup::new(kept)
        })
        .filter(|group| !group.is_empty())
        .collect();
    if groups.is_empty() {
        groups.push(FileGroup::new(Vec::new()));
    }
    let pruned = FileScanConfigBuilder::from(config.clone())
        .with_file_groups(groups)
        .build();
    Some(DataSourceExec::from_data_source(pruned))
}
