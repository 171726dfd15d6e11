"""artiflight: lamindb's `open()`, served over Arrow Flight.

    >>> import artiflight
    >>> client = artiflight.connect()                    # ARTIFLIGHT_SERVER, else grpc://127.0.0.1:8815
    >>> client.artifacts(suffix=".h5ad")                 # a DataFrame of records
    >>> ds = client.artifact("sharded_parquet").open()   # a lazy Dataset
    >>> ds.to_table(filter="louvain = 3", columns=["cell_type"])
    >>> adata = client.artifact("pbmc68k.h5ad").open()   # an AnnDataAccessor
    >>> adata[adata.obs.percent_mito <= 0.05].to_memory()

The guide is python/README.md; the wire contract is docs/PROTOCOL.md.
"""

from ._anndata import AnnDataAccessor, AnnDataView
from ._client import Artifact, Client, Collection, QuerySet, Stats, connect
from ._dataset import Dataset
from ._errors import (
    AccessDeniedError,
    ArtiflightError,
    InvalidRequestError,
    NotFoundError,
    ServerBusyError,
    ServerError,
    UnauthenticatedError,
)
from ._filters import Untranslatable

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "AnnDataAccessor",
    "AnnDataView",
    "Artifact",
    "ArtiflightError",
    "Client",
    "Collection",
    "Dataset",
    "InvalidRequestError",
    "NotFoundError",
    "QuerySet",
    "ServerBusyError",
    "ServerError",
    "Stats",
    "UnauthenticatedError",
    "Untranslatable",
    "connect",
]
