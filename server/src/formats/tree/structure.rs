//! What `describe`, `show` and flight metadata say about a store: AnnData's shape and element
//! names (with `uns` as JSON), a SpatialData store's tables, or a generic tree of arrays.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Float64Type, Int64Type, UInt64Type};
use serde_json::{Map, Value, json};

use crate::error::Result;
use crate::formats::array::{ArrayStore, Node, join};

/// Arrays in `uns` up to this many elements are inlined; larger ones are summarised.
const UNS_INLINE: u64 = 1000;
/// At most this many nodes are listed in a generic tree.
const TREE_NODES: usize = 10_000;

/// The number of rows of the dataframe at `path`, from its index.
fn frame_len(store: &dyn ArrayStore, path: &str) -> Result<Option<u64>> {
    if !store.is_group(path)? {
        return Ok(None);
    }
    let index = store
        .attr_str(path, "_index")?
        .unwrap_or_else(|| "_index".into());
    Ok(match store.node(&join(path, &index))? {
        Some(Node::Array(info)) => info.shape.first().copied(),
        _ => None,
    })
}

/// `[n_obs, n_vars]` of the AnnData at `root`.
pub(super) fn shape(store: &dyn ArrayStore, root: &str) -> Result<Option<[u64; 2]>> {
    let obs = frame_len(store, &join(root, "obs"))?;
    let var = frame_len(store, &join(root, "var"))?;
    Ok(match (obs, var) {
        (Some(o), Some(v)) => Some([o, v]),
        _ => None,
    })
}

fn columns(store: &dyn ArrayStore, path: &str) -> Result<Value> {
    if !store.is_group(path)? {
        return Ok(json!([]));
    }
    Ok(store
        .attrs(path)?
        .get("column-order")
        .cloned()
        .unwrap_or(json!([])))
}

fn keys(store: &dyn ArrayStore, path: &str) -> Result<Value> {
    if !store.is_group(path)? {
        return Ok(json!([]));
    }
    Ok(json!(store.children(path)?))
}

/// Type, shape and chunking of a matrix element.
fn matrix(store: &dyn ArrayStore, path: &str) -> Result<Value> {
    Ok(match store.node(path)? {
        None => Value::Null,
        Some(Node::Array(info)) => json!({
            "encoding": "array",
            "dtype": info.dtype.numpy(),
            "shape": info.shape,
            "chunks": info.chunks,
        }),
        Some(Node::Group) => {
            let attrs = store.attrs(path)?;
            let dtype = match store.node(&join(path, "data"))? {
                Some(Node::Array(info)) => Some(info.dtype.numpy()),
                _ => None,
            };
            json!({
                "encoding": attrs.get("encoding-type"),
                "dtype": dtype,
                "shape": attrs.get("shape"),
            })
        }
    })
}

/// The AnnData at `root`.
pub(super) fn anndata(store: &dyn ArrayStore, root: &str, values: bool) -> Result<Value> {
    let shape = shape(store, root)?;
    let mut out = Map::new();
    out.insert("otype".into(), json!("AnnData"));
    out.insert("shape".into(), json!(shape));
    out.insert("obs".into(), columns(store, &join(root, "obs"))?);
    out.insert("var".into(), columns(store, &join(root, "var"))?);
    out.insert("X".into(), matrix(store, &join(root, "X"))?);
    for kind in ["layers", "obsm", "varm", "obsp", "varp"] {
        out.insert(kind.into(), keys(store, &join(root, kind))?);
    }
    let uns = join(root, "uns");
    let uns = match (store.is_group(&uns)?, values) {
        (false, _) => json!({}),
        (true, true) => uns_value(store, &uns, 0)?,
        (true, false) => keys(store, &uns)?,
    };
    out.insert("uns".into(), uns);
    Ok(Value::Object(out))
}

/// A SpatialData store: its AnnData tables and the names of its other elements.
pub(super) fn spatialdata(
    store: &dyn ArrayStore,
    tables: &[String],
    values: bool,
) -> Result<Value> {
    let mut described = Map::new();
    for name in tables {
        described.insert(name.clone(), anndata(store, &join("tables", name), values)?);
    }
    let mut elements = Map::new();
    for kind in ["images", "labels", "points", "shapes"] {
        elements.insert(kind.into(), keys(store, kind)?);
    }
    Ok(json!({
        "otype": "SpatialData",
        "tables": described,
        "elements": elements,
    }))
}

/// Every group and array of a generic store, with shapes, dtypes and chunking.
pub(super) fn tree(store: &dyn ArrayStore) -> Result<Value> {
    let mut nodes = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(path) = stack.pop() {
        if nodes.len() >= TREE_NODES {
            break;
        }
        match store.node(&path) {
            Ok(Some(Node::Group)) => {
                if !path.is_empty() {
                    nodes.push(json!({"path": path, "kind": "group"}));
                }
                let mut children = store.children(&path)?;
                children.reverse();
                stack.extend(children.into_iter().map(|c| join(&path, &c)));
            }
            Ok(Some(Node::Array(info))) => nodes.push(json!({
                "path": path,
                "kind": "array",
                "dtype": info.dtype.numpy(),
                "shape": info.shape,
                "chunks": info.chunks,
            })),
            Ok(None) => {}
            Err(e) => {
                nodes.push(json!({"path": path, "kind": "unsupported", "error": e.to_string()}))
            }
        }
    }
    Ok(json!({ "tree": nodes }))
}

/// `uns` as JSON: dicts as objects, small arrays inlined, anything else summarised.
fn uns_value(store: &dyn ArrayStore, path: &str, depth: usize) -> Result<Value> {
    if depth > 16 {
        return Ok(json!("(nested too deeply)"));
    }
    match store.node(path) {
        Ok(Some(Node::Group)) => {
            let encoding = store.encoding(path)?;
            match encoding.as_deref() {
                None | Some("dict") => {
                    let mut map = Map::new();
                    for child in store.children(path)? {
                        let value = uns_value(store, &join(path, &child), depth + 1)?;
                        map.insert(child, value);
                    }
                    Ok(Value::Object(map))
                }
                Some(other) => Ok(json!({ "encoding-type": other })),
            }
        }
        Ok(Some(Node::Array(info))) => {
            let size: u64 = info.shape.iter().product();
            if size > UNS_INLINE {
                return Ok(json!({"dtype": info.dtype.numpy(), "shape": info.shape}));
            }
            let values = to_json(&store.read_all(path)?);
            Ok(if info.shape.is_empty() {
                values.into_iter().next().unwrap_or(Value::Null)
            } else if info.shape.len() == 1 {
                Value::Array(values)
            } else {
                let width = info.shape.iter().skip(1).product::<u64>().max(1) as usize;
                Value::Array(
                    values
                        .chunks(width)
                        .map(|c| Value::Array(c.to_vec()))
                        .collect(),
                )
            })
        }
        Ok(None) => Ok(Value::Null),
        Err(e) => Ok(json!({ "unsupported": e.to_string() })),
    }
}

/// The values of a flat Arrow array as JSON (NaN as null).
fn to_json(array: &ArrayRef) -> Vec<Value> {
    let cast = |t: &DataType| arrow::compute::cast(array, t).ok();
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().iter().map(|s| json!(s)).collect(),
        DataType::Boolean => array.as_boolean().iter().map(|b| json!(b)).collect(),
        DataType::Float16 | DataType::Float32 | DataType::Float64 => cast(&DataType::Float64)
            .map(|a| {
                a.as_primitive::<Float64Type>()
                    .iter()
                    .map(|v| {
                        v.filter(|f| f.is_finite())
                            .map_or(Value::Null, |f| json!(f))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        DataType::UInt64 => array
            .as_primitive::<UInt64Type>()
            .iter()
            .map(|v| json!(v))
            .collect(),
        _ => cast(&DataType::Int64)
            .map(|a| {
                a.as_primitive::<Int64Type>()
                    .iter()
                    .map(|v| json!(v))
                    .collect()
            })
            .unwrap_or_else(|| vec![Value::Null; array.len()]),
    }
}
