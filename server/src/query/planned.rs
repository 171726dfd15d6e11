//! A planned flight: the physical plan, the task context it runs in, and how its output
//! partitions become endpoints and streams.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::stats::Precision;
use datafusion::execution::TaskContext;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ExecutionPlan, ExecutionPlanProperties, SendableRecordBatchStream,
};
use futures::{StreamExt, TryStreamExt, stream};

use crate::dataframe::statistics;
use crate::error::{Error, Result, panic_message};
use crate::storage::Lease;

/// The read leases a session's plans hold: every artifact a plan opens stays leased while the
/// plan (and any stream executing it) lives, so a permanent delete waits for them.
#[derive(Debug, Default)]
pub(crate) struct LeaseBag(std::sync::Mutex<Vec<Lease>>);

impl LeaseBag {
    pub(super) fn hold(&self, lease: Lease) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(lease);
    }
}

/// A physical plan, ready to execute one endpoint at a time.
///
/// Without a limit, each output partition of the plan is one endpoint. With a limit, the flight is
/// one endpoint that runs the partitions in order and stops once the limit is reached, so that the
/// rows are the first ones in flight order and the scan ends early.
pub struct Planned {
    pub plan: Arc<dyn ExecutionPlan>,
    pub task: Arc<TaskContext>,
    pub limit: Option<usize>,
}

impl Planned {
    pub fn schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    /// The leases on what the plan reads (the session's, which the task context carries).
    fn leases(&self) -> Option<Arc<LeaseBag>> {
        self.task.session_config().get_extension::<LeaseBag>()
    }

    /// How many endpoints (tickets) the flight has.
    pub fn endpoint_count(&self) -> usize {
        match self.limit {
            Some(_) => 1,
            None => self.plan.output_partitioning().partition_count(),
        }
    }

    /// `(total_records, total_bytes)`, each -1 unless known exactly without a scan.
    pub fn totals(&self) -> (i64, i64) {
        let exact = |p: &Precision<usize>| match p {
            Precision::Exact(n) => i64::try_from(*n).unwrap_or(-1),
            _ => -1,
        };
        match statistics(self.plan.as_ref()) {
            Some(stats) => {
                let rows = match (exact(&stats.num_rows), self.limit) {
                    (-1, _) => -1,
                    (n, Some(limit)) => n.min(i64::try_from(limit).unwrap_or(i64::MAX)),
                    (n, None) => n,
                };
                let bytes = if self.limit.is_some() {
                    -1
                } else {
                    exact(&stats.total_byte_size)
                };
                (rows, bytes)
            }
            None => (-1, -1),
        }
    }

    /// Streams endpoint `index`. Lazy: nothing is read until the stream is polled, and dropping
    /// it stops the scan. A reader that panics on malformed data ends the stream with an error.
    pub fn execute(&self, index: usize) -> Result<SendableRecordBatchStream> {
        let stream = self.execute_unguarded(index)?;
        let schema = stream.schema();
        // The stream holds the leases: a delete meanwhile waits for it to end.
        let leases = self.leases();
        let guarded = std::panic::AssertUnwindSafe(stream)
            .catch_unwind()
            .map(move |item| {
                let _held = &leases;
                item.unwrap_or_else(|panic| {
                    Err(Error::DataLoss {
                        location: "the flight's files".into(),
                        message: format!(
                            "the reader failed on malformed data ({})",
                            panic_message(panic.as_ref())
                        ),
                    }
                    .into())
                })
            });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, guarded)))
    }

    fn execute_unguarded(&self, index: usize) -> Result<SendableRecordBatchStream> {
        let Some(limit) = self.limit else {
            return self
                .plan
                .execute(index, Arc::clone(&self.task))
                .map_err(Error::from_datafusion);
        };
        let plan = Arc::clone(&self.plan);
        let task = Arc::clone(&self.task);
        let partitions = plan.output_partitioning().partition_count();
        let schema = plan.schema();
        let batches = stream::iter(0..partitions)
            .map(move |p| plan.execute(p, Arc::clone(&task)))
            .try_flatten()
            .boxed();
        let capped = stream::unfold((batches, limit), |(mut batches, left)| async move {
            if left == 0 {
                return None;
            }
            match batches.next().await? {
                Ok(batch) => {
                    let n = batch.num_rows().min(left);
                    Some((Ok(batch.slice(0, n)), (batches, left - n)))
                }
                Err(e) => Some((Err(e), (batches, 0))),
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, capped)))
    }
}
