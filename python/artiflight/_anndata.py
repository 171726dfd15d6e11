"""An AnnData on the server, opened like lamindb's `AnnDataAccessor`: sliced lazily, read on access.

`obs` and `var` are fetched once and kept, so a mask is computed here, in pandas, as with a
backed AnnData. Indexing gives a view; only its `.X`, `.layers[...]`, `.obsm[...]`, ... and
`.to_memory()` read data, and then only the selected rows and columns: the rows travel to the
server as runs of positions (`obs_ranges`), the variables as names (`var_names`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ._dataset import Dataset

if TYPE_CHECKING:
    import anndata
    import pandas as pd
    import scipy.sparse

    from ._client import Client


def _nullable(data_type: pa.DataType) -> Any:
    """pandas' nullable dtype for an Arrow integer or boolean type."""
    import pandas as pd

    if pa.types.is_boolean(data_type):
        return pd.BooleanDtype()
    return pd.api.types.pandas_dtype(str(data_type).replace("int", "Int").replace("uInt", "UInt"))


def runs(positions: np.ndarray) -> list[list[int]]:
    """Ascending unique positions as half-open runs: `[0, 1, 2, 7]` -> `[[0, 3], [7, 8]]`.

    >>> runs(np.array([0, 1, 2, 7]))
    [[0, 3], [7, 8]]
    """
    if len(positions) == 0:
        return []
    positions = np.asarray(positions, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = positions[np.concatenate(([0], breaks))]
    stops = positions[np.concatenate((breaks - 1, [len(positions) - 1]))] + 1
    return np.column_stack((starts, stops)).tolist()


class _Axes:
    """`n_obs`, `n_vars`, `obs_names` and `var_names`, from a `shape`, `obs` and `var`."""

    shape: tuple[int, int]
    obs: pd.DataFrame
    var: pd.DataFrame

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]


class AnnDataAccessor(_Axes):
    """An AnnData artifact on the server. Nothing but its structure is read when opened.

    >>> adata = client.artifact("pbmc68k.h5ad").open()                           # doctest: +SKIP
    >>> mask = adata.obs.cell_type.isin(["Dendritic cells"]) & (adata.obs.percent_mito <= 0.05)
    >>> adata[mask].to_memory()                                                   # doctest: +SKIP
    """

    def __init__(self, client: Client, record: dict):
        self._client = client
        self.record = record
        structure = record.get("structure")
        if not isinstance(structure, dict):
            structure = client.describe(record["key"], record.get("uid")).get("structure") or {}
        self._structure: dict = structure
        shape = structure.get("shape") or [record.get("n_observations") or 0, 0]
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self._obs: pd.DataFrame | None = None
        self._var: pd.DataFrame | None = None

    # --- what the structure says ---------------------------------------------------------------

    @property
    def uns(self) -> dict:
        return dict(self._structure.get("uns") or {})

    def _names(self, kind: str) -> list[str]:
        names = self._structure.get(kind) or []
        return list(names.keys()) if isinstance(names, dict) else list(names)

    # The whole AnnData's elements, each read when asked, as a view of everything reads them.
    layers = property(lambda self: self[:, :].layers, doc="Layers by name, each read when asked.")
    obsm = property(lambda self: self[:, :].obsm, doc="obsm arrays by name, each read when asked.")
    varm = property(lambda self: self[:, :].varm, doc="varm arrays by name, each read when asked.")
    obsp = property(lambda self: self[:, :].obsp, doc="obsp matrices by name, each read when asked.")
    varp = property(lambda self: self[:, :].varp, doc="varp matrices by name, each read when asked.")

    # --- obs and var, fetched once -------------------------------------------------------------

    def _command(self, element: list[str], **selection: Any) -> dict:
        command = {"key": self.record["key"], "element": element, **selection}
        if self.record.get("uid"):
            command["version"] = self.record["uid"]
        return command

    def _frame(self, kind: str) -> pd.DataFrame:
        import pandas as pd

        table = Dataset(self._client, self._command([kind])).to_table()
        frame = table.to_pandas()
        # anndata's nullable integers and booleans arrive as nullable fields (plain arrays are
        # not null): they become pandas' nullable dtypes again, not floats and objects.
        for field in table.schema:
            if field.nullable and (pa.types.is_integer(field.type) or pa.types.is_boolean(field.type)):
                column = table.select([field.name]).to_pandas(types_mapper=_nullable)
                frame[field.name] = column[field.name]
        index = f"{kind}_names"
        if index in frame:
            frame = frame.set_index(index)
            frame.index = frame.index.astype(str)
            frame.index.name = None
        return frame

    @property
    def obs(self) -> pd.DataFrame:
        """The observations' annotations (categoricals as pandas categoricals), read once."""
        if self._obs is None:
            self._obs = self._frame("obs")
        return self._obs

    @property
    def var(self) -> pd.DataFrame:
        """The variables' annotations, read once."""
        if self._var is None:
            self._var = self._frame("var")
        return self._var

    # --- slicing ---------------------------------------------------------------------------------

    def __getitem__(self, index: Any) -> AnnDataView:
        obs, var = _split(index)
        return AnnDataView(self, _positions(obs, self, "obs"), _positions(var, self, "var"))

    @property
    def X(self) -> np.ndarray | scipy.sparse.csr_matrix:
        """The whole matrix (as anndata's backed `adata.X[:]` would read it)."""
        return self[:, :].X

    def to_memory(self) -> anndata.AnnData:
        """The whole AnnData, read into memory."""
        return self[:, :].to_memory()

    def __repr__(self) -> str:
        lines = [f"AnnDataAccessor object with n_obs × n_vars = {self.n_obs} × {self.n_vars}",
                 f"  constructed for the AnnData object {self.record.get('key')}"]
        for kind in ("obs", "var", "layers", "obsm", "varm", "obsp", "varp", "uns"):
            names = self._names(kind)
            if names:
                lines.append(f"    {kind}: {names}")
        return "\n".join(lines)


def _split(index: Any) -> tuple[Any, Any]:
    if isinstance(index, tuple):
        if len(index) != 2:
            raise IndexError(f"an AnnData takes [obs] or [obs, var], not {len(index)} indices")
        return index
    return index, slice(None)


def _positions(selection: Any, adata: _Axes, axis: str) -> np.ndarray | None:
    """Positions on `axis` that `selection` picks (None for all), as anndata understands it:
    a slice, a boolean mask, integers, or names."""
    n = adata.n_obs if axis == "obs" else adata.n_vars
    if isinstance(selection, slice) and selection == slice(None):
        return None
    if isinstance(selection, slice):
        return np.arange(n)[selection]
    if isinstance(selection, (int, np.integer)):
        selection = [selection]
    elif isinstance(selection, str):
        selection = [selection]
    values = np.asarray(getattr(selection, "values", selection))
    if values.dtype == bool:
        if len(values) != n:
            raise IndexError(f"a boolean {axis} mask has {len(values)} entries for {n} {axis}")
        return np.flatnonzero(values)
    if values.dtype.kind in "iu":
        positions = values.astype(np.int64)
        positions = np.where(positions < 0, positions + n, positions)
        if len(positions) and (positions.min() < 0 or positions.max() >= n):
            raise IndexError(f"an {axis} position is out of range for {n} {axis}")
        return positions
    if values.dtype.kind in "OUS":
        names = adata.obs_names if axis == "obs" else adata.var_names
        positions = names.get_indexer(values.astype(str))
        if (positions < 0).any():
            missing = values[positions < 0][:5].tolist()
            raise KeyError(f"not in {axis}_names: {missing}")
        return positions.astype(np.int64)
    raise IndexError(f"cannot select {axis} with {type(selection).__name__}")


class AnnDataView(_Axes):
    """A lazy selection of an `AnnDataAccessor`: reading happens on `.X`, `.layers[name]`,
    `.obsm[name]`, ..., or `.to_memory()`."""

    def __init__(self, adata: AnnDataAccessor, obs: np.ndarray | None, var: np.ndarray | None):
        self._adata = adata
        self._obs = obs
        self._var = var

    @property
    def shape(self) -> tuple[int, int]:
        n_obs = self._adata.n_obs if self._obs is None else len(self._obs)
        n_vars = self._adata.n_vars if self._var is None else len(self._var)
        return (n_obs, n_vars)

    def __getitem__(self, index: Any) -> AnnDataView:
        obs, var = _split(index)
        sub_obs = _positions(obs, self, "obs")
        sub_var = _positions(var, self, "var")
        return AnnDataView(self._adata, _compose(self._obs, sub_obs), _compose(self._var, sub_var))

    @property
    def obs(self) -> pd.DataFrame:
        """The selected rows of obs; categories no row uses are dropped, as anndata's views do."""
        return self._adata.obs if self._obs is None else _used(self._adata.obs.iloc[self._obs])

    @property
    def var(self) -> pd.DataFrame:
        return self._adata.var if self._var is None else _used(self._adata.var.iloc[self._var])

    @property
    def uns(self) -> dict:
        return self._adata.uns

    # --- reading ----------------------------------------------------------------------------------

    def _rows(self) -> tuple[dict, np.ndarray | None]:
        """The obs selection for a command, and how to put the answer's rows in the asked order
        (the server sends ascending positions; None when they are already in order)."""
        if self._obs is None:
            return {}, None
        unique = np.unique(self._obs)
        order = None if np.array_equal(unique, self._obs) else np.searchsorted(unique, self._obs)
        return {"obs_ranges": runs(unique)}, order

    def _vars(self) -> dict:
        if self._var is None:
            return {}
        return {"var_names": self._adata.var_names[self._var].tolist()}

    def _read(self, element: list[str], **selection: Any) -> pa.Table:
        command = self._adata._command(element, **selection)
        return Dataset(self._adata._client, command).to_table()

    def _matrix(self, element: list[str]) -> np.ndarray | scipy.sparse.csr_matrix:
        rows, order = self._rows()
        table = self._read(element, **rows, **self._vars())
        matrix = _matrix_of(table, self.n_vars)
        return matrix if order is None else matrix[order]

    @property
    def X(self) -> np.ndarray | scipy.sparse.csr_matrix:
        """The selected rows and columns of X: a numpy array, or a CSR matrix for sparse X."""
        return self._matrix(["X"])

    @property
    def layers(self) -> _Elements:
        return _Elements(self._adata._names("layers"), lambda name: self._matrix(["layers", name]))

    @property
    def obsm(self) -> _Elements:
        def read(name: str) -> np.ndarray:
            rows, order = self._rows()
            values = _fixed_size(self._read(["obsm", name], **rows).column("values"))
            return values if order is None else values[order]
        return _Elements(self._adata._names("obsm"), read)

    @property
    def varm(self) -> _Elements:
        return _Elements(self._adata._names("varm"),
                         lambda name: _fixed_size(self._read(["varm", name], **self._vars()).column("values")))

    @property
    def obsp(self) -> _Elements:
        def read(name: str) -> scipy.sparse.csr_matrix:
            rows, order = self._rows()
            n = len(np.unique(self._obs)) if self._obs is not None else self._adata.n_obs
            matrix = _coo(self._read(["obsp", name], **rows), n)
            return matrix if order is None else matrix[order][:, order]
        return _Elements(self._adata._names("obsp"), read)

    @property
    def varp(self) -> _Elements:
        def read(name: str) -> scipy.sparse.csr_matrix:
            if self._var is not None and not np.array_equal(np.unique(self._var), self._var):
                raise NotImplementedError("varp of a reordered variable selection")
            return _coo(self._read(["varp", name], **self._vars()), self.n_vars)
        return _Elements(self._adata._names("varp"), read)

    def to_memory(self) -> anndata.AnnData:
        """The selection as an in-memory `anndata.AnnData`: X, layers, obsm, varm, obsp, varp,
        obs, var and uns."""
        import anndata

        return anndata.AnnData(
            X=self.X,
            obs=self.obs.copy(),
            var=self.var.copy(),
            uns=self.uns,
            layers=dict(self.layers.items()),
            obsm=dict(self.obsm.items()),
            varm=dict(self.varm.items()),
            obsp=dict(self.obsp.items()),
            varp=dict(self.varp.items()),
        )

    def __repr__(self) -> str:
        lines = [f"AnnDataAccessorSubset object with n_obs × n_vars = {self.n_obs} × {self.n_vars}"]
        for kind in ("obs", "var", "layers", "obsm", "varm", "obsp", "varp", "uns"):
            names = self._adata._names(kind)
            if names:
                lines.append(f"  {kind}: {names}")
        return "\n".join(lines)


def _used(frame: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    frame = frame.copy()
    for name in frame.columns:
        if isinstance(frame[name].dtype, pd.CategoricalDtype):
            frame[name] = frame[name].cat.remove_unused_categories()
    return frame


def _compose(outer: np.ndarray | None, inner: np.ndarray | None) -> np.ndarray | None:
    if inner is None:
        return outer
    return inner if outer is None else outer[inner]


class _Elements(Mapping):
    """Element names of one kind (`layers`, `obsm`, ...); each value is read when asked."""

    def __init__(self, names: list[str], read: Any):
        self._names, self._read = names, read

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"{self._names}"


def _matrix_of(table: pa.Table, n_vars: int) -> np.ndarray | scipy.sparse.csr_matrix:
    """X or a layer from its wire layout: dense `FixedSizeList` rows, or sparse `indices`/`data`
    lists whose offsets are the CSR indptr (rebuilt without copying when the answer is one
    chunk)."""
    if "indices" in table.column_names and "data" in table.column_names:
        import scipy.sparse

        indices = _one(table.column("indices"))
        data = _one(table.column("data"))
        offsets = indices.offsets.to_numpy()
        start, stop = int(offsets[0]), int(offsets[-1])
        indptr = offsets - start if start else offsets
        return scipy.sparse.csr_matrix(
            (_numpy(data.values.slice(start, stop - start)),
             _numpy(indices.values.slice(start, stop - start)), indptr),
            shape=(table.num_rows, n_vars))
    shape = _shape(table)
    column = table.column(table.num_columns - 1)
    width = shape[1] if shape is not None else n_vars
    if table.num_rows == 0 or width == 0:
        value_type = column.type.value_type.to_pandas_dtype() if hasattr(column.type, "value_type") else np.float32
        return np.zeros((table.num_rows, width), dtype=value_type)
    return _fixed_size(column)


def _shape(table: pa.Table) -> tuple[int, int] | None:
    metadata = table.schema.metadata or {}
    raw = metadata.get(b"artiflight:shape")
    return tuple(json.loads(raw)) if raw else None


def _fixed_size(column: pa.ChunkedArray) -> np.ndarray:
    """Rows of a `FixedSizeList<T, k>` column as an (n, k) array."""
    array = _one(column)
    width = array.type.list_size
    return _numpy(array.flatten()).reshape(-1, width)


def _one(column: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as is (`combine_chunks` would copy even that)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _numpy(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False)


def _coo(table: pa.Table, n: int) -> scipy.sparse.csr_matrix:
    """obsp/varp from COO rows `row`, `col`, `value` (positions within the selection)."""
    import scipy.sparse

    rows = _numpy(_one(table.column("row")))
    cols = _numpy(_one(table.column("col")))
    values = _numpy(_one(table.column("value")))
    return scipy.sparse.csr_matrix((values, (rows, cols)), shape=(n, n))
