//! zarr stores, formats 2 and 3, through zarrs: a filesystem store for local artifacts and an
//! object_store store for remote ones (bridged to zarrs' synchronous API, since every array call
//! runs on a blocking thread anyway).
//!
//! The hierarchy's metadata is read once when the store opens (from consolidated metadata where the
//! writer left it); reads then fetch only the chunks that intersect the requested block, and every
//! fetch is counted, so tests and metrics can show that a subset read stays a subset.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, PrimitiveArray, StringArray};
use arrow::datatypes::{
    ArrowPrimitiveType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use serde_json::{Map, Value};
use zarrs::array::data_type::{
    BoolDataType, Float32DataType, Float64DataType, Int8DataType, Int16DataType, Int32DataType,
    Int64DataType, StringDataType, UInt8DataType, UInt16DataType, UInt32DataType, UInt64DataType,
};
use zarrs::array::{Array, ArrayShardedExt, ArraySubset, CodecOptions, ElementOwned};
use zarrs::group::Group;
use zarrs::node::{Node as ZarrNode, NodeMetadata};
use zarrs::storage::storage_adapter::async_to_sync::{
    AsyncToSyncBlockOn, AsyncToSyncStorageAdapter,
};
use zarrs::storage::storage_adapter::performance_metrics::PerformanceMetricsStorageAdapter;
use zarrs::storage::{ReadableListableStorage, ReadableListableStorageTraits};

use super::{ArrayInfo, ArrayStore, Dtype, Memo, Node, ReadMetrics, data_loss};
use crate::error::{Error, Result};
use crate::storage::Located;

type Metered = PerformanceMetricsStorageAdapter<dyn ReadableListableStorageTraits>;

/// An open zarr store.
pub(crate) struct ZarrStore {
    storage: Arc<Metered>,
    location: String,
    /// Every node's metadata by path (`""` for the root).
    nodes: BTreeMap<String, NodeMetadata>,
    /// The store's local directory (none for object storage).
    root: Option<std::path::PathBuf>,
    memo: Memo,
}

impl std::fmt::Debug for ZarrStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZarrStore")
            .field("location", &self.location)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

/// Runs object_store futures from zarrs' synchronous calls, which always run on a blocking thread.
struct TokioBlockOn(tokio::runtime::Handle);

impl AsyncToSyncBlockOn for TokioBlockOn {
    fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
        self.0.block_on(future)
    }
}

impl ZarrStore {
    /// Opens the store and reads its hierarchy. Blocks: call from a blocking thread.
    pub(crate) fn open(located: &Located) -> Result<Self> {
        let location = located.url.to_string();
        let inner: ReadableListableStorage = match located.url.to_file_path() {
            Ok(path) => Arc::new(
                zarrs::filesystem::FilesystemStore::new(&path)
                    .map_err(|e| data_loss(&location, format!("not a zarr store ({e})")))?,
            ),
            Err(()) => {
                let handle = tokio::runtime::Handle::try_current()
                    .map_err(|e| Error::internal_from("no runtime for remote zarr reads", e))?;
                let prefixed = object_store::prefix::PrefixStore::new(
                    Arc::clone(&located.store),
                    located.prefix.clone(),
                );
                let store = zarrs_object_store::AsyncObjectStore::new(prefixed);
                Arc::new(AsyncToSyncStorageAdapter::new(
                    Arc::new(store),
                    TokioBlockOn(handle),
                ))
            }
        };
        let storage = Arc::new(PerformanceMetricsStorageAdapter::new(inner));
        let root = ZarrNode::open(&storage, "/")
            .map_err(|e| data_loss(&location, format!("not a zarr store ({e})")))?;
        let mut nodes = BTreeMap::new();
        collect(&root, &mut nodes);
        Ok(Self {
            storage,
            location,
            nodes,
            root: located.url.to_file_path().ok(),
            memo: Memo::default(),
        })
    }

    fn open_array(&self, path: &str) -> Result<Array<Metered>> {
        let metadata = match self.nodes.get(path) {
            Some(NodeMetadata::Array(m)) => m.clone(),
            _ => {
                return Err(Error::not_found(format!(
                    "no array '{path}' in {}",
                    self.location
                )));
            }
        };
        Array::new_with_metadata(Arc::clone(&self.storage), &format!("/{path}"), metadata)
            .map_err(|e| data_loss(&self.location, format!("array '{path}': {e}")))
    }
}

impl ZarrStore {
    /// zarr reads a chunk that is not there as the fill value, which is right for chunks never
    /// written and wrong for a store removed under a read: after each read, a local array's
    /// metadata must still be there, or the read fails instead of answering fill values.
    fn check_present(&self, path: &str) -> Result<()> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        let dir = root.join(path);
        if dir.join("zarr.json").exists() || dir.join(".zarray").exists() {
            return Ok(());
        }
        Err(data_loss(
            &self.location,
            format!("array '{path}' was removed while it was being read"),
        ))
    }
}

fn collect(node: &ZarrNode, out: &mut BTreeMap<String, NodeMetadata>) {
    let path = node.path().as_str().trim_matches('/').to_string();
    out.insert(path, node.metadata().clone());
    for child in node.children() {
        collect(child, out);
    }
}

fn dtype_of(array: &Array<Metered>) -> Option<Dtype> {
    let dt = array.data_type();
    Some(if dt.is::<BoolDataType>() {
        Dtype::Bool
    } else if dt.is::<Int8DataType>() {
        Dtype::Int8
    } else if dt.is::<Int16DataType>() {
        Dtype::Int16
    } else if dt.is::<Int32DataType>() {
        Dtype::Int32
    } else if dt.is::<Int64DataType>() {
        Dtype::Int64
    } else if dt.is::<UInt8DataType>() {
        Dtype::UInt8
    } else if dt.is::<UInt16DataType>() {
        Dtype::UInt16
    } else if dt.is::<UInt32DataType>() {
        Dtype::UInt32
    } else if dt.is::<UInt64DataType>() {
        Dtype::UInt64
    } else if dt.is::<Float32DataType>() {
        Dtype::Float32
    } else if dt.is::<Float64DataType>() {
        Dtype::Float64
    } else if dt.is::<StringDataType>() {
        Dtype::Utf8
    } else {
        return None;
    })
}

impl ArrayStore for ZarrStore {
    fn location(&self) -> &str {
        &self.location
    }

    fn node(&self, path: &str) -> Result<Option<Node>> {
        let path = path.trim_matches('/');
        match self.nodes.get(path) {
            None => Ok(None),
            Some(NodeMetadata::Group(_)) => Ok(Some(Node::Group)),
            Some(NodeMetadata::Array(_)) => {
                let array = self.open_array(path)?;
                let dtype = dtype_of(&array).ok_or_else(|| {
                    Error::invalid(format!(
                        "array '{path}' in {} has data type {}, which cannot be served",
                        self.location,
                        array.data_type().name_v3().unwrap_or_default()
                    ))
                })?;
                super::check_shape(&self.location, path, array.shape())?;
                let zeros = vec![0; array.dimensionality()];
                let chunks = array
                    .chunk_shape(&zeros)
                    .ok()
                    .map(|c| c.iter().map(|d| d.get()).collect());
                Ok(Some(Node::Array(ArrayInfo {
                    shape: array.shape().to_vec(),
                    dtype,
                    chunks,
                })))
            }
        }
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        let path = path.trim_matches('/');
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        Ok(self
            .nodes
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(str::to_string)
            .collect())
    }

    fn attrs(&self, path: &str) -> Result<Map<String, Value>> {
        let path = path.trim_matches('/');
        match self.nodes.get(path) {
            None => Err(Error::not_found(format!(
                "no element '{path}' in {}",
                self.location
            ))),
            Some(NodeMetadata::Array(_)) => Ok(self.open_array(path)?.attributes().clone()),
            Some(NodeMetadata::Group(m)) => {
                let group = Group::new_with_metadata(
                    Arc::clone(&self.storage),
                    &format!("/{path}"),
                    m.clone(),
                )
                .map_err(|e| data_loss(&self.location, format!("group '{path}': {e}")))?;
                Ok(group.attributes().clone())
            }
        }
    }

    fn read(&self, path: &str, start: &[u64], count: &[u64]) -> Result<ArrayRef> {
        let path = path.trim_matches('/');
        let array = self.open_array(path)?;
        let dtype = dtype_of(&array).ok_or_else(|| {
            Error::invalid(format!("array '{path}' has an unsupported data type"))
        })?;
        super::check_read(&self.location, path, count, dtype)?;
        let ranges: Vec<_> = start.iter().zip(count).map(|(&s, &c)| s..s + c).collect();
        let subset = ArraySubset::new_with_ranges(&ranges);
        let fail = |e: zarrs::array::ArrayError| {
            data_loss(&self.location, format!("reading '{path}': {e}"))
        };
        let values: ArrayRef = match dtype {
            Dtype::Bool => Arc::new(BooleanArray::from(
                array
                    .retrieve_array_subset::<Vec<bool>>(&subset)
                    .map_err(fail)?,
            )),
            Dtype::Int8 => primitive::<Int8Type>(&array, &subset).map_err(fail)?,
            Dtype::Int16 => primitive::<Int16Type>(&array, &subset).map_err(fail)?,
            Dtype::Int32 => primitive::<Int32Type>(&array, &subset).map_err(fail)?,
            Dtype::Int64 => primitive::<Int64Type>(&array, &subset).map_err(fail)?,
            Dtype::UInt8 => primitive::<UInt8Type>(&array, &subset).map_err(fail)?,
            Dtype::UInt16 => primitive::<UInt16Type>(&array, &subset).map_err(fail)?,
            Dtype::UInt32 => primitive::<UInt32Type>(&array, &subset).map_err(fail)?,
            Dtype::UInt64 => primitive::<UInt64Type>(&array, &subset).map_err(fail)?,
            Dtype::Float32 => primitive::<Float32Type>(&array, &subset).map_err(fail)?,
            Dtype::Float64 => primitive::<Float64Type>(&array, &subset).map_err(fail)?,
            Dtype::Utf8 => {
                let values = array
                    .retrieve_array_subset::<Vec<String>>(&subset)
                    .map_err(fail)?;
                Arc::new(StringArray::from_iter_values(values))
            }
        };
        self.check_present(path)?;
        Ok(values)
    }

    /// Rows scattered through a chunk are decoded alone through zarrs' partial decoders (blosc
    /// by its blocks): a 1 % selection from 1,000-row chunks then decodes a few blosc blocks per
    /// chunk instead of every chunk whole, and copies no block it then drops.
    fn read_row_selection(&self, path: &str, rows: &[u64], cols: Range<u64>) -> Result<ArrayRef> {
        let trimmed = path.trim_matches('/');
        let array = self.open_array(trimmed)?;
        let dtype = dtype_of(&array).ok_or_else(|| {
            Error::invalid(format!("array '{trimmed}' has an unsupported data type"))
        })?;
        let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
            return super::read_row_selection_by_block(self, path, rows, cols);
        };
        // Whole chunks decode faster per byte: parts pay off only for rows far apart. Sharded
        // arrays measured no faster this way (their inner chunks decode whole either way).
        // Grouping the rows of one blosc block into one decode measured no faster either.
        let sparse = (rows.len() as u64).saturating_mul(4) <= last - first + 1;
        if !sparse
            || array.is_sharded()
            || array.dimensionality() != 2
            || matches!(dtype, Dtype::Bool | Dtype::Utf8)
        {
            return super::read_row_selection_by_block(self, path, rows, cols);
        }
        let width = cols.end.saturating_sub(cols.start);
        super::check_read(&self.location, trimmed, &[rows.len() as u64, width], dtype)?;
        let fail = |e: &dyn std::fmt::Display| {
            data_loss(&self.location, format!("reading '{trimmed}': {e}"))
        };
        let size = usize::try_from(dtype.width()).map_err(|e| fail(&e))?;
        let width_len = usize::try_from(width).map_err(|e| fail(&e))?;
        let row_bytes = width_len * size;
        let mut out = vec![0u8; rows.len() * row_bytes];
        let grid = array.chunk_grid();
        let mut at = 0;
        while at < rows.len() {
            // The rows in the chunk row of `rows[at]`, then each chunk across `cols`.
            let mut end = rows.len();
            let mut col = cols.start;
            while col < cols.end {
                let chunk = grid
                    .chunk_indices(&[rows[at], col])
                    .map_err(|e| fail(&e))?
                    .ok_or_else(|| fail(&"a row outside the chunk grid"))?;
                let origin = array.chunk_origin(&chunk).map_err(|e| fail(&e))?;
                let shape = array.chunk_shape(&chunk).map_err(|e| fail(&e))?;
                let (height, chunk_width) = (shape[0].get(), shape[1].get());
                end = at + rows[at..].partition_point(|&r| r < origin[0] + height);
                let col_end = cols.end.min(origin[1] + chunk_width);
                let subsets: Vec<ArraySubset> = rows[at..end]
                    .iter()
                    .map(|&r| {
                        ArraySubset::new_with_ranges(&[
                            r - origin[0]..r - origin[0] + 1,
                            col - origin[1]..col_end - origin[1],
                        ])
                    })
                    .collect();
                let decoder = array.partial_decoder(&chunk).map_err(|e| fail(&e))?;
                let decoded = decoder
                    .partial_decode(&subsets, &CodecOptions::default())
                    .map_err(|e| fail(&e))?
                    .into_fixed()
                    .map_err(|e| fail(&e))?;
                let piece = usize::try_from(col_end - col).map_err(|e| fail(&e))? * size;
                let offset = usize::try_from(col - cols.start).map_err(|e| fail(&e))? * size;
                if decoded.len() != piece * (end - at) {
                    return Err(fail(&format!(
                        "a chunk decoded to {} bytes, not {}",
                        decoded.len(),
                        piece * (end - at)
                    )));
                }
                for (k, row) in decoded.chunks_exact(piece.max(1)).enumerate() {
                    let start = (at + k) * row_bytes + offset;
                    out[start..start + piece].copy_from_slice(row);
                }
                col = col_end;
            }
            at = end;
        }
        self.check_present(trimmed)?;
        let data = arrow::array::ArrayData::builder(dtype.arrow())
            .len(rows.len() * width_len)
            .add_buffer(arrow::buffer::Buffer::from_vec(out))
            .align_buffers(true)
            .build()
            .map_err(|e| fail(&e))?;
        Ok(arrow::array::make_array(data))
    }

    fn fingerprint(&self) -> Option<u64> {
        let root = self.root.as_ref()?;
        // Every metadata document a node can have, and the consolidated one.
        const NAMES: [&str; 4] = ["zarr.json", ".zarray", ".zattrs", ".zgroup"];
        let mut files = vec![root.join(".zmetadata")];
        for node in self.nodes.keys() {
            let dir = root.join(node);
            files.extend(NAMES.iter().map(|n| dir.join(n)));
        }
        Some(super::files_fingerprint(files.iter().map(|p| p.as_path())))
    }

    fn memo(&self) -> &Memo {
        &self.memo
    }

    fn metrics(&self) -> ReadMetrics {
        ReadMetrics {
            reads: self.storage.reads() as u64,
            bytes: self.storage.bytes_read() as u64,
        }
    }
}

fn primitive<T>(
    array: &Array<Metered>,
    subset: &ArraySubset,
) -> Result<ArrayRef, zarrs::array::ArrayError>
where
    T: ArrowPrimitiveType,
    T::Native: ElementOwned,
{
    let values = array.retrieve_array_subset::<Vec<T::Native>>(subset)?;
    Ok(Arc::new(PrimitiveArray::<T>::new(values.into(), None)))
}
