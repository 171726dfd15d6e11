//! Pushdown is proven, not assumed: partitions and row groups are pruned (seen in the plan's scan
//! metrics), and the answer is the same with pruning off.

use datafusion::physical_plan::display::DisplayableExecutionPlan;
use datafusion::physical_plan::{ExecutionPlan, collect};

use artiflight_server::query::Command;

use crate::common::*;

/// Executes the command and returns its rows plus the plan rendered with metrics.
async fn run(
    registry: &artiflight_server::registry::Registry,
    command: &str,
) -> Result<(Vec<String>, String), Box<dyn std::error::Error + Send + Sync>> {
    let command = Command::from_json(command.as_bytes())?;
    let planner = registry.planner();
    let resolved = planner.resolve(&command).await?;
    let planned = planner.plan(&command, &resolved.sources).await?;
    let plan: std::sync::Arc<dyn ExecutionPlan> = planned.plan.clone();
    let batches = collect(plan.clone(), planned.task.clone()).await?;
    // The plan with its metrics: file groups show which shards were opened, and the scan's
    // pruning counters show how many row groups were skipped.
    let text = DisplayableExecutionPlan::with_metrics(plan.as_ref())
        .indent(true)
        .to_string();
    let mut rows = column_strings(&batches, "id");
    rows.sort();
    Ok((rows, text))
}

fn metric(plan_text: &str, name: &str) -> Option<String> {
    let start = plan_text.find(&format!("{name}="))? + name.len() + 1;
    let rest = &plan_text[start..];
    let end = rest.find([',', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim().to_string())
}

#[tokio::test]
async fn partitions_and_row_groups_are_pruned_and_answers_match() -> TestResult {
    let dir = tempfile::tempdir()?;
    // 4 shards x 20 row groups of 1000 rows, ids sorted: a filter on id hits one row group.
    let folder = write_sorted_folder(&dir.path().join("sorted"), 4, 20_000, 1_000);
    let pruned = registry_with(&dir.path().join("data"), default_config());
    pruned
        .register(folder.to_str().unwrap_or_default(), "sorted", None, true)
        .await?;

    let (rows, plan) = run(&pruned, r#"{"key": "sorted", "filter": "part = 2"}"#).await?;
    assert_eq!(rows.len(), 20_000);
    assert!(plan.contains("part=2/data.parquet"), "{plan}");
    for other in ["part=0/", "part=1/", "part=3/"] {
        assert!(
            !plan.contains(other),
            "partition {other} should not be scanned:\n{plan}"
        );
    }

    let filter = r#"{"key": "sorted", "filter": "id >= 41000 AND id < 41010"}"#;
    let (rows, plan) = run(&pruned, filter).await?;
    assert_eq!(rows.len(), 10);
    let pruning = metric(&plan, "row_groups_pruned_statistics").expect("row group metric in plan");
    assert!(
        pruning.contains("79 pruned") || pruning.contains("1 matched"),
        "row groups: {pruning}\n{plan}"
    );

    // The same answers with every kind of pruning off.
    let mut config = default_config();
    let parquet = &mut config.options_mut().execution.parquet;
    parquet.pruning = false;
    parquet.enable_page_index = false;
    parquet.pushdown_filters = false;
    let unpruned = registry_with(&dir.path().join("data2"), config);
    unpruned
        .register(folder.to_str().unwrap_or_default(), "sorted", None, true)
        .await?;
    for command in [
        filter,
        r#"{"key": "sorted", "filter": "part = 2"}"#,
        r#"{"key": "sorted", "filter": "label = 'l3' AND id % 5 = 0"}"#,
        r#"{"key": "sorted", "filter": "value > 30000.0 OR part = 0"}"#,
    ] {
        let (a, _) = run(&pruned, command).await?;
        let (b, plan) = run(&unpruned, command).await?;
        assert_eq!(a, b, "{command}");
        if command == filter {
            let matched = metric(&plan, "row_groups_pruned_statistics");
            assert!(
                matched.is_none_or(|m| !m.contains("79 pruned")),
                "pruning was off: {plan}"
            );
        }
    }
    Ok(())
}

/// Each endpoint reads only its own files: executing one partition alone never returns rows that
/// belong to another (DataFusion's work stealing would otherwise hand them all to the first).
#[tokio::test]
async fn partitions_read_only_their_own_files() -> TestResult {
    use futures::TryStreamExt;
    let dir = tempfile::tempdir()?;
    let registry = registry_with(&dir.path().join("data"), default_config());
    registry
        .register(demo_dir().to_str().unwrap_or_default(), "demo", None, true)
        .await?;
    let command = Command::from_json(br#"{"key": "demo"}"#)?;
    let resolved = registry.planner().resolve(&command).await?;
    let planned = registry.planner().plan(&command, &resolved.sources).await?;
    assert!(planned.endpoint_count() > 1);
    let mut total = 0;
    for p in 0..planned.endpoint_count() {
        let batches: Vec<_> = planned.execute(p)?.try_collect().await?;
        assert!(
            rows(&batches) < 700,
            "partition {p} read {} rows",
            rows(&batches)
        );
        total += rows(&batches);
    }
    assert_eq!(total, 700);
    Ok(())
}

/// Files that statistics rule out are dropped while planning: a selective filter on a sorted id
/// is one endpoint, not one per partition that opens nothing; a filter matching nothing keeps one
/// (empty) endpoint; and the rows are the same as without pruning.
#[tokio::test]
async fn files_ruled_out_by_statistics_get_no_endpoint() -> TestResult {
    use futures::TryStreamExt;
    let dir = tempfile::tempdir()?;
    let folder = write_sorted_folder(&dir.path().join("sorted"), 4, 20_000, 1_000);
    let registry = registry_with(
        &dir.path().join("data"),
        artiflight_server::query::session_config(2),
    );
    registry
        .register(folder.to_str().unwrap_or_default(), "sorted", None, true)
        .await?;
    let endpoints = |filter: &str| {
        let registry = registry.clone();
        let filter = filter.to_string();
        async move {
            let command = Command {
                key: Some("sorted".into()),
                filter: Some(filter),
                ..Default::default()
            };
            let resolved = registry.planner().resolve(&command).await?;
            let planned = registry.planner().plan(&command, &resolved.sources).await?;
            let mut ids = Vec::new();
            for p in 0..planned.endpoint_count() {
                let batches: Vec<_> = planned.execute(p)?.try_collect().await?;
                ids.extend(column_strings(&batches, "id"));
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((planned.endpoint_count(), ids))
        }
    };
    // The same rows as a registry that prunes nothing, for every filter below.
    let mut config = artiflight_server::query::session_config(2);
    config.options_mut().execution.parquet.pruning = false;
    let unpruned = registry_with(&dir.path().join("data2"), config);
    unpruned
        .register(folder.to_str().unwrap_or_default(), "sorted", None, true)
        .await?;
    for filter in [
        "id >= 41000 AND id < 41010",
        "id < 0",
        "id < 5 OR id >= 79995",
        "label = 'l3'",
    ] {
        let command = Command {
            key: Some("sorted".into()),
            filter: Some(filter.into()),
            ..Default::default()
        };
        let resolved = unpruned.planner().resolve(&command).await?;
        let planned = unpruned.planner().plan(&command, &resolved.sources).await?;
        assert_eq!(
            planned.endpoint_count(),
            2,
            "pruning off keeps every partition"
        );
        let mut all = Vec::new();
        for p in 0..planned.endpoint_count() {
            let batches: Vec<_> = planned.execute(p)?.try_collect().await?;
            all.extend(column_strings(&batches, "id"));
        }
        assert_eq!(endpoints(filter).await?.1, all, "{filter}");
    }

    let (count, ids) = endpoints("id >= 41000 AND id < 41010").await?;
    assert_eq!((count, ids.len()), (1, 10));
    let (count, ids) = endpoints("id < 0").await?;
    assert_eq!((count, ids.len()), (1, 0));
    // Files on both ends survive, in order; the ones between are dropped.
    let (count, ids) = endpoints("id < 5 OR id >= 79995").await?;
    assert_eq!(count, 2);
    assert_eq!(ids.first().map(String::as_str), Some("0"));
    assert_eq!(ids.last().map(String::as_str), Some("79999"));
    assert_eq!(ids.len(), 10);
    // No statistics-proof for a filter on other columns: every partition stays.
    let (count, _) = endpoints("label = 'l3'").await?;
    assert_eq!(count, 2);
    Ok(())
}
