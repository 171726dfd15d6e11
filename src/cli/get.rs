//! `artiflight get`: reads a flight and prints its first rows or writes a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use artiflight_client::Request;
use clap::Args;
use futures::StreamExt;

use super::{DEFAULT_SERVER, Global};

#[derive(Args, Debug)]
pub(crate) struct Get {
    key: String,
    /// Element path, e.g. `X` or `layers/counts`.
    #[arg(long, env = "ARTIFLIGHT_ELEMENT")]
    element: Option<String>,
    /// SQL boolean expression, e.g. "louvain = 3 AND n_genes > 700".
    #[arg(long, env = "ARTIFLIGHT_FILTER")]
    filter: Option<String>,
    /// Comma-separated output columns.
    #[arg(long, env = "ARTIFLIGHT_COLUMNS", value_delimiter = ',')]
    columns: Option<Vec<String>>,
    #[arg(long, env = "ARTIFLIGHT_LIMIT")]
    limit: Option<u64>,
    #[arg(long, env = "ARTIFLIGHT_VERSION")]
    version: Option<String>,
    /// AnnData: comma-separated variables (genes), in the order wanted, e.g. `CD3E,MS4A1`.
    #[arg(long, env = "ARTIFLIGHT_VAR_NAMES", value_delimiter = ',')]
    var_names: Option<Vec<String>>,
    /// AnnData: a SQL boolean expression on `var` that selects variables, e.g. `highly_variable`.
    #[arg(long, env = "ARTIFLIGHT_VAR_FILTER")]
    var_filter: Option<String>,
    /// AnnData: a half-open range of observation positions, `START:STOP` (e.g. `0:1000`).
    #[arg(long, env = "ARTIFLIGHT_OBS_RANGE", value_parser = parse_range)]
    obs_range: Option<[u64; 2]>,
    /// AnnData matrices: `dense`, `sparse`, `wide` (one column per variable) or `long`.
    #[arg(long, env = "ARTIFLIGHT_LAYOUT", value_parser = ["dense", "sparse", "wide", "long"])]
    layout: Option<String>,
    /// Write to this file (.parquet, .arrow or .csv) instead of printing.
    #[arg(long, env = "ARTIFLIGHT_OUT")]
    out: Option<PathBuf>,
    /// Rows to print when not writing a file.
    #[arg(long, env = "ARTIFLIGHT_PREVIEW", default_value_t = 20)]
    preview: usize,
}

/// Always through a server: the one given, or the default address.
pub(crate) async fn run(global: &Global, get: Get) -> Result<()> {
    let url = global.server.as_deref().unwrap_or(DEFAULT_SERVER);
    let client = global.connect(url).await?;
    let mut request = Request::key(&get.key);
    if let Some(element) = &get.element {
        request = request.element(element.split('/'));
    }
    if let Some(filter) = get.filter {
        request = request.filter(filter);
    }
    if let Some(columns) = get.columns {
        request = request.columns(columns);
    }
    if let Some(limit) = get.limit {
        request = request.limit(limit);
    }
    if let Some(version) = get.version {
        request = request.version(version);
    }
    if let Some(names) = get.var_names {
        request = request.field("var_names", serde_json::json!(names));
    }
    if let Some(filter) = get.var_filter {
        request = request.field("var_filter", serde_json::json!(filter));
    }
    if let Some(range) = get.obs_range {
        request = request.field("obs_range", serde_json::json!(range));
    }
    if let Some(layout) = get.layout {
        request = request.field("layout", serde_json::json!(layout));
    }
    let info = client.info(&request).await?;
    let total = u64::try_from(info.total_records).ok();
    let (schema, mut stream) = client.get_info(&info)?;
    let progress = progress_bar(total);
    let Some(out) = get.out else {
        // Preview: stop pulling once enough rows arrived; dropping the stream ends the scan.
        let mut batches = Vec::new();
        let mut rows = 0;
        while rows < get.preview {
            let Some(batch) = stream.next().await else {
                break;
            };
            let batch = batch?;
            rows += batch.num_rows();
            batches.push(batch);
        }
        drop(stream);
        print_preview(&schema, &batches, get.preview, total)?;
        return Ok(());
    };
    let mut writer = Writer::create(&out, &schema)?;
    let mut rows = 0u64;
    let mut bytes = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        rows += batch.num_rows() as u64;
        bytes += batch.get_array_memory_size() as u64;
        progress.set_position(rows);
        progress.set_message(indicatif::HumanBytes(bytes).to_string());
        writer.write(&batch)?;
    }
    writer.finish()?;
    progress.finish_and_clear();
    eprintln!("wrote {rows} rows to {}", out.display());
    Ok(())
}

/// A bar when the flight's row count is known; otherwise (a filter, a query set) a spinner with
/// the rows and bytes so far, never "N/0".
fn progress_bar(total: Option<u64>) -> indicatif::ProgressBar {
    let (bar, template) = match total {
        Some(total) => (
            indicatif::ProgressBar::new(total),
            "{spinner} {human_pos}/{human_len} rows, {msg} {per_sec} [{elapsed}]",
        ),
        None => (
            indicatif::ProgressBar::new_spinner(),
            "{spinner} {human_pos} rows, {msg} {per_sec} [{elapsed}]",
        ),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar
}

/// `START:STOP`, a half-open range of positions.
fn parse_range(text: &str) -> Result<[u64; 2], String> {
    let (start, stop) = text
        .split_once(':')
        .ok_or_else(|| format!("'{text}' is not START:STOP"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|e| format!("'{s}' in '{text}': {e}"))
    };
    let range = [number(start)?, number(stop)?];
    if range[0] > range[1] {
        return Err(format!("'{text}': START is after STOP"));
    }
    Ok(range)
}

fn print_preview(
    schema: &SchemaRef,
    batches: &[RecordBatch],
    preview: usize,
    total: Option<u64>,
) -> Result<()> {
    let shown: Vec<RecordBatch> = {
        let mut left = preview;
        batches
            .iter()
            .map_while(|b| {
                if left == 0 {
                    return None;
                }
                let n = left.min(b.num_rows());
                left -= n;
                Some(b.slice(0, n))
            })
            .collect()
    };
    let shown = shown
        .iter()
        .map(abbreviate)
        .collect::<Result<Vec<_>, _>>()?;
    let table = if shown.is_empty() {
        arrow::util::pretty::pretty_format_batches(&[RecordBatch::new_empty(Arc::clone(schema))])?
    } else {
        arrow::util::pretty::pretty_format_batches(&shown)?
    };
    println!("{table}");
    let count: usize = shown.iter().map(|b| b.num_rows()).sum();
    match total {
        Some(total) => println!("{count} of {total} rows shown"),
        None => println!("{count} rows shown"),
    }
    Ok(())
}

/// The longest cell a preview prints; a matrix row of thousands of values is cut, as anndata's
/// repr cuts arrays.
const PREVIEW_CELL: usize = 72;

/// A batch with each cell rendered as text and long cells (matrix rows) cut short.
fn abbreviate(batch: &RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    use arrow::array::{ArrayRef, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("null");
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
        let cells = (0..column.len()).map(|i| {
            let text = formatter.value(i).to_string();
            match text.char_indices().nth(PREVIEW_CELL) {
                Some((cut, _)) => format!("{} …", &text[..cut]),
                None => text,
            }
        });
        columns.push(Arc::new(StringArray::from_iter_values(cells)));
        fields.push(Field::new(field.name(), DataType::Utf8, true));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// Output files by extension.
enum Writer {
    Parquet(parquet::arrow::ArrowWriter<std::fs::File>),
    Arrow(arrow::ipc::writer::FileWriter<std::fs::File>),
    Csv(arrow::csv::Writer<std::fs::File>),
}

impl Writer {
    fn create(path: &Path, schema: &SchemaRef) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !matches!(
            ext.as_str(),
            "parquet" | "arrow" | "feather" | "ipc" | "csv"
        ) {
            bail!(
                "--out must end in .parquet, .arrow or .csv, not '{}'",
                path.display()
            );
        }
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(match ext.as_str() {
            "parquet" => Writer::Parquet(parquet::arrow::ArrowWriter::try_new(
                file,
                Arc::clone(schema),
                None,
            )?),
            "csv" => Writer::Csv(arrow::csv::Writer::new(file)),
            _ => Writer::Arrow(arrow::ipc::writer::FileWriter::try_new(
                file,
                &hydrated_schema(schema),
            )?),
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            Writer::Parquet(w) => w.write(batch)?,
            // The IPC file format allows one dictionary per column for the whole file, while
            // each streamed batch brings its own: write the values instead.
            Writer::Arrow(w) => w.write(&hydrate(batch)?)?,
            Writer::Csv(w) => w.write(&hydrate(batch)?)?,
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self {
            Writer::Parquet(w) => {
                w.close()?;
            }
            Writer::Arrow(mut w) => w.finish()?,
            Writer::Csv(_) => {}
        }
        Ok(())
    }
}

/// The schema with dictionary columns replaced by their value types.
fn hydrated_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Vec<arrow::datatypes::Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            arrow::datatypes::DataType::Dictionary(_, value) => {
                f.as_ref().clone().with_data_type(value.as_ref().clone())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields,
        schema.metadata().clone(),
    ))
}

/// The batch with dictionary columns cast to their values.
fn hydrate(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = hydrated_schema(&batch.schema());
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| arrow::compute::cast(column, field.data_type()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema, columns)?)
}
