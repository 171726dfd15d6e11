//! The fleet's worker service: stages of distributed SQL queries planned by other servers run here
//! (datafusion-distributed's `WorkerService`, served on the Flight port beside Flight).
//!
//! A task arrives as an encoded physical plan. Before it runs, every file it scans is checked
//! against this server's allowed roots, exactly as a Flight request's files are, and every server
//! it would fetch from must be a live member of the fleet: a decoded plan is a request like any
//! other, not an order.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_plan::ExecutionPlan;
use datafusion_distributed::{
    DistributedExt, NetworkBoundaryExt, Stage, Worker, WorkerPlanRewriteEvent,
    WorkerPlanRewriteEventResponse, WorkerQueryContext, WorkerResolver,
};
use tonic::codegen::http::{HeaderMap, header::AUTHORIZATION};
use url::Url;

use super::fleet::Fleet;
use crate::query::Planner;
use crate::storage::Storage;

/// The worker URL of a fleet member advertised as `grpc://host:port`. Only plaintext members are
/// workers: datafusion-distributed's channels carry no TLS roots, so a TLS fleet runs each
/// statement on the server asked.
fn worker_url(advertised: &str) -> Option<Url> {
    let rest = advertised.strip_prefix("grpc://")?;
    Url::parse(&format!("http://{rest}")).ok()
}

impl WorkerResolver for Fleet {
    /// The live plaintext servers. A fleet with a TLS member lists none, so nothing is spread.
    fn get_urls(&self) -> Result<Vec<Url>, DataFusionError> {
        let live = self.live();
        Ok(live
            .iter()
            .map(|server| worker_url(server))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default())
    }
}

/// The worker service of this server, on `planner`'s runtime (its object stores, memory pool and
/// spill directory), checking every task against `fleet`.
pub(super) fn worker(planner: &Planner, fleet: Arc<Fleet>) -> Worker {
    let runtime = planner.runtime();
    let storage = Arc::clone(planner.storage());
    let check_runtime = Arc::clone(&runtime);
    let build = move |ctx: WorkerQueryContext| {
        let (storage, runtime, fleet) = (
            Arc::clone(&storage),
            Arc::clone(&check_runtime),
            Arc::clone(&fleet),
        );
        async move {
            // A task's own calls to the servers running its inputs carry the caller's token on.
            let mut forwarded = HeaderMap::new();
            if let Some(value) = ctx.headers.get(AUTHORIZATION) {
                forwarded.insert(AUTHORIZATION, value.clone());
            }
            Ok(ctx
                .builder
                .with_distributed_passthrough_headers(forwarded)?
                .with_distributed_worker_plan_rewrite_handler(
                    move |event: WorkerPlanRewriteEvent<'_>| {
                        admit(&event.plan, &storage, &runtime, fleet.as_ref())?;
                        Ok(WorkerPlanRewriteEventResponse::new(event.plan))
                    },
                )
                .build())
        }
    };
    Worker::from_session_builder(build).with_runtime_env(runtime)
}

/// Refuses a task that reads outside the allowed roots or fetches from a server outside the
/// fleet, and makes the remote stores it reads known to the runtime.
fn admit(
    plan: &Arc<dyn ExecutionPlan>,
    storage: &Storage,
    runtime: &RuntimeEnv,
    fleet: &Fleet,
) -> Result<(), DataFusionError> {
    let members = fleet.get_urls()?;
    plan.apply(|node| {
        admit_node(node.as_ref(), storage, runtime, &members)?;
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(())
}

fn admit_node(
    node: &dyn ExecutionPlan,
    storage: &Storage,
    runtime: &RuntimeEnv,
    members: &[Url],
) -> Result<(), DataFusionError> {
    if let Some(boundary) = node.as_network_boundary()
        && let Stage::Remote(stage) = boundary.input_stage()
        && let Some(stranger) = stage.workers.iter().find(|w| !members.contains(w))
    {
        return Err(DataFusionError::Plan(format!(
            "a task names {stranger}, which is not a live server of this fleet"
        )));
    }
    let Some(scan) = node
        .downcast_ref::<DataSourceExec>()
        .and_then(|d| d.data_source().downcast_ref::<FileScanConfig>())
    else {
        return Ok(());
    };
    let base = Url::parse(scan.object_store_url.as_str())
        .map_err(|e| DataFusionError::Plan(format!("a task's store URL: {e}")))?;
    for file in scan.file_groups.iter().flat_map(|g| g.iter()) {
        let url = base
            .join(file.object_meta.location.as_ref())
            .map_err(|e| DataFusionError::Plan(format!("a task's file URL: {e}")))?;
        storage
            .check_allowed(&url)
            .map_err(|e| DataFusionError::Plan(e.to_string()))?;
    }
    if base.scheme() != "file" && runtime.object_store(&scan.object_store_url).is_err() {
        let (store, _) = storage
            .object_store(&base)
            .map_err(|e| DataFusionError::Plan(e.to_string()))?;
        runtime.register_object_store(&base, store);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plaintext_members_are_workers() {
        assert_eq!(
            worker_url("grpc://127.0.0.1:5005").map(|u| u.to_string()),
            Some("http://127.0.0.1:5005/".to_string())
        );
        assert_eq!(worker_url("grpc+tls://example:443"), None);
        let fleet = Fleet::new("grpc+tls://a:1");
        assert!(fleet.get_urls().is_ok_and(|urls| urls.is_empty()));
    }

    /// A parquet scan of `path` (a local absolute path), as a decoded task holds it.
    fn scan(path: &str) -> Arc<dyn ExecutionPlan> {
        use arrow::datatypes::{DataType, Field, Schema};
        use datafusion::datasource::listing::PartitionedFile;
        use datafusion::datasource::physical_plan::{FileScanConfigBuilder, ParquetSource};
        use datafusion::execution::object_store::ObjectStoreUrl;
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let config = FileScanConfigBuilder::new(
            ObjectStoreUrl::local_filesystem(),
            Arc::new(ParquetSource::new(schema)),
        )
        .with_file(PartitionedFile::new(path.trim_start_matches('/'), 10))
        .build();
        DataSourceExec::from_data_source(config)
    }

    #[test]
    fn a_task_reading_outside_the_allowed_roots_is_refused() -> crate::error::Result<()> {
        let dir = tempfile::tempdir().map_err(|e| crate::error::Error::io("tempdir", e))?;
        let storage = Storage::new(dir.path(), &[])?;
        let runtime = RuntimeEnv::default();
        let fleet = Fleet::new("grpc://127.0.0.1:1");
        let inside = storage.data_dir().join("objects").join("x.parquet");
        let inside = inside.to_str().unwrap_or_default().to_string();
        assert!(admit(&scan(&inside), &storage, &runtime, &fleet).is_ok());
        let refused = admit(&scan("/etc/passwd"), &storage, &runtime, &fleet)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(refused.contains("outside"), "{refused}");
        Ok(())
    }
}
