//! Reads the demo data from a running server.
//!
//! ```sh
//! cargo run -- serve --demo &           # in the repository root
//! cargo run -p artiflight-client --example read_demo -- grpc://127.0.0.1:8815
//! ```

use artiflight_client::{Client, Request};

#[tokio::main]
async fn main() -> Result<(), artiflight_client::Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "grpc://127.0.0.1:8815".into());
    let client = Client::connect(&url).await?;
    for info in client.list(None).await? {
        let record: serde_json::Value = serde_json::from_slice(&info.app_metadata)?;
        println!(
            "{:<32} {:>8} rows",
            record["key"].as_str().unwrap_or(""),
            info.total_records
        );
    }
    let request = Request::key("sharded_parquet")
        .filter("cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05")
        .columns(["cell_type", "n_genes", "louvain"]);
    let (schema, batches) = client.collect(&request).await?;
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    println!(
        "{rows} rows with columns {:?}",
        schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
    );
    println!(
        "{}",
        arrow::util::pretty::pretty_format_batches(&batches[..batches.len().min(1)])?
    );
    Ok(())
}
