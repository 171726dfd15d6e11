//! `add_column`: a new version of a zarr AnnData with one more `obs` or `var` column.
//!
//! The new version is a new store. Every file of the old store is hard-linked into it (copied where
//! the filesystem cannot link), so unchanged data is shared and the old version stays
//! byte-for-byte as it was: files that change (the dataframe's attributes, consolidated metadata)
//! are unlinked and written anew, never modified in place. The column is written in anndata's own
//! encodings, uncompressed in one chunk, in the store's zarr format (2 or 3).

use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// Which zarr format a store is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zarr {
    V2,
    V3,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::io(path.display(), e)
}

/// Turns a JSON list of values into an Arrow array: booleans, integers, floats or strings, with
/// `null` for missing values.
pub(crate) fn json_values(values: &[Value]) -> Result<ArrayRef> {
    use std::sync::Arc;
    let present = || values.iter().filter(|v| !v.is_null());
    if present().all(Value::is_boolean) {
        return Ok(Arc::new(
            values
                .iter()
                .map(Value::as_bool)
                .collect::<arrow::array::BooleanArray>(),
        ));
    }
    if present().all(|v| v.is_i64()) {
        return Ok(Arc::new(
            values
                .iter()
                .map(Value::as_i64)
                .collect::<arrow::array::Int64Array>(),
        ));
    }
    if present().all(Value::is_number) {
        return Ok(Arc::new(
            values
                .iter()
                .map(Value::as_f64)
                .collect::<arrow::array::Float64Array>(),
        ));
    }
    if present().all(Value::is_string) {
        return Ok(Arc::new(
            values
                .iter()
                .map(Value::as_str)
                .collect::<arrow::array::StringArray>(),
        ));
    }
    Err(Error::invalid(
        "add_column values must all be booleans, all numbers or all strings (null for missing)",
    ))
}

/// Links (or copies) the store at `from` into `to`, then writes `values` as column `name` of the
/// dataframe `frame` (`obs` or `var`).
pub(crate) fn add_column(
    from: &Path,
    to: &Path,
    frame: &str,
    name: &str,
    values: &ArrayRef,
) -> Result<()> {
    let format = if from.join(".zgroup").exists() {
        Zarr::V2
    } else if from.join("zarr.json").exists() {
        Zarr::V3
    } else {
        return Err(Error::invalid(format!(
            "{} is not a zarr store",
            from.display()
        )));
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') || name == "_index" {
        return Err(Error::invalid(format!("invalid column name {name:?}")));
    }
    let frame_dir = from.join(frame);
    let mut attrs = read_attrs(&frame_dir, format)?;
    let mut order: Vec<Value> = attrs
        .get("column-order")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    if order.iter().any(|c| c.as_str() == Some(name)) || frame_dir.join(name).exists() {
        return Err(Error::invalid(format!(
            "{frame} already has a column '{name}'"
        )));
    }
    link_tree(from, to)?;
    let column = to.join(frame).join(name);
    write_column(&column, format, values)?;
    order.push(json!(name));
    attrs.insert("column-order".into(), Value::Array(order));
    write_attrs(&to.join(frame), format, attrs)?;
    consolidate(to, format)
}

/// Hard-links every file under `from` into `to` (copying where linking fails).
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(|e| io(&src, e))?;
        if kind.is_dir() {
            link_tree(&src, &dst)?;
        } else if kind.is_file() && std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(|e| io(&src, e))?;
        }
    }
    Ok(())
}

/// Writes a JSON document at `path`, replacing (never modifying) a linked file.
fn write_json(path: &Path, value: &Value) -> Result<()> {
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| io(path, e))?;
    }
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::internal_from("encoding zarr metadata", e))?;
    std::fs::write(path, text).map_err(|e| io(path, e))
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|e| io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::DataLoss {
        location: path.display().to_string(),
        message: format!("invalid JSON: {e}"),
    })
}

fn read_attrs(dir: &Path, format: Zarr) -> Result<Map<String, Value>> {
    let value = match format {
        Zarr::V2 => {
            let path = dir.join(".zattrs");
            if !path.exists() {
                return Ok(Map::new());
            }
            read_json(&path)?
        }
        Zarr::V3 => read_json(&dir.join("zarr.json"))?
            .get("attributes")
            .cloned()
            .unwrap_or(json!({})),
    };
    Ok(value.as_object().cloned().unwrap_or_default())
}

fn write_attrs(dir: &Path, format: Zarr, attrs: Map<String, Value>) -> Result<()> {
    match format {
        Zarr::V2 => write_json(&dir.join(".zattrs"), &Value::Object(attrs)),
        Zarr::V3 => {
            let path = dir.join("zarr.json");
            let mut meta = read_json(&path)?;
            if let Some(m) = meta.as_object_mut() {
                m.insert("attributes".into(), Value::Object(attrs));
            }
            write_json(&path, &meta)
        }
    }
}

fn write_group(dir: &Path, format: Zarr, attrs: Value) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    match format {
        Zarr::V2 => {
            write_json(&dir.join(".zgroup"), &json!({"zarr_format": 2}))?;
            write_json(&dir.join(".zattrs"), &attrs)
        }
        Zarr::V3 => write_json(
            &dir.join("zarr.json"),
            &json!({"zarr_format": 3, "node_type": "group", "attributes": attrs}),
        ),
    }
}

/// Writes a 1-D array in one uncompressed chunk.
fn write_array(dir: &Path, format: Zarr, values: &ArrayRef, attrs: Value) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let n = values.len();
    if n == 0 {
        return Err(Error::invalid("cannot write an empty column"));
    }
    let (v2_dtype, v3_dtype, bytes, fill): (&str, &str, Vec<u8>, Value) = match values.data_type() {
        DataType::Boolean => {
            let b = values.as_boolean();
            (
                "|b1",
                "bool",
                (0..n).map(|i| u8::from(b.value(i))).collect(),
                json!(false),
            )
        }
        DataType::Int8 => ("|i1", "int8", le::<Int8Type>(values), json!(0)),
        DataType::Int16 => ("<i2", "int16", le::<Int16Type>(values), json!(0)),
        DataType::Int32 => ("<i4", "int32", le::<Int32Type>(values), json!(0)),
        DataType::Int64 => ("<i8", "int64", le::<Int64Type>(values), json!(0)),
        DataType::UInt8 => ("|u1", "uint8", le::<UInt8Type>(values), json!(0)),
        DataType::UInt16 => ("<u2", "uint16", le::<UInt16Type>(values), json!(0)),
        DataType::UInt32 => ("<u4", "uint32", le::<UInt32Type>(values), json!(0)),
        DataType::UInt64 => ("<u8", "uint64", le::<UInt64Type>(values), json!(0)),
        DataType::Float32 => ("<f4", "float32", le::<Float32Type>(values), json!(0.0)),
        DataType::Float64 => ("<f8", "float64", le::<Float64Type>(values), json!(0.0)),
        DataType::Utf8 => {
            // The vlen-utf8 codec (numcodecs' VLenUTF8): item count, then length-prefixed items.
            let s = values.as_string::<i32>();
            let mut out = Vec::with_capacity(4 + s.values().len() + 4 * n);
            out.extend_from_slice(&(n as u32).to_le_bytes());
            for i in 0..n {
                let item = if s.is_null(i) { "" } else { s.value(i) };
                out.extend_from_slice(&(item.len() as u32).to_le_bytes());
                out.extend_from_slice(item.as_bytes());
            }
            ("|O", "string", out, json!(""))
        }
        other => {
            return Err(Error::invalid(format!(
                "cannot write a column of type {other}"
            )));
        }
    };
    let is_string = v3_dtype == "string";
    match format {
        Zarr::V2 => {
            let filters = if is_string {
                json!([{"id": "vlen-utf8"}])
            } else {
                Value::Null
            };
            let fill = if is_string { Value::Null } else { fill };
            write_json(
                &dir.join(".zarray"),
                &json!({
                    "zarr_format": 2, "shape": [n], "chunks": [n], "dtype": v2_dtype,
                    "compressor": null, "fill_value": fill, "order": "C",
                    "filters": filters, "dimension_separator": ".",
                }),
            )?;
            write_json(&dir.join(".zattrs"), &attrs)?;
            std::fs::write(dir.join("0"), bytes).map_err(|e| io(dir, e))
        }
        Zarr::V3 => {
            let codecs = if is_string {
                json!([{"name": "vlen-utf8"}])
            } else {
                json!([{"name": "bytes", "configuration": {"endian": "little"}}])
            };
            write_json(
                &dir.join("zarr.json"),
                &json!({
                    "zarr_format": 3, "node_type": "array", "shape": [n], "data_type": v3_dtype,
                    "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [n]}},
                    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                    "fill_value": fill, "codecs": codecs, "attributes": attrs,
                }),
            )?;
            std::fs::create_dir_all(dir.join("c")).map_err(|e| io(dir, e))?;
            std::fs::write(dir.join("c").join("0"), bytes).map_err(|e| io(dir, e))
        }
    }
}

fn le<T: arrow::datatypes::ArrowPrimitiveType>(values: &ArrayRef) -> Vec<u8> {
    let a = values.as_primitive::<T>();
    let width = std::mem::size_of::<T::Native>();
    let raw = a.values().inner().as_slice();
    raw[..a.len() * width].to_vec()
}

/// Writes a column in anndata's encoding for its type and nulls.
fn write_column(dir: &Path, format: Zarr, values: &ArrayRef) -> Result<()> {
    let array_attrs = |kind: &str| json!({"encoding-type": kind, "encoding-version": "0.2.0"});
    if let DataType::Dictionary(_, _) = values.data_type() {
        let dict = values.as_any_dictionary();
        let keys = arrow::compute::cast(dict.keys(), &DataType::Int32)
            .map_err(|e| Error::invalid(e.to_string()))?;
        let codes: ArrayRef = std::sync::Arc::new(
            keys.as_primitive::<Int32Type>()
                .iter()
                .map(|k| Some(k.unwrap_or(-1)))
                .collect::<arrow::array::Int32Array>(),
        );
        write_group(
            dir,
            format,
            json!({"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": false}),
        )?;
        write_array(&dir.join("codes"), format, &codes, array_attrs("array"))?;
        let categories = dict.values();
        let kind = if categories.data_type() == &DataType::Utf8 {
            "string-array"
        } else {
            "array"
        };
        return write_array(
            &dir.join("categories"),
            format,
            categories,
            array_attrs(kind),
        );
    }
    let is_string = values.data_type() == &DataType::Utf8;
    if values.null_count() == 0
        || matches!(values.data_type(), DataType::Float32 | DataType::Float64)
    {
        // Missing floats are NaN, as in pandas.
        let values = if values.null_count() > 0 {
            fill_nan(values)?
        } else {
            values.clone()
        };
        let kind = if is_string { "string-array" } else { "array" };
        return write_array(dir, format, &values, array_attrs(kind));
    }
    let kind = match values.data_type() {
        DataType::Boolean => "nullable-boolean",
        DataType::Utf8 => "nullable-string-array",
        _ => "nullable-integer",
    };
    write_group(
        dir,
        format,
        json!({"encoding-type": kind, "encoding-version": "0.1.0"}),
    )?;
    let mask: ArrayRef = std::sync::Arc::new(
        arrow::compute::is_null(values).map_err(|e| Error::invalid(e.to_string()))?,
    );
    let filled = match values.data_type() {
        DataType::Boolean => arrow::compute::kernels::zip::zip(
            mask.as_boolean(),
            &arrow::array::Scalar::new(arrow::array::BooleanArray::from(vec![false])),
            values,
        ),
        DataType::Utf8 => arrow::compute::kernels::zip::zip(
            mask.as_boolean(),
            &arrow::array::Scalar::new(arrow::array::StringArray::from(vec![""])),
            values,
        ),
        other => {
            let zero = arrow::compute::cast(&arrow::array::Int64Array::from(vec![0]), other)
                .map_err(|e| Error::invalid(e.to_string()))?;
            arrow::compute::kernels::zip::zip(
                mask.as_boolean(),
                &arrow::array::Scalar::new(zero),
                values,
            )
        }
    }
    .map_err(|e| Error::invalid(e.to_string()))?;
    write_array(&dir.join("values"), format, &filled, array_attrs("array"))?;
    write_array(&dir.join("mask"), format, &mask, array_attrs("array"))
}

fn fill_nan(values: &ArrayRef) -> Result<ArrayRef> {
    let as_f64 = arrow::compute::cast(values, &DataType::Float64)
        .map_err(|e| Error::invalid(e.to_string()))?;
    let filled: ArrayRef = std::sync::Arc::new(
        as_f64
            .as_primitive::<Float64Type>()
            .iter()
            .map(|v| Some(v.unwrap_or(f64::NAN)))
            .collect::<arrow::array::Float64Array>(),
    );
    arrow::compute::cast(&filled, values.data_type()).map_err(|e| Error::invalid(e.to_string()))
}

/// Rewrites the consolidated metadata (if the store has it) so that readers see the new column.
fn consolidate(root: &Path, format: Zarr) -> Result<()> {
    match format {
        Zarr::V2 => {
            let path = root.join(".zmetadata");
            if !path.exists() {
                return Ok(());
            }
            let mut metadata = Map::new();
            collect_v2(root, root, &mut metadata)?;
            write_json(
                &path,
                &json!({"metadata": metadata, "zarr_consolidated_format": 1}),
            )
        }
        Zarr::V3 => {
            let path = root.join("zarr.json");
            let mut meta = read_json(&path)?;
            if meta.get("consolidated_metadata").is_none_or(Value::is_null) {
                return Ok(());
            }
            let mut nodes = Map::new();
            collect_v3(root, root, &mut nodes)?;
            if let Some(m) = meta.as_object_mut() {
                m.insert(
                    "consolidated_metadata".into(),
                    json!({"kind": "inline", "must_understand": false, "metadata": nodes}),
                );
            }
            write_json(&path, &meta)
        }
    }
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .map(|p| p.to_string_lossy().replace('\\', "/"))
        .unwrap_or_default()
}

fn collect_v2(root: &Path, dir: &Path, out: &mut Map<String, Value>) -> Result<()> {
    for name in [".zgroup", ".zarray", ".zattrs"] {
        let path = dir.join(name);
        if path.exists() {
            let rel = relative(root, &path);
            out.insert(rel, read_json(&path)?);
        }
    }
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            collect_v2(root, &entry.path(), out)?;
        }
    }
    Ok(())
}

fn collect_v3(root: &Path, dir: &Path, out: &mut Map<String, Value>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let meta = path.join("zarr.json");
        if meta.exists() {
            let mut value = read_json(&meta)?;
            if let Some(m) = value.as_object_mut() {
                m.remove("consolidated_metadata");
            }
            let is_group = value.get("node_type").and_then(Value::as_str) == Some("group");
            out.insert(relative(root, &path), value);
            if is_group {
                collect_v3(root, &path, out)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_take_one_type_with_nulls() -> Result<()> {
        let ints = json_values(&[json!(1), Value::Null, json!(3)])?;
        assert_eq!(ints.data_type(), &DataType::Int64);
        assert_eq!(ints.null_count(), 1);
        assert_eq!(
            json_values(&[json!(1), json!(2.5)])?.data_type(),
            &DataType::Float64
        );
        assert_eq!(
            json_values(&[json!(true), Value::Null])?.data_type(),
            &DataType::Boolean
        );
        assert_eq!(
            json_values(&[json!("a"), json!("b")])?.data_type(),
            &DataType::Utf8
        );
        assert!(json_values(&[json!(1), json!("a")]).is_err());
        assert!(json_values(&[json!([1])]).is_err());
        Ok(())
    }
}
