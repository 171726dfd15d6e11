//! What a matrix element is on storage: its encoding (dense, CSR, CSC), shape and value type,
//! read from the array's or group's metadata and checked before any selection is read.

use std::sync::Arc;

use arrow::array::AsArray;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};

use crate::error::{Error, Result};
use crate::formats::array::{ArrayInfo, ArrayStore, Dtype, Node, data_loss, join};

/// How a matrix is stored: anndata's `encoding-type` (`array`, `csr_matrix`, `csc_matrix`).
#[derive(Debug, Clone)]
pub(crate) enum Encoding {
    Dense { path: String, info: ArrayInfo },
    Sparse(Sparse),
}

/// A `csr_matrix` or `csc_matrix` group.
#[derive(Debug, Clone)]
pub(crate) struct Sparse {
    pub(super) data: String,
    pub(super) indices: String,
    pub(super) data_info: ArrayInfo,
    /// `indptr`, read once.
    pub(super) indptr: Arc<Vec<i64>>,
    pub(super) csc: bool,
}

/// A matrix element as stored: its encoding, shape and value type.
#[derive(Debug, Clone)]
pub(crate) struct Matrix {
    pub encoding: Encoding,
    pub shape: [u64; 2],
    pub dtype: Dtype,
}

impl Matrix {
    /// Opens the matrix at `path`: a 2-D array, or a sparse group. Anything else is refused,
    /// naming the element.
    pub(crate) fn open(store: &dyn ArrayStore, path: &str) -> Result<Self> {
        let location = store.location();
        match store.node(path)? {
            None => Err(Error::not_found(format!(
                "no element '{path}' in {location}"
            ))),
            Some(Node::Array(info)) => {
                let [rows, cols] = match info.shape.as_slice() {
                    [r, c] => [*r, *c],
                    [r] => [*r, 1],
                    other => {
                        return Err(Error::invalid(format!(
                            "element '{path}' in {location} has {} dimensions; only 1-D and 2-D \
                             matrices are served",
                            other.len()
                        )));
                    }
                };
                let dtype = info.dtype;
                if dtype == Dtype::Utf8 {
                    return Err(Error::invalid(format!(
                        "element '{path}' in {location} is a string array, not a matrix"
                    )));
                }
                Ok(Matrix {
                    encoding: Encoding::Dense {
                        path: path.to_string(),
                        info,
                    },
                    shape: [rows, cols],
                    dtype,
                })
            }
            Some(Node::Group) => {
                let attrs = store.attrs(path)?;
                let encoding = attrs
                    .get("encoding-type")
                    .and_then(|v| v.as_str())
                    .unwrap_or("(none)");
                let csc = match encoding {
                    "csr_matrix" => false,
                    "csc_matrix" => true,
                    other => {
                        return Err(Error::invalid(format!(
                            "element '{path}' in {location} has encoding '{other}', which cannot be \
                             served as a matrix"
                        )));
                    }
                };
                let shape: Vec<u64> = attrs
                    .get("shape")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                    .unwrap_or_default();
                let [rows, cols] = shape.as_slice() else {
                    return Err(data_loss(
                        location,
                        format!("'{path}' has no valid 'shape'"),
                    ));
                };
                let data = join(path, "data");
                let indices = join(path, "indices");
                let data_info = store.array(&data)?;
                let indices_info = store.array(&indices)?;
                if !matches!(indices_info.dtype, Dtype::Int32 | Dtype::Int64) {
                    return Err(data_loss(
                        location,
                        format!(
                            "'{path}/indices' is {}, not int32 or int64",
                            indices_info.dtype.numpy()
                        ),
                    ));
                }
                let indptr = store.read_all_kept(&join(path, "indptr"))?;
                let indptr = cast(&indptr, &DataType::Int64)
                    .map_err(|e| data_loss(location, format!("'{path}/indptr': {e}")))?;
                let indptr: Vec<i64> = indptr.as_primitive::<Int64Type>().values().to_vec();
                let major = if csc { *cols } else { *rows };
                let nnz = data_info.shape.first().copied().unwrap_or(0);
                let valid = indptr.len() as u64 == major + 1
                    && indptr.windows(2).all(|w| w[0] <= w[1])
                    && indptr.first() == Some(&0)
                    && indptr.last().is_some_and(|&l| l as u64 <= nnz)
                    && indices_info.shape.first().copied().unwrap_or(0) == nnz;
                if !valid {
                    return Err(data_loss(
                        location,
                        format!(
                            "'{path}' is not a valid sparse matrix (indptr does not match its shape)"
                        ),
                    ));
                }
                let dtype = data_info.dtype;
                Ok(Matrix {
                    encoding: Encoding::Sparse(Sparse {
                        data,
                        indices,
                        data_info,
                        indptr: Arc::new(indptr),
                        csc,
                    }),
                    shape: [*rows, *cols],
                    dtype,
                })
            }
        }
    }
}

impl Encoding {
    /// Whether this is a CSC matrix, which is converted to rows one block at a time.
    pub(crate) fn is_csc(&self) -> bool {
        matches!(self, Encoding::Sparse(s) if s.csc)
    }

    /// Rows per storage chunk, where partitions should split.
    pub(crate) fn row_chunk(&self) -> u64 {
        match self {
            Encoding::Dense { info, .. } => info.row_chunk(),
            Encoding::Sparse(_) => 1,
        }
    }
}
