//! Golden plans: what each kind of request becomes, as DataFusion shows its physical plan. A
//! change in pruning, pushdown or partitioning shows up here as a diff to review, before any
//! number changes.
//!
//! The expected plans live in `tests/plans/NAME.txt`. After an intended change, regenerate them
//! with `ARTIFLIGHT_BLESS=1 cargo test --test e2e plans::` and review the diff.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use artiflight_server::query::{Command, SqlPlanner, Statement, session_config};
use artiflight_server::registry::Registry;
use datafusion::physical_plan::{ExecutionPlan, displayable};
use serde_json::json;

use crate::common::*;

/// Two partitions, so that every plan shows how a scan splits into endpoints.
const PARTITIONS: usize = 2;

async fn demo_registry(data: &Path) -> Result<Registry, Box<dyn std::error::Error + Send + Sync>> {
    let registry = registry_with(data, session_config(PARTITIONS));
    let demo = demo_dir();
    registry
        .register(
            demo.to_str().unwrap_or_default(),
            "sharded_parquet",
            None,
            true,
        )
        .await?;
    let h5ad = demo_file("pbmc68k.h5ad");
    registry
        .register(
            h5ad.to_str().unwrap_or_default(),
            "pbmc68k.h5ad",
            None,
            true,
        )
        .await?;
    Ok(registry)
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/plans")
        .join(format!("{name}.txt"))
}

/// The plan as text, with the machine's paths replaced by names.
fn shown(plan: &Arc<dyn ExecutionPlan>, data: &Path) -> String {
    let mut text = displayable(plan.as_ref()).indent(true).to_string();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (path, name) in [(data, "$DATA"), (root, "$REPO")] {
        let path = path.to_string_lossy();
        text = text.replace(path.as_ref(), name);
        text = text.replace(path.trim_start_matches('/'), name);
    }
    text
}

/// Compares `plan` with the golden file `name`, or writes it when blessing.
fn check(name: &str, request: &str, plan: &Arc<dyn ExecutionPlan>, data: &Path) -> TestResult {
    let actual = format!("{request}\n\n{}", shown(plan, data));
    let path = golden(name);
    if std::env::var_os("ARTIFLIGHT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().ok_or("no parent")?)?;
        std::fs::write(&path, &actual)?;
        return Ok(());
    }
    let expected = std::fs::read_to_string(&path)
        .map_err(|e| format!("{}: {e} (ARTIFLIGHT_BLESS=1 writes it)", path.display()))?;
    assert_eq!(
        actual, expected,
        "the plan of '{name}' changed; if intended, regenerate with ARTIFLIGHT_BLESS=1"
    );
    Ok(())
}

async fn command_plan(
    registry: &Registry,
    command: serde_json::Value,
) -> Result<Arc<dyn ExecutionPlan>, Box<dyn std::error::Error + Send + Sync>> {
    let command = Command::from_json(command.to_string().as_bytes())?;
    let planner = registry.planner();
    let resolved = planner.resolve(&command).await?;
    Ok(planner.plan(&command, &resolved.sources).await?.plan)
}

#[tokio::test]
async fn flight_commands_plan_as_recorded() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let registry = demo_registry(&data).await?;
    let cases = [
        // Hive pruning: one partition's file, one endpoint.
        (
            "hive_partition",
            json!({"key": "sharded_parquet", "filter": "louvain = 3"}),
        ),
        // Statistics: the predicate and the pruning predicate reach the parquet scan.
        (
            "parquet_predicate",
            json!({"key": "sharded_parquet", "filter": "n_genes > 1500",
                   "columns": ["cell_type", "n_genes"]}),
        ),
        ("limit", json!({"key": "sharded_parquet", "limit": 5})),
        // An obs predicate selects the rows of X before any of X is read.
        (
            "anndata_obs_filter",
            json!({"key": "pbmc68k.h5ad", "element": ["X"],
                   "filter": "percent_mito <= 0.01", "var_names": ["HES4", "TNFRSF4"]}),
        ),
        (
            "anndata_sparse_layout",
            json!({"key": "pbmc68k.h5ad", "element": ["X"], "obs_range": [10, 20],
                   "layout": "sparse"}),
        ),
    ];
    for (name, command) in cases {
        let plan = command_plan(&registry, command.clone()).await?;
        check(name, &command.to_string(), &plan, &data)?;
    }
    Ok(())
}

#[tokio::test]
async fn sql_statements_plan_as_recorded() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let registry = demo_registry(&data).await?;
    let sql = SqlPlanner::new(registry.planner().clone());
    let cases = [
        // A filtered scan keeps its partitions: each is an endpoint.
        (
            "sql_scan",
            "SELECT cell_type, n_genes FROM sharded_parquet WHERE louvain = 3 AND n_genes > 1000",
        ),
        // A group-by repartitions: its partitions are merged into one endpoint.
        (
            "sql_group_by",
            "SELECT cell_type, count(*) AS n FROM sharded_parquet GROUP BY cell_type",
        ),
        // Name predicates on KEY/X reach the matrix read.
        (
            "sql_long_names",
            "SELECT obs_name, value FROM \"pbmc68k.h5ad/X\" WHERE var_name IN ('HES4', 'TNFRSF4')",
        ),
    ];
    for (name, query) in cases {
        let plan = sql.plan(&Statement::new(query)).await?.planned.plan;
        check(name, query, &plan, &data)?;
    }
    Ok(())
}
