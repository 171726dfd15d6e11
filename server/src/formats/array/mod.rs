//! Array storages: the hierarchical stores that AnnData, SpatialData and generic array files live
//! in, HDF5 ([`hdf5`]) and zarr ([`zarr`]).
//!
//! Everything above this module (AnnData encodings, subsetting, Arrow layouts, generic datasets) is
//! written once against [`ArrayStore`]. Its calls block (libhdf5 is synchronous and serialised by
//! a global lock; zarrs' chunk decoding is CPU work), so callers run them in `spawn_blocking`.

mod hdf5;
mod zarr;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::DataType;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::storage::Located;

/// The element types the stores hold, as anndata writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dtype {
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Float32,
    Float64,
    /// Variable-length UTF-8 strings.
    Utf8,
}

impl Dtype {
    /// The Arrow type of one element.
    pub(crate) fn arrow(self) -> DataType {
        match self {
            Dtype::Bool => DataType::Boolean,
            Dtype::Int8 => DataType::Int8,
            Dtype::Int16 => DataType::Int16,
            Dtype::Int32 => DataType::Int32,
            Dtype::Int64 => DataType::Int64,
            Dtype::UInt8 => DataType::UInt8,
            Dtype::UInt16 => DataType::UInt16,
            Dtype::UInt32 => DataType::UInt32,
            Dtype::UInt64 => DataType::UInt64,
            Dtype::Float32 => DataType::Float32,
            Dtype::Float64 => DataType::Float64,
            Dtype::Utf8 => DataType::Utf8,
        }
    }

    /// numpy's name for the type, as `describe` shows it.
    pub(crate) fn numpy(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::Int8 => "int8",
            Dtype::Int16 => "int16",
            Dtype::Int32 => "int32",
            Dtype::Int64 => "int64",
            Dtype::UInt8 => "uint8",
            Dtype::UInt16 => "uint16",
            Dtype::UInt32 => "uint32",
            Dtype::UInt64 => "uint64",
            Dtype::Float32 => "float32",
            Dtype::Float64 => "float64",
            Dtype::Utf8 => "str",
        }
    }

    /// Bytes per element, for sizing reads (strings are estimated).
    pub(crate) fn width(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::Int8 | Dtype::UInt8 => 1,
            Dtype::Int16 | Dtype::UInt16 => 2,
            Dtype::Int32 | Dtype::UInt32 | Dtype::Float32 => 4,
            Dtype::Int64 | Dtype::UInt64 | Dtype::Float64 => 8,
            Dtype::Utf8 => 16,
        }
    }
}

/// Shape, type and chunking of one array.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ArrayInfo {
    pub shape: Vec<u64>,
    pub dtype: Dtype,
    /// The chunk shape, or `None` for a contiguous HDF5 dataset.
    pub chunks: Option<Vec<u64>>,
}

impl ArrayInfo {
    /// Rows per chunk along the first dimension; 1 for a contiguous HDF5 dataset, which reads
    /// any row range equally well.
    pub(crate) fn row_chunk(&self) -> u64 {
        self.chunks
            .as_ref()
            .and_then(|c| c.first().copied())
            .unwrap_or(1)
            .max(1)
    }

    /// Elements per row (the product of the trailing dimensions).
    pub(crate) fn row_len(&self) -> u64 {
        self.shape.iter().skip(1).product()
    }
}

/// A node of the hierarchy.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Group,
    Array(ArrayInfo),
}

/// How much a store has read so far: the proof that a subset read stays a subset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadMetrics {
    /// Storage reads (zarr chunks and metadata documents; HDF5 hyperslab reads).
    pub reads: u64,
    /// Bytes fetched from storage (zarr) or decoded (HDF5).
    pub bytes: u64,
}

/// A hierarchical array store. Paths are `/`-separated and relative to the store's root (`""` is
/// the root). All calls block.
pub(crate) trait ArrayStore: Send + Sync + fmt::Debug {
    /// Where the store lives, for messages.
    fn location(&self) -> &str;

    /// The node at `path`, or `None` if there is none.
    fn node(&self, path: &str) -> Result<Option<Node>>;

    /// The names of a group's children, sorted.
    fn children(&self, path: &str) -> Result<Vec<String>>;

    /// A node's attributes as JSON.
    fn attrs(&self, path: &str) -> Result<Map<String, Value>>;

    /// Reads the block at `start` with `count` elements per dimension, in row-major order, as one
    /// flat Arrow array of the array's [`Dtype`]. A 0-dimensional array has empty `start`/`count`.
    fn read(&self, path: &str, start: &[u64], count: &[u64]) -> Result<ArrayRef>;

    /// Reads `rows` (ascending, unique) of a 2-D array, columns `cols`: `rows.len()` rows of
    /// `cols` values, row-major. The default reads the block from the first row to the last and
    /// keeps the rows asked for; a store that can decode parts of a chunk reads less.
    fn read_row_selection(&self, path: &str, rows: &[u64], cols: Range<u64>) -> Result<ArrayRef> {
        read_row_selection_by_block(self, path, rows, cols)
    }

    /// Whether reads of `path` gain from running on several threads at once. libhdf5 serialises
    /// its calls behind one lock, and threads queueing on it cost more than they save; direct
    /// reads of contiguous HDF5 datasets and zarr chunks run in parallel.
    fn concurrent_reads(&self, _path: &str) -> bool {
        true
    }

    /// What the store has read since it was opened.
    fn metrics(&self) -> ReadMetrics;

    /// Small arrays read once and kept (sparse `indptr`, categories).
    fn memo(&self) -> &Memo;

    /// Changes when the store's metadata on disk changes; `None` if that cannot be told cheaply
    /// (remote stores), so the open store is not reused.
    fn fingerprint(&self) -> Option<u64>;
}

/// Whole arrays a store keeps once read, by path.
#[derive(Debug, Default)]
pub(crate) struct Memo(std::sync::Mutex<std::collections::HashMap<String, ArrayRef>>);

/// Helpers on top of the trait's primitives.
impl<'a> dyn ArrayStore + 'a {
    /// The array at `path`, or NOT_FOUND naming it.
    pub(crate) fn array(&self, path: &str) -> Result<ArrayInfo> {
        match self.node(path)? {
            Some(Node::Array(info)) => Ok(info),
            Some(Node::Group) => Err(Error::invalid(format!(
                "'{path}' in {} is a group, not an array",
                self.location()
            ))),
            None => Err(Error::not_found(format!(
                "no element '{path}' in {}",
                self.location()
            ))),
        }
    }

    /// Whether `path` is a group.
    pub(crate) fn is_group(&self, path: &str) -> Result<bool> {
        Ok(matches!(self.node(path)?, Some(Node::Group)))
    }

    /// Reads rows `rows` of an array (every other dimension whole), flattened row-major.
    pub(crate) fn read_rows(
        &self,
        path: &str,
        info: &ArrayInfo,
        rows: Range<u64>,
    ) -> Result<ArrayRef> {
        let mut start = vec![0; info.shape.len()];
        let mut count = info.shape.clone();
        if let (Some(s), Some(c)) = (start.first_mut(), count.first_mut()) {
            *s = rows.start;
            *c = rows.end.saturating_sub(rows.start);
        }
        self.read(path, &start, &count)
    }

    /// Reads a whole array.
    pub(crate) fn read_all(&self, path: &str) -> Result<ArrayRef> {
        let info = self.array(path)?;
        self.read(path, &vec![0; info.shape.len()], &info.shape)
    }

    /// Reads a whole array once per open store; later calls return the kept copy.
    pub(crate) fn read_all_kept(&self, path: &str) -> Result<ArrayRef> {
        if let Ok(memo) = self.memo().0.lock()
            && let Some(array) = memo.get(path)
        {
            return Ok(Arc::clone(array));
        }
        let array = self.read_all(path)?;
        if let Ok(mut memo) = self.memo().0.lock() {
            memo.insert(path.to_string(), Arc::clone(&array));
        }
        Ok(array)
    }

    /// A string attribute, if present.
    pub(crate) fn attr_str(&self, path: &str, name: &str) -> Result<Option<String>> {
        Ok(self
            .attrs(path)?
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string))
    }

    /// anndata's `encoding-type` attribute.
    pub(crate) fn encoding(&self, path: &str) -> Result<Option<String>> {
        self.attr_str(path, "encoding-type")
    }
}

/// Joins store paths.
pub(crate) fn join(parent: &str, child: &str) -> String {
    match (parent.trim_matches('/'), child.trim_matches('/')) {
        ("", c) => c.to_string(),
        (p, "") => p.to_string(),
        (p, c) => format!("{p}/{c}"),
    }
}

/// Opens the array store an artifact is: an HDF5 file (`.h5ad`, `.h5`, `.hdf5`) or a zarr store.
///
/// Open local stores are kept (up to [`OPEN_STORES`]) and reused while the file, or the zarr
/// store's root metadata, keeps its size and modification time: a request then reads no
/// metadata again, and `indptr` and categories are read once per store.
pub(crate) fn open_store(located: &Located, suffix: &str) -> Result<Arc<dyn ArrayStore>> {
    let key = located.url.to_string();
    let cached = STORES.lock().ok().and_then(|c| c.get(&key).cloned());
    if let Some((stamp, store)) = cached {
        if store.fingerprint().is_some_and(|now| now == stamp) {
            return Ok(store);
        }
        // Changed on disk: the stale store is closed first. libhdf5 hands a second open of a
        // file that is still open the first one's state, which would hide the change (a file
        // truncated since would read from the stale metadata cache).
        drop(store);
        if let Ok(mut cache) = STORES.lock() {
            cache.remove(&key);
        }
    }
    let store: Arc<dyn ArrayStore> = if is_hdf5(suffix) {
        Arc::new(hdf5::Hdf5Store::open(located)?)
    } else {
        Arc::new(zarr::ZarrStore::open(located)?)
    };
    if let (Some(stamp), Ok(mut cache)) = (store.fingerprint(), STORES.lock()) {
        if cache.len() >= OPEN_STORES {
            cache.clear();
        }
        cache.insert(key, (stamp, Arc::clone(&store)));
    }
    Ok(store)
}

/// How many open stores are kept.
const OPEN_STORES: usize = 64;

type Stores = std::collections::HashMap<String, (u64, Arc<dyn ArrayStore>)>;

static STORES: std::sync::LazyLock<std::sync::Mutex<Stores>> =
    std::sync::LazyLock::new(Default::default);

/// A fingerprint of local files' sizes and modification times.
pub(crate) fn files_fingerprint<'a>(paths: impl Iterator<Item = &'a std::path::Path>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in paths {
        path.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(path) {
            meta.len().hash(&mut hasher);
            meta.modified().ok().hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// Whether the suffix names an HDF5 file.
pub(crate) fn is_hdf5(suffix: &str) -> bool {
    matches!(suffix, ".h5ad" | ".h5" | ".hdf5")
}

/// The most rows an array may declare. Planning splits rows into blocks before it reads them,
/// so a 1 KB store that claims 10^15 rows must fail here, not in an allocation.
pub(crate) const MAX_ROWS: u64 = 1 << 36;

/// The most bytes one read may produce: a read is allocated up front from its declared size.
pub(crate) const MAX_READ_BYTES: u64 = 4 << 30;

/// Refuses a declared shape no real store holds: more than [`MAX_ROWS`] rows, or more elements
/// than a 64-bit count.
pub(crate) fn check_shape(location: &str, path: &str, shape: &[u64]) -> Result<()> {
    let elements = shape.iter().try_fold(1u64, |n, d| n.checked_mul(*d));
    if shape.first().is_some_and(|&rows| rows > MAX_ROWS) || elements.is_none() {
        return Err(data_loss(
            location,
            format!("'{path}' declares shape {shape:?}, larger than any array this server reads"),
        ));
    }
    Ok(())
}

/// [`ArrayStore::read_row_selection`] through one block read, from the first row to the last.
pub(crate) fn read_row_selection_by_block<S: ArrayStore + ?Sized>(
    store: &S,
    path: &str,
    rows: &[u64],
    cols: Range<u64>,
) -> Result<ArrayRef> {
    let width = cols.end.saturating_sub(cols.start);
    let (Some(&first), Some(&last)) = (rows.first(), rows.last()) else {
        return store.read(path, &[0, cols.start], &[0, width]);
    };
    let span = last - first + 1;
    let block = store.read(path, &[first, cols.start], &[span, width])?;
    if rows.len() as u64 == span {
        return Ok(block);
    }
    let take = arrow::array::UInt64Array::from_iter_values(
        rows.iter()
            .flat_map(|&r| (0..width).map(move |c| (r - first) * width + c)),
    );
    arrow::compute::take(&block, &take, None)
        .map_err(|e| Error::internal_from(format!("rows of '{path}'"), e))
}

/// Refuses a read of `count` elements of `dtype` larger than [`MAX_READ_BYTES`].
pub(crate) fn check_read(location: &str, path: &str, count: &[u64], dtype: Dtype) -> Result<()> {
    let bytes = count
        .iter()
        .try_fold(dtype.width(), |n, d| n.checked_mul(*d));
    match bytes {
        Some(bytes) if bytes <= MAX_READ_BYTES => Ok(()),
        _ => Err(data_loss(
            location,
            format!(
                "a read of {count:?} elements of '{path}' is larger than {} GiB at once; the \
                 array's declared size is not what the store holds",
                MAX_READ_BYTES >> 30
            ),
        )),
    }
}

/// A read failure of `location`.
pub(crate) fn data_loss(location: &str, what: impl fmt::Display) -> Error {
    Error::DataLoss {
        location: location.to_string(),
        message: what.to_string(),
    }
}
