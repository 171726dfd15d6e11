//! HDF5 files (`.h5ad`, `.h5`, `.hdf5`) through libhdf5 (the hdf5-metno bindings).
//!
//! Reads are hyperslabs: one contiguous block per call, which libhdf5 turns into the fewest chunk
//! or extent reads. libhdf5 is not thread-safe and the bindings serialise every call, so callers
//! coalesce rows into large blocks rather than issuing many small reads.
//!
//! The file is long because it is one `ArrayStore` over one C library: the link checks, the
//! direct reads of contiguous datasets and the type mapping all depend on libhdf5's handles,
//! which stay private here.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::array::{ArrayRef, BooleanArray, PrimitiveArray, StringArray};
use arrow::datatypes::{
    ArrowPrimitiveType, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type,
    UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use hdf5::types::{FloatSize, IntSize, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, File, H5Type, Hyperslab, Location, LocationType, Selection, SliceOrIndex};
use serde_json::{Map, Value};

use super::{ArrayInfo, ArrayStore, Dtype, Memo, Node, ReadMetrics, data_loss};
use crate::error::{Error, Result};
use crate::storage::Located;

/// How deep groups may nest (hard links can make a group its own descendant).
const MAX_DEPTH: usize = 64;

/// Refuses a file that reaches outside itself: external links, datasets whose raw data lives in
/// external files, and virtual datasets, which libhdf5 would follow to any file the server can
/// read, past the allowed roots. Soft links stay inside the file, where their targets are checked.
fn check_links(group: &hdf5::Group, path: &str, location: &str, depth: usize) -> Result<()> {
    use hdf5::LinkType;
    use hdf5::plist::dataset_create::Layout;
    if depth > MAX_DEPTH {
        return Err(data_loss(
            location,
            format!("groups nest deeper than {MAX_DEPTH} levels at '{path}'"),
        ));
    }
    let mut links = Vec::new();
    group
        .iter_visit_default(|name, info| {
            links.push((name.to_string(), info.link_type));
            Ok(())
        })
        .map_err(|e| data_loss(location, format!("group '{path}': {e}")))?;
    for (name, kind) in links {
        let child = super::join(path, &name);
        let outside = |what: &str| {
            Error::PermissionDenied(format!(
                "'{child}' in {location} {what}, which this server does not follow: files outside \
                 the allowed storage roots are never read"
            ))
        };
        match kind {
            LinkType::External => return Err(outside("is an external link to another file")),
            LinkType::Soft => {}
            LinkType::Hard => {
                if let Ok(sub) = group.group(&name) {
                    check_links(&sub, &child, location, depth + 1)?;
                } else if let Ok(ds) = group.dataset(&name) {
                    let dcpl = ds
                        .dcpl()
                        .map_err(|e| data_loss(location, format!("dataset '{child}': {e}")))?;
                    if !dcpl.external().is_empty() {
                        return Err(outside("keeps its data in external files"));
                    }
                    if dcpl.layout() == Layout::Virtual {
                        return Err(outside("is a virtual dataset mapping other files"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// An open HDF5 file.
#[derive(Debug)]
pub(crate) struct Hdf5Store {
    file: File,
    path: std::path::PathBuf,
    /// The same file for direct reads of contiguous datasets.
    raw: std::fs::File,
    /// Per dataset: where its contiguous, unfiltered bytes are, if they are.
    direct: std::sync::Mutex<std::collections::HashMap<String, Option<Direct>>>,
    location: String,
    reads: AtomicU64,
    bytes: AtomicU64,
    memo: Memo,
}

impl Hdf5Store {
    pub(crate) fn open(located: &Located) -> Result<Self> {
        let location = located.url.to_string();
        let path = located.url.to_file_path().map_err(|()| {
            Error::invalid(format!(
                "{location}: HDF5 files are read from local storage only; store the artifact as \
                 .zarr to serve it from object storage"
            ))
        })?;
        let file = File::open(&path)
            .map_err(|e| data_loss(&location, format!("not a readable HDF5 file ({e})")))?;
        let raw = std::fs::File::open(&path).map_err(|e| Error::io(path.display(), e))?;
        check_links(&file, "", &location, 0)?;
        Ok(Self {
            file,
            raw,
            direct: Default::default(),
            path,
            location,
            reads: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            memo: Memo::default(),
        })
    }

    fn dataset(&self, path: &str) -> Result<Dataset> {
        self.file
            .dataset(path)
            .map_err(|e| data_loss(&self.location, format!("dataset '{path}': {e}")))
    }

    fn group(&self, path: &str) -> Result<hdf5::Group> {
        self.file
            .group(if path.is_empty() { "/" } else { path })
            .map_err(|e| data_loss(&self.location, format!("group '{path}': {e}")))
    }

    /// Where a contiguous, unfiltered, little-endian numeric dataset's bytes are; such a dataset
    /// is read straight from the file, a row range in one `pread`, without libhdf5 (which spends
    /// more on bookkeeping per small read than on the bytes, and serialises every call).
    fn direct(&self, path: &str) -> Result<Option<Direct>> {
        if let Ok(known) = self.direct.lock()
            && let Some(direct) = known.get(path)
        {
            return Ok(direct.clone());
        }
        let ds = self.dataset(path)?;
        let (_, dtype) = self.dtype(path, &ds)?;
        let little = ds
            .dtype()
            .map(|t| t.byte_order() == hdf5::datatype::ByteOrder::LittleEndian)
            .unwrap_or(false);
        let direct = match ds.offset() {
            Some(offset)
                if little
                    && cfg!(target_endian = "little")
                    && ds.filters().is_empty()
                    && ds.ndim() <= 2
                    && !matches!(dtype, Dtype::Utf8 | Dtype::Bool) =>
            {
                Some(Direct {
                    offset,
                    shape: ds.shape().into_iter().map(|d| d as u64).collect(),
                    dtype,
                })
            }
            _ => None,
        };
        if let Ok(mut known) = self.direct.lock() {
            known.insert(path.to_string(), direct.clone());
        }
        Ok(direct)
    }

    fn read_direct(
        &self,
        path: &str,
        d: &Direct,
        start: &[u64],
        count: &[u64],
    ) -> Result<ArrayRef> {
        use std::os::unix::fs::FileExt;
        let within = start.len() == d.shape.len()
            && start
                .iter()
                .zip(count)
                .zip(&d.shape)
                .all(|((s, c), n)| s.checked_add(*c).is_some_and(|end| end <= *n));
        if !within {
            // Every selection is checked against the element's shape before reading, so a read
            // outside it means the file contradicts itself.
            return Err(data_loss(
                &self.location,
                format!(
                    "read of '{path}' at {start:?} + {count:?} is outside its shape {:?}",
                    d.shape
                ),
            ));
        }
        let width = d.dtype.width();
        let fail = |e: std::io::Error| data_loss(&self.location, format!("reading '{path}': {e}"));
        // Offsets come from the file: any arithmetic on them that overflows is a corrupt file.
        let overflow = || data_loss(&self.location, format!("'{path}' has offsets out of range"));
        let n = count
            .iter()
            .try_fold(1u64, |n, c| n.checked_mul(*c))
            .ok_or_else(overflow)?;
        let bytes = n.checked_mul(width).ok_or_else(overflow)?;
        let byte_at = |element: Option<u64>| -> Result<u64> {
            element
                .and_then(|e| e.checked_mul(width))
                .and_then(|b| b.checked_add(d.offset))
                .ok_or_else(overflow)
        };
        let mut buffer = arrow::buffer::MutableBuffer::from_len_zeroed(
            usize::try_from(bytes).map_err(|_| overflow())?,
        );
        match (d.shape.as_slice(), start, count) {
            ([_, cols], [r, c], [_, m]) if *c == 0 && m == cols => {
                let at = byte_at(r.checked_mul(*cols))?;
                self.raw
                    .read_exact_at(buffer.as_slice_mut(), at)
                    .map_err(fail)?;
            }
            ([_, cols], [r, c], [rows, m]) => {
                let row_bytes = usize::try_from(m.saturating_mul(width)).map_err(|_| overflow())?;
                for (i, out) in buffer
                    .as_slice_mut()
                    .chunks_mut(row_bytes.max(1))
                    .enumerate()
                {
                    if (i as u64) < *rows {
                        let element = r
                            .checked_add(i as u64)
                            .and_then(|row| row.checked_mul(*cols))
                            .and_then(|e| e.checked_add(*c));
                        self.raw
                            .read_exact_at(out, byte_at(element)?)
                            .map_err(fail)?;
                    }
                }
            }
            (_, start, _) => {
                let at = byte_at(Some(start.first().copied().unwrap_or(0)))?;
                self.raw
                    .read_exact_at(buffer.as_slice_mut(), at)
                    .map_err(fail)?;
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let data = arrow::array::ArrayData::builder(d.dtype.arrow())
            .len(n as usize)
            .add_buffer(buffer.into())
            .build()
            .map_err(|e| data_loss(&self.location, format!("'{path}': {e}")))?;
        Ok(arrow::array::make_array(data))
    }

    /// A dataset's HDF5 type and the element type it is served as.
    fn dtype(&self, path: &str, ds: &Dataset) -> Result<(TypeDescriptor, Dtype)> {
        let descriptor = ds
            .dtype()
            .and_then(|t| t.to_descriptor())
            .map_err(|e| data_loss(&self.location, format!("dataset '{path}': {e}")))?;
        let dtype = dtype_of(&descriptor).ok_or_else(|| {
            Error::invalid(format!(
                "dataset '{path}' in {} has HDF5 type {descriptor}, which cannot be served \
                 (compound datasets come from anndata < 0.7: re-save the file with current anndata, \
                 `anndata.read_h5ad(path).write_h5ad(path)`)",
                self.location
            ))
        })?;
        Ok((descriptor, dtype))
    }

    fn exists(&self, path: &str) -> bool {
        // `link_exists` on a nested path fails if an intermediate group is missing: walk it.
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !self.file.link_exists(&prefix) {
                return false;
            }
        }
        true
    }
}

/// The place of a contiguous dataset's bytes in the file.
#[derive(Debug, Clone)]
struct Direct {
    offset: u64,
    shape: Vec<u64>,
    dtype: Dtype,
}

/// The element type of a dataset, or an error naming what is not supported.
fn dtype_of(descriptor: &TypeDescriptor) -> Option<Dtype> {
    Some(match descriptor {
        TypeDescriptor::Boolean => Dtype::Bool,
        TypeDescriptor::Enum(e) if is_bool_enum(e) => Dtype::Bool,
        TypeDescriptor::Integer(IntSize::U1) => Dtype::Int8,
        TypeDescriptor::Integer(IntSize::U2) => Dtype::Int16,
        TypeDescriptor::Integer(IntSize::U4) => Dtype::Int32,
        TypeDescriptor::Integer(IntSize::U8) => Dtype::Int64,
        TypeDescriptor::Unsigned(IntSize::U1) => Dtype::UInt8,
        TypeDescriptor::Unsigned(IntSize::U2) => Dtype::UInt16,
        TypeDescriptor::Unsigned(IntSize::U4) => Dtype::UInt32,
        TypeDescriptor::Unsigned(IntSize::U8) => Dtype::UInt64,
        TypeDescriptor::Float(FloatSize::U4) => Dtype::Float32,
        TypeDescriptor::Float(FloatSize::U8) => Dtype::Float64,
        TypeDescriptor::VarLenUnicode | TypeDescriptor::VarLenAscii => Dtype::Utf8,
        _ => return None,
    })
}

/// h5py stores numpy booleans as an enum `{FALSE: 0, TRUE: 1}`.
fn is_bool_enum(e: &hdf5::types::EnumType) -> bool {
    e.members.len() == 2
        && e.members
            .iter()
            .all(|m| m.name.eq_ignore_ascii_case("false") || m.name.eq_ignore_ascii_case("true"))
}

impl ArrayStore for Hdf5Store {
    fn location(&self) -> &str {
        &self.location
    }

    fn node(&self, path: &str) -> Result<Option<Node>> {
        let path = path.trim_matches('/');
        if path.is_empty() {
            return Ok(Some(Node::Group));
        }
        if !self.exists(path) {
            return Ok(None);
        }
        match self.file.loc_type_by_name(path) {
            Ok(LocationType::Dataset) => {}
            Ok(_) => return Ok(Some(Node::Group)),
            Err(e) => return Err(data_loss(&self.location, format!("'{path}': {e}"))),
        }
        let ds = self.dataset(path)?;
        let (_, dtype) = self.dtype(path, &ds)?;
        let shape: Vec<u64> = ds.shape().into_iter().map(|d| d as u64).collect();
        super::check_shape(&self.location, path, &shape)?;
        Ok(Some(Node::Array(ArrayInfo {
            shape,
            dtype,
            chunks: ds
                .chunk()
                .map(|c| c.into_iter().map(|d| d as u64).collect()),
        })))
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        let mut names = self
            .group(path.trim_matches('/'))?
            .member_names()
            .map_err(|e| data_loss(&self.location, format!("group '{path}': {e}")))?;
        names.sort();
        Ok(names)
    }

    fn attrs(&self, path: &str) -> Result<Map<String, Value>> {
        let path = path.trim_matches('/');
        let is_dataset = !path.is_empty()
            && matches!(self.file.loc_type_by_name(path), Ok(LocationType::Dataset));
        let names = if is_dataset {
            let dataset = self.dataset(path)?;
            attrs_of(&dataset)
        } else {
            let group = self.group(path)?;
            attrs_of(&group)
        };
        names.map_err(|e| data_loss(&self.location, format!("attributes of '{path}': {e}")))
    }

    fn read(&self, path: &str, start: &[u64], count: &[u64]) -> Result<ArrayRef> {
        let path = path.trim_matches('/');
        if let Some(direct) = self.direct(path)? {
            super::check_read(&self.location, path, count, direct.dtype)?;
            return self.read_direct(path, &direct, start, count);
        }
        let ds = self.dataset(path)?;
        let (descriptor, dtype) = self.dtype(path, &ds)?;
        super::check_read(&self.location, path, count, dtype)?;
        let selection = if start.is_empty() {
            Selection::All
        } else {
            let slices: Vec<SliceOrIndex> = start
                .iter()
                .zip(count)
                .map(|(&s, &c)| SliceOrIndex::SliceCount {
                    start: s as usize,
                    step: 1,
                    count: c as usize,
                    block: 1,
                })
                .collect();
            Selection::from(Hyperslab::from(slices))
        };
        if count.contains(&0) {
            return Ok(arrow::array::new_empty_array(&dtype.arrow()));
        }
        let fail = |e: hdf5::Error| data_loss(&self.location, format!("reading '{path}': {e}"));
        let array: ArrayRef = match dtype {
            Dtype::Bool => Arc::new(BooleanArray::from(
                read_vec::<bool>(&ds, selection).map_err(fail)?,
            )),
            Dtype::Int8 => primitive::<Int8Type>(&ds, selection).map_err(fail)?,
            Dtype::Int16 => primitive::<Int16Type>(&ds, selection).map_err(fail)?,
            Dtype::Int32 => primitive::<Int32Type>(&ds, selection).map_err(fail)?,
            Dtype::Int64 => primitive::<Int64Type>(&ds, selection).map_err(fail)?,
            Dtype::UInt8 => primitive::<UInt8Type>(&ds, selection).map_err(fail)?,
            Dtype::UInt16 => primitive::<UInt16Type>(&ds, selection).map_err(fail)?,
            Dtype::UInt32 => primitive::<UInt32Type>(&ds, selection).map_err(fail)?,
            Dtype::UInt64 => primitive::<UInt64Type>(&ds, selection).map_err(fail)?,
            Dtype::Float32 => primitive::<Float32Type>(&ds, selection).map_err(fail)?,
            Dtype::Float64 => primitive::<Float64Type>(&ds, selection).map_err(fail)?,
            Dtype::Utf8 if descriptor == TypeDescriptor::VarLenAscii => {
                let values = read_vec::<VarLenAscii>(&ds, selection).map_err(fail)?;
                Arc::new(
                    values
                        .iter()
                        .map(|s| Some(s.as_str()))
                        .collect::<StringArray>(),
                )
            }
            Dtype::Utf8 => {
                let values = read_vec::<VarLenUnicode>(&ds, selection).map_err(fail)?;
                Arc::new(
                    values
                        .iter()
                        .map(|s| Some(s.as_str()))
                        .collect::<StringArray>(),
                )
            }
        };
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(array.len() as u64 * dtype.width(), Ordering::Relaxed);
        Ok(array)
    }

    fn concurrent_reads(&self, path: &str) -> bool {
        matches!(self.direct(path.trim_matches('/')), Ok(Some(_)))
    }

    fn fingerprint(&self) -> Option<u64> {
        Some(super::files_fingerprint(std::iter::once(
            self.path.as_path(),
        )))
    }

    fn memo(&self) -> &Memo {
        &self.memo
    }

    fn metrics(&self) -> ReadMetrics {
        ReadMetrics {
            reads: self.reads.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

fn read_vec<T: H5Type>(ds: &Dataset, selection: Selection) -> hdf5::Result<Vec<T>> {
    if ds.is_scalar() {
        return Ok(vec![ds.read_scalar::<T>()?]);
    }
    let array = ds.read_slice::<T, _, ndarray::IxDyn>(selection)?;
    // A freshly read array is in standard (row-major) layout starting at offset 0.
    Ok(array.into_raw_vec_and_offset().0)
}

fn primitive<T>(ds: &Dataset, selection: Selection) -> hdf5::Result<ArrayRef>
where
    T: ArrowPrimitiveType,
    T::Native: H5Type,
{
    Ok(Arc::new(PrimitiveArray::<T>::new(
        read_vec::<T::Native>(ds, selection)?.into(),
        None,
    )))
}

/// A node's attributes as JSON. An attribute of a type JSON cannot express is left out rather
/// than failing the node.
fn attrs_of(loc: &Location) -> hdf5::Result<Map<String, Value>> {
    let mut map = Map::new();
    for name in loc.attr_names()? {
        if let Ok(value) = read_attr(loc, &name) {
            map.insert(name, value);
        }
    }
    Ok(map)
}

/// One attribute as JSON: numbers, booleans and strings, scalars or 1-D arrays.
fn read_attr(loc: &Location, name: &str) -> hdf5::Result<Value> {
    let attr = loc.attr(name)?;
    let descriptor = attr.dtype()?.to_descriptor()?;
    let scalar = attr.is_scalar();
    fn pack<T>(scalar: bool, values: Vec<T>, f: impl Fn(T) -> Value) -> Value {
        let mut values: Vec<Value> = values.into_iter().map(f).collect();
        if scalar && values.len() == 1 {
            values.swap_remove(0)
        } else {
            Value::Array(values)
        }
    }
    Ok(match dtype_of(&descriptor) {
        Some(Dtype::Bool) => pack(scalar, attr.read_raw::<bool>()?, Value::from),
        Some(Dtype::Float32 | Dtype::Float64) => pack(scalar, attr.read_raw::<f64>()?, Value::from),
        Some(Dtype::UInt64) => pack(scalar, attr.read_raw::<u64>()?, Value::from),
        Some(Dtype::Utf8) if descriptor == TypeDescriptor::VarLenAscii => {
            pack(scalar, attr.read_raw::<VarLenAscii>()?, |s| {
                Value::from(s.as_str())
            })
        }
        Some(Dtype::Utf8) => pack(scalar, attr.read_raw::<VarLenUnicode>()?, |s| {
            Value::from(s.as_str())
        }),
        Some(_) => pack(scalar, attr.read_raw::<i64>()?, Value::from),
        None => Value::Null,
    })
}
