"""Interop: the demo AnnData and SpatialData, generic HDF5 and zarr datasets, and `show`.

Each answer is compared with an independent reader of the same file: anndata, h5py or zarr.
"""

import json

import anndata as ad
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import zarr

from conftest import REPO
from test_anndata import read
from test_cli import cli

DOCS_PREDICATE = "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05"


@pytest.mark.parametrize("key", ["pbmc68k.h5ad", "pbmc68k.zarr"])
def test_docs_predicate_on_demo_anndata(client, key):
    """lamindb's slice-arrays guide: 35 of 70 cells, and their X, as anndata gives them."""
    path = REPO / "demo" / key
    adata = ad.read_h5ad(path, backed="r") if key.endswith(".h5ad") else ad.read_zarr(path)
    mask = (adata.obs.cell_type.isin(["Dendritic cells", "CD14+ Monocytes"]) & (adata.obs.percent_mito <= 0.05)).to_numpy()
    assert mask.sum() == 35
    info, table = read(client, key=key, element=["X"], filter=DOCS_PREDICATE)
    assert table.column("obs_names").to_pylist() == adata.obs_names[mask].tolist()
    x = table.column("X").combine_chunks().flatten().to_numpy().reshape(-1, 765)
    np.testing.assert_array_equal(x, np.asarray(adata[mask].X))
    assert info.total_records == 35
    meta = json.loads(info.app_metadata)
    assert meta["shape"] == [70, 765] and meta["otype"] == "AnnData"
    assert meta["obsm"] == ["X_pca", "X_umap"] and meta["obsp"] == ["connectivities", "distances"]
    _, umap = read(client, key=key, element=["obsm", "X_umap"], filter=DOCS_PREDICATE)
    np.testing.assert_array_equal(
        umap.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 2), adata[mask].obsm["X_umap"]
    )


def test_spatialdata_table_is_served_like_anndata(client):
    """`[KEY, "tables", NAME, ...]` serves the SpatialData store's AnnData table."""
    path = REPO / "demo" / "blobs.zarr"
    table = ad.read_zarr(path / "tables" / "table")
    [listed] = client.list_flights(json.dumps({"key_prefix": "blobs"}).encode())
    assert json.loads(listed.app_metadata)["otype"] == "SpatialData"
    want = table.obs.index[(table.obs["clone"] == "diploid").to_numpy()].tolist()
    _, got = read(client, key="blobs.zarr", element=["tables", "table", "obs"], filter="clone = 'diploid'")
    assert got.column("obs_names").to_pylist() == want
    _, x = read(client, key="blobs.zarr", element=["tables", "table", "X"], filter="clone = 'diploid'")
    mask = (table.obs["clone"] == "diploid").to_numpy()
    x_want = table.X[mask]
    x_want = x_want.toarray() if hasattr(x_want, "toarray") else np.asarray(x_want)
    if "X" in x.schema.names:
        got_x = x.column("X").combine_chunks().flatten().to_numpy().reshape(x_want.shape)
    else:
        import scipy.sparse as sp

        got_x = sp.csr_matrix(
            (x.column("data").combine_chunks().values.to_numpy(),
             x.column("indices").combine_chunks().values.to_numpy(),
             x.column("indices").combine_chunks().offsets.to_numpy()),
            shape=x_want.shape,
        ).toarray()
    np.testing.assert_array_equal(got_x, x_want)
    with pytest.raises(KeyError, match="nope"):
        read(client, key="blobs.zarr", element=["tables", "nope", "obs"])


@pytest.fixture(scope="module")
def generic_files(server):
    rng = np.random.default_rng(3)
    h5 = server.files / "generic.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("group/sub/matrix", data=rng.random((1000, 3)), chunks=(100, 3))
        f.create_dataset("group/counts", data=rng.integers(0, 9, 500, dtype=np.int32))
        f.create_dataset("labels", data=np.array(["a", "bb", "ccc"], dtype=h5py.string_dtype()))
    z = server.files / "generic.zarr"
    root = zarr.open_group(z, mode="w", zarr_format=3)
    arr = root.create_array("a/b", shape=(300, 4), chunks=(64, 4), dtype="float32")
    arr[:] = rng.random((300, 4), dtype=np.float32)
    c = server.client()
    for key, path in [("generic.h5", h5), ("generic.zarr", z)]:
        list(c.do_action(flight.Action("register", json.dumps({"path": str(path), "key": key}).encode())))
    c.close()
    return h5, z


def test_generic_datasets_equal_h5py_and_zarr(client, generic_files):
    h5, z = generic_files
    with h5py.File(h5) as f:
        matrix, counts, labels = f["group/sub/matrix"][:], f["group/counts"][:], f["labels"].asstr()[:]
    info, table = read(client, key="generic.h5", element=["group/sub/matrix"])
    assert len(info.endpoints) >= 1
    assert table.schema.field("values").type == pa.list_(pa.field("item", pa.float64()), 3)
    np.testing.assert_array_equal(table.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 3), matrix)
    # Path parts work as well as one path string; a filter applies to the values.
    _, table = read(client, key="generic.h5", element=["group", "counts"], filter="values > 4")
    np.testing.assert_array_equal(table.column("values").to_numpy(), counts[counts > 4])
    _, table = read(client, key="generic.h5", element=["labels"])
    assert table.column("values").to_pylist() == list(labels)
    want = zarr.open_array(z / "a" / "b")[:]
    _, table = read(client, key="generic.zarr", element=["a/b"])
    np.testing.assert_array_equal(table.column("values").combine_chunks().flatten().to_numpy().reshape(-1, 4), want)
    with pytest.raises(KeyError, match="group"):
        read(client, key="generic.h5", element=["group"])
    [result] = client.do_action(flight.Action("describe", json.dumps({"key": "generic.h5"}).encode()))
    tree = {n["path"]: n for n in json.loads(result.body.to_pybytes())["structure"]["tree"]}
    assert tree["group/sub/matrix"]["shape"] == [1000, 3]
    assert tree["group/sub/matrix"]["chunks"] == [100, 3]
    assert tree["group/sub/matrix"]["dtype"] == "float64"
    assert tree["group"]["kind"] == "group"


def test_show_prints_the_anndata_repr(server, generic_files):
    shown = cli(server, "show", "pbmc68k.h5ad").stdout
    assert "AnnData object with n_obs × n_vars = 70 × 765" in shown
    assert "    obsm: 'X_pca', 'X_umap'" in shown
    assert "    obs: 'cell_type', 'n_genes', 'percent_mito', 'louvain'" in shown
    shown = cli(server, "--server", server.url, "show", "blobs.zarr").stdout
    assert "SpatialData object" in shown and "table 'table': AnnData object with n_obs × n_vars = " in shown
    shown = cli(server, "show", "generic.h5").stdout
    assert "matrix  shape=[1000,3] dtype=float64 chunks=[100,3]" in shown
    # A preview of X cuts each matrix row short instead of printing 765 values.
    got = cli(server, "--server", server.url, "get", "pbmc68k.h5ad", "--element", "X", "--filter", DOCS_PREDICATE).stdout
    assert " …" in got and "rows shown" in got and max(len(line) for line in got.splitlines()) < 200


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_add_column_writes_a_new_version(client, server, zarr_format):
    """add_column: a new version with the column; the old one byte-for-byte unchanged."""
    import shutil

    src = ad.read_zarr(REPO / "demo" / "pbmc68k.zarr")
    src.uns["copy"] = f"zarr {zarr_format}"  # new content, not a duplicate of the demo's
    path = server.files / f"edit{zarr_format}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    with ad.settings.override(zarr_write_format=zarr_format):
        src.write_zarr(path)
    key = f"edit{zarr_format}.zarr"
    [r] = client.do_action(flight.Action("register", json.dumps({"path": str(path), "key": key}).encode()))
    old = json.loads(r.body.to_pybytes())
    before = snapshot(path)

    rng = np.random.default_rng(0)
    score = rng.random(70).round(3).tolist()
    body = {"key": key, "element": "obs", "name": "score", "values": score}
    [r] = client.do_action(flight.Action("add_column", json.dumps(body).encode()))
    new = json.loads(r.body.to_pybytes())
    assert new["uid"][:16] == old["uid"][:16] and new["uid"] != old["uid"] and new["is_latest"]

    # A categorical var column through DoPut, with a missing value.
    kinds = pa.array(["a", None] + ["b"] * 763).dictionary_encode()
    descriptor = flight.FlightDescriptor.for_command(
        json.dumps({"action": "add_column", "key": key, "element": "var", "name": "kind"})
    )
    writer, reader = client.do_put(descriptor, pa.schema([("kind", kinds.type)]))
    writer.write_table(pa.table({"kind": kinds}))
    writer.done_writing()
    newest = json.loads(reader.read().to_pybytes())
    writer.close()

    assert snapshot(path) == before, "the old version's files changed"
    _, obs_old = read(client, key=key, version=old["uid"])
    assert "score" not in obs_old.schema.names
    _, obs_new = read(client, key=key)
    assert obs_new.column("score").to_pylist() == score
    _, x = read(client, key=key, element=["X"], filter="score > 0.5")
    assert x.num_rows == sum(s > 0.5 for s in score)

    # The real anndata reads the new version, column and all.
    stored = ad.read_zarr(newest["path"].removeprefix("file://"))
    np.testing.assert_array_equal(stored.obs["score"].to_numpy(), np.array(score))
    assert stored.var["kind"].iloc[0] == "a" and stored.var["kind"].isna().iloc[1]
    np.testing.assert_array_equal(np.asarray(stored.X), np.asarray(src.X))

    with pytest.raises(pa.ArrowInvalid, match="already has a column 'score'"):
        list(client.do_action(flight.Action("add_column", json.dumps(body).encode())))
    with pytest.raises(pa.ArrowInvalid, match="70 rows"):
        short = dict(body, name="short", values=[1, 2])
        list(client.do_action(flight.Action("add_column", json.dumps(short).encode())))


def test_add_column_refuses_h5ad_with_advice(client):
    body = {"key": "pbmc68k.h5ad", "element": "obs", "name": "x", "values": [1] * 70}
    with pytest.raises(pa.ArrowInvalid, match="write_zarr"):
        list(client.do_action(flight.Action("add_column", json.dumps(body).encode())))
