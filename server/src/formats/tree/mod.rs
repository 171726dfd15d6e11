//! Trees of arrays in HDF5 (`.h5ad`, `.h5`) and zarr stores: AnnData, the AnnData tables of
//! SpatialData stores, and any other hierarchy of datasets. One reader over both array storages.
//!
//! Elements map to tables as docs/PROTOCOL.md section 5 lays out. `obs` and `var` are dataframes
//! ([`frame`]); matrices ([`matrix`]) are read for a selection: a `filter` on `obs` is planned by
//! DataFusion over the `obs` table, and the rows it selects are then the only rows of `X` read.
//! Generic datasets ([`generic`]) are served as a column (1-D) or as fixed-size lists (2-D).

mod frame;
mod generic;
mod matrix;
mod select;
mod structure;
mod write;

pub(crate) use write::{add_column, json_values};

use std::sync::Arc;

use arrow::array::AsArray;
use async_trait::async_trait;
use datafusion::catalog::TableProvider;
use datafusion::datasource::{MemTable, ViewTable};
use datafusion::prelude::SessionContext;

use super::array::{self, ArrayStore};
use super::blocks::{BlockSource, BlockTable, split, split_range};
use super::{Format, Inspection, Layout, Opened, ReadRequest};
use crate::dataframe::{apply_filter, select_columns};
use crate::error::{Error, Result};
use crate::storage::Located;
use frame::Frame;
use matrix::{Encoding, Matrix, MatrixSource, Output, Selection};

/// Rows per record batch of a dataframe.
const FRAME_BLOCK_ROWS: usize = 64 * 1024;
/// Bytes of a matrix selection per endpoint, above which it splits into several.
const ENDPOINT_BYTES: u64 = 4 << 20;

/// The format of HDF5 and zarr trees: what a tree holds (AnnData, SpatialData, other arrays)
/// decides how its elements read as tables.
pub struct ArrayTree;

/// What a store holds.
#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// An AnnData at the root.
    AnnData,
    /// A SpatialData store with these AnnData tables (under `tables/`).
    SpatialData(Vec<String>),
    /// Any other hierarchy of arrays.
    Generic,
}

fn kind(store: &dyn ArrayStore) -> Result<Kind> {
    if is_anndata(store, "")? {
        return Ok(Kind::AnnData);
    }
    if store.is_group("tables")? {
        let mut tables = Vec::new();
        for name in store.children("tables")? {
            if is_anndata(store, &array::join("tables", &name))? {
                tables.push(name);
            }
        }
        if !tables.is_empty() {
            return Ok(Kind::SpatialData(tables));
        }
    }
    Ok(Kind::Generic)
}

fn is_anndata(store: &dyn ArrayStore, path: &str) -> Result<bool> {
    if !store.is_group(path)? {
        return Ok(false);
    }
    if store.encoding(path)?.as_deref() == Some("anndata") {
        return Ok(true);
    }
    // Files from anndata < 0.7 carry no encoding: recognise them by their elements, so that the
    // refusal says what they are.
    Ok(store.node(&array::join(path, "obs"))?.is_some()
        && store.node(&array::join(path, "var"))?.is_some())
}

/// Opens a store on a blocking thread.
async fn open_store(located: &Located) -> Result<Arc<dyn ArrayStore>> {
    let located = located.clone();
    let suffix = super::artifact_suffix(&located);
    blocking(move || array::open_store(&located, &suffix)).await
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err(Error::DataLoss {
            location: "the array store".into(),
            message: format!(
                "the reader failed on malformed data ({})",
                crate::error::panic_message(e.into_panic().as_ref())
            ),
        }),
        Err(e) => Err(Error::internal_from("blocking task failed", e)),
    }
}

/// The elements of an AnnData (or a SpatialData table) that SQL reads as tables.
const SQL_ELEMENTS: [&str; 3] = ["obs", "var", "X"];

#[async_trait]
impl Format for ArrayTree {
    fn name(&self) -> &'static str {
        "anndata/hdf5/zarr"
    }

    fn claims(&self, suffix: &str) -> bool {
        matches!(suffix, ".h5ad" | ".h5" | ".hdf5" | ".zarr")
    }

    async fn open(
        &self,
        ctx: &SessionContext,
        located: &Located,
        request: &ReadRequest,
    ) -> Result<Opened> {
        let store = open_store(located).await?;
        let s = Arc::clone(&store);
        let kind = blocking(move || kind(s.as_ref())).await?;
        let element = request.element.as_slice();
        let (prefix, rest) = match (&kind, element) {
            (Kind::AnnData, rest) => (String::new(), rest),
            (Kind::SpatialData(tables), [t, name, rest @ ..]) if t == "tables" => {
                if !tables.contains(name) {
                    return Err(Error::not_found(format!(
                        "no table '{name}' in {}; its tables are {tables:?}",
                        store.location()
                    )));
                }
                (array::join("tables", name), rest)
            }
            (Kind::SpatialData(tables), []) if tables.len() == 1 => {
                (array::join("tables", &tables[0]), &[][..])
            }
            (Kind::SpatialData(tables), _) => {
                return Err(Error::not_found(format!(
                    "{} is a SpatialData store: name a table as [KEY, \"tables\", NAME, ...]; its \
                     tables are {tables:?}",
                    store.location()
                )));
            }
            (Kind::Generic, _) => {
                let table = generic::open(ctx, store, element).await?;
                return Ok(Opened {
                    table,
                    selected: false,
                });
            }
        };
        if !matches!(rest, [] | [_] | [_, _]) {
            return Err(Error::not_found(format!(
                "no element {:?} in {}",
                request.element,
                store.location()
            )));
        }
        let table = Element {
            ctx,
            store,
            prefix,
            request,
        }
        .open(rest)
        .await?;
        Ok(Opened {
            table,
            selected: true,
        })
    }

    async fn inspect(&self, _ctx: &SessionContext, located: &Located) -> Result<Inspection> {
        let store = open_store(located).await?;
        blocking(move || {
            let kind = kind(store.as_ref())?;
            let (otype, root) = match &kind {
                Kind::AnnData => ("AnnData", String::new()),
                Kind::SpatialData(tables) => ("SpatialData", array::join("tables", &tables[0])),
                Kind::Generic => {
                    return Ok(Inspection::default());
                }
            };
            let n_obs = structure::shape(store.as_ref(), &root)?.map(|s| s[0]);
            Ok(Inspection {
                otype: Some(otype.to_string()),
                n_observations: n_obs,
                schema: None,
            })
        })
        .await
    }

    fn has_structure(&self) -> bool {
        true
    }

    /// An AnnData shows `KEY/obs`, `KEY/var` and `KEY/X` (long form). SpatialData and other trees
    /// list none, though a SpatialData table is still readable as `KEY/tables/NAME/obs`.
    fn sql_tables(&self, otype: Option<&str>) -> Vec<Vec<String>> {
        if otype != Some("AnnData") {
            return Vec::new();
        }
        SQL_ELEMENTS.iter().map(|e| vec![e.to_string()]).collect()
    }

    fn sql_request(&self, key: &str, element: &[String]) -> Result<Option<ReadRequest>> {
        let Some(last) = element.last() else {
            return Err(Error::invalid(format!(
                "'{key}' holds arrays, not one table: query \"{key}/obs\", \"{key}/var\" or \
                 \"{key}/X\" (a SpatialData table: \"{key}/tables/NAME/obs\")"
            )));
        };
        if !SQL_ELEMENTS.contains(&last.as_str()) {
            return Ok(None);
        }
        Ok(Some(ReadRequest {
            element: element.to_vec(),
            // SQL reads a matrix one entry per row.
            layout: (last == "X").then_some(Layout::Long),
            ..Default::default()
        }))
    }

    async fn describe(&self, located: &Located, values: bool) -> Result<Option<serde_json::Value>> {
        let store = open_store(located).await?;
        blocking(move || {
            let kind = kind(store.as_ref())?;
            let value = match kind {
                Kind::AnnData => structure::anndata(store.as_ref(), "", values)?,
                Kind::SpatialData(tables) => {
                    structure::spatialdata(store.as_ref(), &tables, values)?
                }
                Kind::Generic => structure::tree(store.as_ref())?,
            };
            Ok(Some(value))
        })
        .await
    }
}

/// One AnnData element being opened for a request.
struct Element<'a> {
    ctx: &'a SessionContext,
    store: Arc<dyn ArrayStore>,
    /// The AnnData's path in the store (`""`, or `tables/NAME` in a SpatialData store).
    prefix: String,
    request: &'a ReadRequest,
}

impl Element<'_> {
    fn path(&self, parts: &[&str]) -> String {
        parts
            .iter()
            .fold(self.prefix.clone(), |p, part| array::join(&p, part))
    }

    async fn open(&self, element: &[String]) -> Result<Arc<dyn TableProvider>> {
        let parts: Vec<&str> = element.iter().map(String::as_str).collect();
        let request = self.request;
        match parts.as_slice() {
            [] | ["obs"] | ["var"] => {
                let is_var = parts == ["var"];
                if request.layout.is_some() {
                    return Err(Error::invalid("'layout' applies to matrix elements only"));
                }
                let (path, index) = if is_var {
                    ("var", "var_names")
                } else {
                    ("obs", "obs_names")
                };
                // Rows by position (`obs_ranges`), or the variables in the order `var_names` gives
                // them: selected here, where positions are known, with every column.
                let by_position = !is_var && request.obs_ranges.is_some();
                let by_var =
                    is_var && (request.var_names.is_some() || request.var_filter.is_some());
                let mut df = if by_position || by_var {
                    let frame = self.frame(path, index, false).await?;
                    let columns = BlockSource::schema(&frame)
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect();
                    let (_, batch) = if by_position {
                        self.select_obs_with(columns).await?
                    } else {
                        self.select_vars_with(columns).await?
                    };
                    let table = MemTable::try_new(batch.schema(), vec![vec![batch]])?;
                    self.ctx.read_table(Arc::new(table))?
                } else {
                    let frame = self.frame(path, index, false).await?;
                    let frame = match (is_var, request.obs_range) {
                        (false, Some([a, b])) => frame.restrict(a..b),
                        _ => frame,
                    };
                    let parts = frame.len().div_ceil(1 << 20).max(1);
                    self.ctx.read_table(frame_table(frame, parts))?
                };
                // Selecting by position applied `filter` already.
                if let Some(filter) = request.filter.as_ref().filter(|_| !by_position) {
                    df = apply_filter(self.ctx, df, filter)?;
                }
                if let Some(columns) = &request.columns {
                    df = select_columns(df, columns)?;
                }
                Ok(Arc::new(ViewTable::new(df.into_unoptimized_plan(), None)))
            }
            ["X"] => self.matrix(&self.path(&["X"]), "X").await,
            ["layers", name] => self.matrix(&self.path(&["layers", name]), name).await,
            [kind @ ("obsm" | "varm" | "obsp" | "varp"), name] => {
                let path = self.path(&[kind, name]);
                let by_var = kind.starts_with("var");
                let pairs = kind.ends_with('p');
                if request.layout.is_some() {
                    return Err(Error::invalid(format!("'layout' does not apply to {kind}")));
                }
                let (rows, index) = if by_var {
                    self.select_vars().await?
                } else {
                    self.select_obs().await?
                };
                let matrix = self.open_matrix(&path).await?;
                let (shape, expected) = (matrix.shape, self.axis_len(by_var).await?);
                if shape[0] != expected || (pairs && shape[1] != expected) {
                    return Err(array::data_loss(
                        self.store.location(),
                        format!(
                            "'{path}' has shape {shape:?}, but the AnnData has {expected} along its axis"
                        ),
                    ));
                }
                let selection = Selection {
                    cols: pairs.then(|| rows.clone()),
                    rows,
                    index,
                    col_names: None,
                };
                let output = if pairs {
                    Output::Pairs
                } else {
                    Output::Embedding
                };
                self.matrix_table(&path, matrix, selection, output)
            }
            ["uns", ..] => Err(Error::invalid(
                "uns is not a table: it is part of the 'describe' action's answer",
            )),
            _ => Err(Error::not_found(format!(
                "no element {:?} in {}: elements are obs, var, X, layers/NAME, obsm/NAME, \
                 varm/NAME, obsp/NAME and varp/NAME",
                element,
                self.store.location()
            ))),
        }
    }

    async fn frame(&self, path: &str, index: &str, row_index: bool) -> Result<Frame> {
        let store = Arc::clone(&self.store);
        let path = self.path(&[path]);
        let index = index.to_string();
        blocking(move || Frame::open(store, &path, &index, row_index)).await
    }

    async fn axis_len(&self, var: bool) -> Result<u64> {
        let frame = self
            .frame(if var { "var" } else { "obs" }, "names", false)
            .await?;
        Ok(frame.len() as u64)
    }

    async fn open_matrix(&self, path: &str) -> Result<Matrix> {
        let store = Arc::clone(&self.store);
        let path = path.to_string();
        blocking(move || Matrix::open(store.as_ref(), &path)).await
    }

    /// X or a layer.
    async fn matrix(&self, path: &str, name: &str) -> Result<Arc<dyn TableProvider>> {
        let matrix = self.open_matrix(path).await?;
        let shape = matrix.shape;
        let (rows, index) = self.select_obs().await?;
        let n_obs = self.axis_len(false).await?;
        if shape[0] != n_obs {
            return Err(array::data_loss(
                self.store.location(),
                format!("'{path}' has {} rows, but obs has {n_obs}", shape[0]),
            ));
        }
        let selects_vars = self.request.var_filter.is_some() || self.request.var_names.is_some();
        let (vars, var_index) = self.select_vars().await?;
        let names: Vec<String> = {
            let strings =
                arrow::compute::cast(var_index.column(0), &arrow::datatypes::DataType::Utf8)
                    .map_err(|e| Error::internal_from("var_names", e))?;
            strings
                .as_string::<i32>()
                .iter()
                .map(|s| s.unwrap_or_default().to_string())
                .collect()
        };
        // Checked whatever the selection: every column position read below comes from var.
        let n_vars = if selects_vars {
            self.axis_len(true).await?
        } else {
            vars.len() as u64
        };
        if n_vars != shape[1] {
            return Err(array::data_loss(
                self.store.location(),
                format!("'{path}' has {} columns, but var has {n_vars}", shape[1]),
            ));
        }
        let layout = self.request.layout.unwrap_or(match matrix.encoding {
            Encoding::Dense { .. } => Layout::Dense,
            Encoding::Sparse(_) => Layout::Sparse,
        });
        let selection = Selection {
            rows,
            index,
            cols: selects_vars.then_some(vars),
            col_names: Some(names),
        };
        let output = Output::Matrix {
            layout,
            name: name.to_string(),
        };
        self.matrix_table(path, matrix, selection, output)
    }

    fn matrix_table(
        &self,
        path: &str,
        matrix: Matrix,
        selection: Selection,
        output: Output,
    ) -> Result<Arc<dyn TableProvider>> {
        let chunk = matrix.encoding.row_chunk();
        let csc = matrix.encoding.is_csc();
        let source = MatrixSource::new(Arc::clone(&self.store), path, matrix, selection, output)?;
        let target = self.ctx.state().config().target_partitions();
        let max_parts =
            (source.dense_bytes().div_ceil(ENDPOINT_BYTES) as usize).clamp(1, target.max(1));
        // CSC blocks are sized by their entries, which can make one block of a whole selection:
        // keep at least one block per endpoint the selection's size calls for.
        let block_rows = if csc {
            source
                .block_rows()
                .min(source.rows().len().div_ceil(max_parts).max(1))
        } else {
            source.block_rows()
        };
        let partitions = split(source.rows(), block_rows, max_parts, chunk);
        Ok(Arc::new(BlockTable::new(Arc::new(source), partitions)))
    }
}

/// A dataframe as a table with `parts` partitions.
fn frame_table(frame: Frame, parts: usize) -> Arc<dyn TableProvider> {
    let partitions = split_range(frame.len(), FRAME_BLOCK_ROWS, parts, 1);
    Arc::new(BlockTable::new(Arc::new(frame), partitions))
}
