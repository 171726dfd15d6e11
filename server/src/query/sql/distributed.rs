//! Distributed SQL over a fleet, on datafusion-distributed (docs/DESIGN.md explains the choice).
//!
//! With several live servers, a statement that exchanges data between partitions (a join, an
//! aggregate, a sort) over file scans is planned again by datafusion-distributed: its stages run
//! as tasks on the fleet's servers, each of which serves the worker service on its Flight port
//! ([`crate::service`]). A statement whose partitions are independent scans is left as it is: its
//! partitions are already endpoints that clients fetch from the fleet in parallel. With one live
//! server nothing changes at all.

use std::sync::Arc;

use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use datafusion::physical_plan::placeholder_row::PlaceholderRowExec;
use datafusion_distributed::{DistributedExt, SessionStateBuilderExt, WorkerResolver};
use tonic::codegen::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};

use crate::error::{Error, Result};

/// Where a statement's stages may run, and how finely scans are split.
#[derive(Clone)]
pub struct Distribution {
    /// The fleet's live servers, as worker URLs (`http://host:port`).
    pub workers: Arc<dyn WorkerResolver>,
    /// Bytes of files a scan task reads: a table smaller than this stays in one task.
    pub scan_bytes_per_task: usize,
}

impl std::fmt::Debug for Distribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Distribution")
            .field("workers", &self.workers.get_urls().map(|u| u.len()))
            .field("scan_bytes_per_task", &self.scan_bytes_per_task)
            .finish()
    }
}

impl Distribution {
    /// Whether `plan` (planned for one server, exchanging data between its partitions) should be
    /// planned again across the fleet: the fleet has several servers and every leaf can travel.
    pub(super) fn applies_to(&self, plan: &dyn ExecutionPlan) -> bool {
        portable(plan) && self.workers.get_urls().is_ok_and(|urls| urls.len() > 1)
    }

    /// `base` with the distributed planner. The caller's `authorization` travels with every task,
    /// so each worker checks the same token against the shared catalog.
    pub(super) fn state(
        &self,
        base: &SessionState,
        authorization: Option<&str>,
    ) -> Result<SessionState> {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            let value = HeaderValue::from_str(value)
                .map_err(|_| Error::invalid("the authorization header is not valid text"))?;
            headers.insert(AUTHORIZATION, value);
        }
        Ok(SessionStateBuilder::new_from_existing(base.clone())
            .with_distributed_worker_resolver(Arc::clone(&self.workers))
            .with_distributed_file_scan_config_bytes_per_partition(self.scan_bytes_per_task.max(1))?
            .with_distributed_passthrough_headers(headers)?
            .with_distributed_planner()
            .build())
    }
}

/// Whether every leaf of `plan` can run on another server: a file scan, which names its files by
/// URL, or a constant. Our own leaves (AnnData matrices, long-form tables) hold open stores and
/// keep their queries on one server.
fn portable(plan: &dyn ExecutionPlan) -> bool {
    let children = plan.children();
    if children.is_empty() {
        let file_scan = plan
            .downcast_ref::<DataSourceExec>()
            .is_some_and(|d| d.data_source().downcast_ref::<FileScanConfig>().is_some());
        return file_scan || plan.is::<EmptyExec>() || plan.is::<PlaceholderRowExec>();
    }
    children.iter().all(|c| portable(c.as_ref()))
}
