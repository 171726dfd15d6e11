"""Interop: AnnData elements over Flight, checked against the anndata package reading the same file.

Every file is written in the test run by the real anndata package: h5ad (plain, and gzip-compressed
with chunks), zarr format 2 and zarr format 3 (chunked), with X dense, CSR or CSC.
"""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import scipy.sparse as sp

N_OBS, N_VARS = 240, 40
CELL_TYPES = ["B cells", "Dendritic cells", "CD14+ Monocytes", "NK cells"]


def make_adata(x_kind: str, seed: int = 7) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    dense = rng.random((N_OBS, N_VARS), dtype=np.float32)
    dense[dense < 0.7] = 0
    if x_kind == "dense":
        x = dense
    elif x_kind == "csr":
        x = sp.csr_matrix(dense)
    else:
        x = sp.csc_matrix(dense.astype(np.float64))
    codes = rng.integers(0, len(CELL_TYPES), N_OBS)
    cell_type = pd.Categorical.from_codes(codes, categories=CELL_TYPES)
    cell_type[::17] = np.nan
    nullable_int = pd.array(rng.integers(0, 100, N_OBS), dtype="Int32")
    nullable_int[::11] = pd.NA
    nullable_bool = pd.array(rng.random(N_OBS) > 0.5, dtype="boolean")
    nullable_bool[::13] = pd.NA
    obs = pd.DataFrame(
        {
            "cell_type": cell_type,
            "percent_mito": rng.random(N_OBS).astype(np.float32) * 0.1,
            "n_genes": rng.integers(100, 5000, N_OBS),
            "is_doublet": rng.random(N_OBS) > 0.9,
            "batch": [f"batch{i % 3}" for i in range(N_OBS)],
            "score": nullable_int,
            "flag": nullable_bool,
        },
        index=[f"cell{i:04d}" for i in range(N_OBS)],
    )
    var = pd.DataFrame(
        {
            "highly_variable": rng.random(N_VARS) > 0.5,
            "means": rng.random(N_VARS),
            "kind": pd.Categorical(["a", "b"] * (N_VARS // 2)),
        },
        index=[f"GENE{j:03d}" for j in range(N_VARS)],
    )
    conn = sp.random(N_OBS, N_OBS, density=0.02, format="csr", random_state=seed, dtype=np.float64)
    return ad.AnnData(
        X=x,
        obs=obs,
        var=var,
        layers={"counts": (dense * 10).astype(np.int32)},
        obsm={"X_pca": rng.random((N_OBS, 5), dtype=np.float32)},
        varm={"PCs": rng.random((N_VARS, 3))},
        obsp={"connectivities": conn},
        uns={"title": "test set", "params": {"n_pcs": 5, "alpha": 0.5}, "colors": ["red", "blue"]},
    )


def write(adata: ad.AnnData, path, how: str):
    if how == "h5ad":
        adata.write_h5ad(path)
    elif how == "h5ad_gzip":
        adata.write_h5ad(path, compression="gzip")
    else:
        fmt = 2 if how == "zarr2" else 3
        with ad.settings.override(zarr_write_format=fmt):
            adata.write_zarr(path, chunks=(32, N_VARS))


VARIANTS = [
    ("h5ad", "dense"),
    ("h5ad", "csr"),
    ("h5ad_gzip", "csc"),
    ("h5ad_gzip", "dense"),
    ("zarr2", "csr"),
    ("zarr2", "dense"),
    ("zarr3", "dense"),
    ("zarr3", "csc"),
]


@pytest.fixture(scope="module")
def files(server):
    """Writes every variant, registers it through the server; returns {variant: (key, path)}."""
    client = server.client()
    out = {}
    for how, x_kind in VARIANTS:
        suffix = ".h5ad" if how.startswith("h5ad") else ".zarr"
        path = server.files / f"ad_{how}_{x_kind}{suffix}"
        write(make_adata(x_kind), path, how)
        key = f"ad_{how}_{x_kind}{suffix}"
        body = json.dumps({"path": str(path), "key": key}).encode()
        list(client.do_action(flight.Action("register", body)))
        out[(how, x_kind)] = (key, path)
    client.close()
    return out


def read(client, **command):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command)))
    tables = [client.do_get(e.ticket).read_all() for e in info.endpoints]
    return info, pa.concat_tables(tables) if tables else info.schema.empty_table()


def backed(path):
    return ad.read_h5ad(path, backed="r") if str(path).endswith(".h5ad") else ad.read_zarr(path)


def dense(x):
    if hasattr(x, "to_memory"):  # a backed sparse dataset
        x = x.to_memory()
    return x.toarray() if sp.issparse(x) else np.asarray(x)


PREDICATE = "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05"


def mask(adata):
    return (adata.obs.cell_type.isin(["Dendritic cells", "CD14+ Monocytes"]) & (adata.obs.percent_mito <= 0.05)).to_numpy()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_obs_equals_anndata(client, files, variant):
    key, path = files[variant]
    expected = backed(path).obs
    info, table = read(client, key=key, element=["obs"])
    assert table.schema.names == ["obs_names", *expected.columns]
    assert table.num_rows == N_OBS
    assert pa.types.is_dictionary(table.schema.field("cell_type").type)
    assert table.column("obs_names").to_pylist() == expected.index.tolist()
    for col in expected.columns:
        # pyarrow converts pandas' categoricals and nullable arrays with their nulls.
        want = pa.array(expected[col])
        have = table.column(col).combine_chunks()
        assert have.type == want.type, col
        assert have.to_pylist() == want.to_pylist(), col
    # And the other way round: pandas gets categoricals and nullable dtypes back.
    got = table.to_pandas()
    assert isinstance(got["cell_type"].dtype, pd.CategoricalDtype)
    assert got["cell_type"].isna().tolist() == expected["cell_type"].isna().tolist()
    assert json.loads(info.app_metadata)["shape"] == [N_OBS, N_VARS]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_x_filtered_equals_anndata(client, files, variant):
    key, path = files[variant]
    adata = backed(path)
    m = mask(adata)
    want = dense(adata[m].X)
    # Dense layout (explicit): rows of FixedSizeList.
    _, table = read(client, key=key, element=["X"], filter=PREDICATE, layout="dense", columns=["cell_type"])
    assert table.column("obs_names").to_pylist() == adata.obs_names[m].tolist()
    assert table.schema.names == ["obs_names", "cell_type", "X"]
    values = table.column("X").combine_chunks().flatten().to_numpy().reshape(-1, N_VARS)
    np.testing.assert_array_equal(values, want)
    shape = json.loads(table.schema.metadata[b"artiflight:shape"])
    assert shape == [int(m.sum()), N_VARS]
    assert json.loads(table.schema.metadata[b"artiflight:var_names"]) == adata.var_names.tolist()


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_sparse_layout_rebuilds_csr_without_copy(client, files, variant):
    key, path = files[variant]
    adata = backed(path)
    info = client.get_flight_info(
        flight.FlightDescriptor.for_command(json.dumps({"key": key, "element": ["X"], "layout": "sparse"}))
    )
    parts = []
    for endpoint in info.endpoints:
        for chunk in client.do_get(endpoint.ticket):
            batch = chunk.data
            indices = batch.column("indices")
            data = batch.column("data")
            offsets = indices.offsets.to_numpy()
            np.testing.assert_array_equal(offsets, data.offsets.to_numpy())
            idx = indices.values.to_numpy(zero_copy_only=True)
            vals = data.values.to_numpy(zero_copy_only=True)
            csr = sp.csr_matrix((vals, idx, offsets - offsets[0]), shape=(batch.num_rows, N_VARS), copy=False)
            if len(vals):
                assert np.shares_memory(csr.data, vals)
            parts.append(csr)
    got = sp.vstack(parts).tocsr()
    want = sp.csr_matrix(dense(adata.X))
    assert got.shape == want.shape
    assert (got != want).nnz == 0
    assert got.dtype == adata.X.dtype


@pytest.mark.parametrize("variant", [("h5ad", "dense"), ("zarr3", "csc"), ("zarr2", "csr")], ids=str)
def test_var_selection_keeps_given_order(client, files, variant):
    key, path = files[variant]
    adata = backed(path)
    names = ["GENE007", "GENE001", "GENE030"]
    _, table = read(client, key=key, element=["X"], var_names=names, obs_range=[10, 50], layout="dense")
    want = dense(adata[10:50, names].X)
    np.testing.assert_array_equal(table.column("X").combine_chunks().flatten().to_numpy().reshape(-1, 3), want)
    assert json.loads(table.schema.metadata[b"artiflight:var_names"]) == names
    # The var element in the same order, as adata.var.loc[names].
    _, var = read(client, key=key, element=["var"], var_names=names)
    assert var.column("var_names").to_pylist() == names
    np.testing.assert_array_equal(var.column("means").to_numpy(), adata.var.loc[names, "means"].to_numpy())
    _, var = read(client, key=key, element=["var"], var_filter="highly_variable", columns=["var_names"])
    assert var.column("var_names").to_pylist() == adata.var_names[adata.var.highly_variable.to_numpy()].tolist()
    # Sparse layout of the same selection: indices are positions in the selected vars.
    _, table = read(client, key=key, element=["X"], var_names=names, obs_range=[10, 50], layout="sparse")
    csr = sp.csr_matrix(
        (table.column("data").combine_chunks().values.to_numpy(),
         table.column("indices").combine_chunks().values.to_numpy(),
         table.column("indices").combine_chunks().offsets.to_numpy()),
        shape=(40, 3),
    )
    np.testing.assert_array_equal(csr.toarray(), want)
    # var_filter on var, wide layout named by var.
    _, table = read(client, key=key, element=["X"], var_filter="highly_variable", layout="wide", limit=5)
    hv = adata.var_names[adata.var.highly_variable.to_numpy()].tolist()
    assert table.schema.names == ["obs_names", *hv]
    want = dense(adata[:5, hv].X)
    np.testing.assert_array_equal(np.column_stack([table.column(n).to_numpy() for n in hv]), want)


@pytest.mark.parametrize("variant", [("h5ad", "csr"), ("zarr2", "dense"), ("zarr3", "dense")], ids=str)
def test_other_elements_equal_anndata(client, files, variant):
    key, path = files[variant]
    adata = backed(path)
    m = mask(adata)
    sub = adata[m]
    _, var = read(client, key=key, element=["var"])
    assert var.column("var_names").to_pylist() == adata.var_names.tolist()
    np.testing.assert_array_equal(var.column("means").to_numpy(), adata.var["means"].to_numpy())
    _, layer = read(client, key=key, element=["layers", "counts"], filter=PREDICATE)
    np.testing.assert_array_equal(
        layer.column("counts").combine_chunks().flatten().to_numpy().reshape(-1, N_VARS),
        dense(sub.layers["counts"]),
    )
    _, obsm = read(client, key=key, element=["obsm", "X_pca"], filter=PREDICATE)
    np.testing.assert_array_equal(obsm.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 5),
                                  sub.obsm["X_pca"])
    _, varm = read(client, key=key, element=["varm", "PCs"])
    assert varm.column("var_names").to_pylist() == adata.var_names.tolist()
    np.testing.assert_array_equal(varm.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 3),
                                  adata.varm["PCs"])
    _, obsp = read(client, key=key, element=["obsp", "connectivities"], filter=PREDICATE)
    n = int(m.sum())
    coo = sp.coo_matrix(
        (obsp.column("value").to_numpy(), (obsp.column("row").to_numpy(), obsp.column("col").to_numpy())),
        shape=(n, n),
    )
    want = sp.csr_matrix(sub.obsp["connectivities"])
    assert (coo.tocsr() != want).nnz == 0


def test_describe_has_structure_and_uns(client, files):
    key, path = files[("zarr2", "csr")]
    [result] = client.do_action(flight.Action("describe", json.dumps({"key": key}).encode()))
    record = json.loads(result.body.to_pybytes())
    assert record["otype"] == "AnnData"
    assert record["n_observations"] == N_OBS
    structure = record["structure"]
    assert structure["shape"] == [N_OBS, N_VARS]
    assert structure["X"]["encoding"] == "csr_matrix"
    assert structure["layers"] == ["counts"] and structure["obsp"] == ["connectivities"]
    assert structure["uns"]["title"] == "test set"
    assert structure["uns"]["params"] == {"n_pcs": 5, "alpha": 0.5}
    assert structure["uns"]["colors"] == ["red", "blue"]


def test_filter_errors_name_the_column(client, files):
    key, _ = files[("h5ad", "dense")]
    with pytest.raises(pa.ArrowInvalid, match="no_such_column"):
        read(client, key=key, element=["X"], filter="no_such_column > 1")
    with pytest.raises(KeyError, match="GENE999"):
        read(client, key=key, element=["X"], var_names=["GENE999"])
    with pytest.raises(KeyError, match="nope"):
        read(client, key=key, element=["obsm", "nope"])
    with pytest.raises(KeyError, match="nope"):
        read(client, key=key, element=["nope"])


def test_legacy_h5ad_is_refused_with_advice(client, server):
    """anndata < 0.7 stored obs and var as compound datasets: refused, saying how to re-save."""
    import h5py

    path = server.files / "legacy.h5ad"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=np.zeros((3, 2), dtype=np.float32))
        rec = np.array([(b"c1", 1.0), (b"c2", 2.0), (b"c3", 3.0)], dtype=[("index", "S2"), ("n", "f4")])
        f.create_dataset("obs", data=rec)
        f.create_dataset("var", data=np.array([(b"g1",), (b"g2",)], dtype=[("index", "S2")]))
    body = json.dumps({"path": str(path), "key": "legacy.h5ad"}).encode()
    # Refused when registered, so the user learns it at once; the server keeps serving.
    with pytest.raises(pa.ArrowInvalid, match="anndata.read_h5ad\\(path\\).write_h5ad\\(path\\)"):
        list(client.do_action(flight.Action("register", body)))
    _, table = read(client, key="pbmc68k.h5ad")
    assert table.num_rows == 70
