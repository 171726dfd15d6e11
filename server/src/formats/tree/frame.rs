//! anndata's dataframe encoding (`obs`, `var`): the index first, then each column in
//! `column-order`, decoded from its own encoding into Arrow.
//!
//! | anndata encoding | Arrow |
//! | --- | --- |
//! | numeric or boolean array | the same primitive type |
//! | `string-array` | `Utf8` |
//! | `categorical` (`codes`, `categories`, `ordered`) | `Dictionary<codes type, categories type>`, code -1 = null |
//! | `nullable-integer`, `nullable-boolean`, `nullable-string-array` (`values`, `mask`) | the values' type with nulls where `mask` is true |

use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, DictionaryArray, PrimitiveArray, UInt64Array, make_array,
};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{
    ArrowDictionaryKeyType, DataType, Field, FieldRef, Int8Type, Int16Type, Int32Type, Int64Type,
    Schema, SchemaRef,
};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};

use crate::error::{Error, Result};
use crate::formats::array::{ArrayInfo, ArrayStore, Dtype, Node, ReadMetrics, data_loss, join};
use crate::formats::blocks::BlockSource;

/// The hidden column that carries each row's position, used to turn a filter on `obs` into the
/// row selection of a matrix.
pub(crate) const ROW_INDEX: &str = "__artiflight_row";

/// How one column is stored.
#[derive(Debug, Clone)]
enum Source {
    Plain {
        path: String,
        info: ArrayInfo,
    },
    /// The names: read whole once per open store, then sliced, because every matrix request
    /// needs the names of its scattered rows.
    Index {
        path: String,
        info: ArrayInfo,
    },
    Categorical {
        codes: String,
        info: ArrayInfo,
        categories: ArrayRef,
    },
    Nullable {
        values: String,
        mask: String,
        info: ArrayInfo,
    },
    RowIndex,
}

#[derive(Debug, Clone)]
struct Column {
    field: FieldRef,
    source: Source,
}

/// An anndata dataframe in a store, restricted to a range of rows.
#[derive(Debug)]
pub(crate) struct Frame {
    store: Arc<dyn ArrayStore>,
    path: String,
    rows: Range<u64>,
    columns: Vec<Column>,
    schema: SchemaRef,
}

impl Frame {
    /// Opens the dataframe at `path`, its index named `index_name` (`obs_names`/`var_names`).
    /// With `row_index`, a last column [`ROW_INDEX`] carries each row's position.
    pub(crate) fn open(
        store: Arc<dyn ArrayStore>,
        path: &str,
        index_name: &str,
        row_index: bool,
    ) -> Result<Self> {
        let location = store.location().to_string();
        match store.node(path)? {
            Some(Node::Group) => {}
            Some(Node::Array(_)) => {
                return Err(legacy(&location, path));
            }
            None => {
                return Err(Error::not_found(format!(
                    "no element '{path}' in {location}"
                )));
            }
        }
        let attrs = store.attrs(path)?;
        let encoding = attrs.get("encoding-type").and_then(|v| v.as_str());
        if encoding != Some("dataframe") {
            return Err(legacy(&location, path));
        }
        let index_column = attrs
            .get("_index")
            .and_then(|v| v.as_str())
            .unwrap_or("_index")
            .to_string();
        let order: Vec<String> = match attrs.get("column-order") {
            Some(serde_json::Value::Array(names)) => names
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let mut columns = Vec::with_capacity(order.len() + 2);
        let index = column(&store, path, &index_column)?;
        columns.push(Column {
            field: Arc::new(Field::new(
                index_name,
                index.field.data_type().clone(),
                false,
            )),
            source: match index.source {
                Source::Plain { path, info } => Source::Index { path, info },
                other => other,
            },
        });
        let mut n_rows = None;
        for name in &order {
            let col = column(&store, path, name)?;
            columns.push(col);
        }
        for col in &columns {
            let len = match &col.source {
                Source::Plain { info, .. }
                | Source::Index { info, .. }
                | Source::Categorical { info, .. }
                | Source::Nullable { info, .. } => info.shape.first().copied().unwrap_or(0),
                Source::RowIndex => continue,
            };
            match n_rows {
                None => n_rows = Some(len),
                Some(n) if n != len => {
                    return Err(data_loss(
                        &location,
                        format!(
                            "column '{}' of '{path}' has {len} rows, expected {n}",
                            col.field.name()
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if row_index {
            columns.push(Column {
                field: Arc::new(Field::new(ROW_INDEX, DataType::UInt64, false)),
                source: Source::RowIndex,
            });
        }
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Arc::clone(&c.field))
                .collect::<Vec<_>>(),
        ));
        Ok(Self {
            store,
            path: path.to_string(),
            rows: 0..n_rows.unwrap_or(0),
            columns,
            schema,
        })
    }

    /// Restricts the frame to rows `range` (clamped to its length).
    pub(crate) fn restrict(mut self, range: Range<u64>) -> Self {
        let end = range.end.min(self.rows.end);
        self.rows = range.start.min(end)..end;
        self
    }

    /// The number of rows (after any restriction).
    pub(crate) fn len(&self) -> usize {
        (self.rows.end - self.rows.start) as usize
    }
}

/// The error for a dataframe that anndata < 0.7 wrote (a compound dataset, no `encoding-type`).
fn legacy(location: &str, path: &str) -> Error {
    Error::invalid(format!(
        "'{path}' in {location} is not an anndata dataframe: the file was written by anndata < 0.7 \
         (or is not AnnData). Re-save it with current anndata: \
         `anndata.read_h5ad(path).write_h5ad(path)`"
    ))
}

/// Describes one column of the dataframe at `frame`.
fn column(store: &Arc<dyn ArrayStore>, frame: &str, name: &str) -> Result<Column> {
    let path = join(frame, name);
    let location = store.location();
    let unsupported = |what: &str| {
        Error::invalid(format!(
            "column '{name}' of '{frame}' in {location} has encoding {what}, which cannot be served"
        ))
    };
    match store.node(&path)? {
        None => Err(data_loss(
            location,
            format!("column '{name}' of '{frame}' is missing"),
        )),
        Some(Node::Array(info)) => {
            if info.shape.len() != 1 {
                return Err(unsupported(&format!(
                    "{}-dimensional array",
                    info.shape.len()
                )));
            }
            let field = Field::new(name, info.dtype.arrow(), false);
            Ok(Column {
                field: Arc::new(field),
                source: Source::Plain { path, info },
            })
        }
        Some(Node::Group) => {
            let attrs = store.attrs(&path)?;
            let encoding = attrs
                .get("encoding-type")
                .and_then(|v| v.as_str())
                .unwrap_or("(none)")
                .to_string();
            match encoding.as_str() {
                "categorical" => {
                    let codes = join(&path, "codes");
                    let info = store.array(&codes)?;
                    let categories = store.read_all_kept(&join(&path, "categories"))?;
                    let key = match info.dtype {
                        Dtype::Int8 => DataType::Int8,
                        Dtype::Int16 => DataType::Int16,
                        Dtype::Int64 => DataType::Int64,
                        _ => DataType::Int32,
                    };
                    let ordered = attrs
                        .get("ordered")
                        .map(|v| v.as_bool().unwrap_or(v.as_i64() == Some(1)))
                        .unwrap_or(false);
                    let value = categories.data_type().clone();
                    #[allow(deprecated)]
                    let field = Field::new_dict(
                        name,
                        DataType::Dictionary(Box::new(key), Box::new(value)),
                        true,
                        0,
                        ordered,
                    );
                    Ok(Column {
                        field: Arc::new(field),
                        source: Source::Categorical {
                            codes,
                            info,
                            categories,
                        },
                    })
                }
                "nullable-integer" | "nullable-boolean" | "nullable-string-array" => {
                    let values = join(&path, "values");
                    let info = store.array(&values)?;
                    Ok(Column {
                        field: Arc::new(Field::new(name, info.dtype.arrow(), true)),
                        source: Source::Nullable {
                            values,
                            mask: join(&path, "mask"),
                            info,
                        },
                    })
                }
                other => Err(unsupported(other)),
            }
        }
    }
}

impl BlockSource for Frame {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn read(&self, rows: Range<usize>, projection: Option<&[usize]>) -> Result<RecordBatch> {
        let absolute = self.rows.start + rows.start as u64..self.rows.start + rows.end as u64;
        let indices: Vec<usize> = match projection {
            Some(p) => p.to_vec(),
            None => (0..self.columns.len()).collect(),
        };
        let mut fields = Vec::with_capacity(indices.len());
        let mut arrays = Vec::with_capacity(indices.len());
        for i in indices {
            let col = self
                .columns
                .get(i)
                .ok_or_else(|| Error::internal(format!("no column {i} in '{}'", self.path)))?;
            arrays.push(self.read_column(col, absolute.clone())?);
            fields.push(Arc::clone(&col.field));
        }
        let options = RecordBatchOptions::new().with_row_count(Some(rows.len()));
        RecordBatch::try_new_with_options(Arc::new(Schema::new(fields)), arrays, &options)
            .map_err(|e| data_loss(self.store.location(), format!("'{}': {e}", self.path)))
    }

    fn metrics(&self) -> ReadMetrics {
        self.store.metrics()
    }

    fn describe(&self) -> String {
        format!("dataframe '{}' of {}", self.path, self.store.location())
    }
}

impl Frame {
    fn read_column(&self, col: &Column, rows: Range<u64>) -> Result<ArrayRef> {
        let location = self.store.location();
        match &col.source {
            Source::RowIndex => Ok(Arc::new(UInt64Array::from_iter_values(rows))),
            Source::Plain { path, info } => self.store.read_rows(path, info, rows),
            Source::Index { path, .. } => {
                let all = self.store.read_all_kept(path)?;
                let end = (rows.end as usize).min(all.len());
                let start = (rows.start as usize).min(end);
                Ok(all.slice(start, end - start))
            }
            Source::Nullable { values, mask, info } => {
                let data = self.store.read_rows(values, info, rows.clone())?;
                let mask_info = self.store.array(mask)?;
                let mask = self.store.read_rows(mask, &mask_info, rows)?;
                let mask = mask.as_boolean_opt().ok_or_else(|| {
                    data_loss(
                        location,
                        format!("'{}' mask is not boolean", col.field.name()),
                    )
                })?;
                let valid = NullBuffer::new(!mask.values());
                let data = data
                    .into_data()
                    .into_builder()
                    .nulls(Some(valid))
                    .build()
                    .map_err(|e| {
                        data_loss(location, format!("column '{}': {e}", col.field.name()))
                    })?;
                Ok(make_array(data))
            }
            Source::Categorical {
                codes,
                info,
                categories,
            } => {
                let codes = self.store.read_rows(codes, info, rows)?;
                let key_type = match col.field.data_type() {
                    DataType::Dictionary(k, _) => k.as_ref().clone(),
                    _ => DataType::Int32,
                };
                let codes = cast(&codes, &key_type).map_err(|e| {
                    data_loss(location, format!("codes of '{}': {e}", col.field.name()))
                })?;
                let fail = |e: arrow::error::ArrowError| {
                    data_loss(location, format!("categorical '{}': {e}", col.field.name()))
                };
                match key_type {
                    DataType::Int8 => dictionary::<Int8Type>(&codes, categories).map_err(fail),
                    DataType::Int16 => dictionary::<Int16Type>(&codes, categories).map_err(fail),
                    DataType::Int64 => dictionary::<Int64Type>(&codes, categories).map_err(fail),
                    _ => dictionary::<Int32Type>(&codes, categories).map_err(fail),
                }
            }
        }
    }
}

/// A dictionary array from anndata codes, where a negative code means missing.
fn dictionary<K: ArrowDictionaryKeyType>(
    codes: &ArrayRef,
    categories: &ArrayRef,
) -> Result<ArrayRef, arrow::error::ArrowError> {
    let codes = codes.as_primitive::<K>();
    let zero = K::Native::default();
    let valid: NullBuffer = codes.values().iter().map(|c| *c >= zero).collect();
    let keys = PrimitiveArray::<K>::new(codes.values().clone(), Some(valid));
    Ok(Arc::new(DictionaryArray::<K>::try_new(
        keys,
        Arc::clone(categories),
    )?))
}
