"""The Python package (python/, installed by scripts/setup.sh as `pip install ./python`) against the
real server, every answer compared with an independent reader: pyarrow.dataset and polars on the
files, anndata reading the same AnnData.
"""

import os
import subprocess
import sys

import anndata as ad
import artiflight
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import scipy.sparse as sp
from conftest import DEMO, REPO
from test_anndata import VARIANTS, backed, dense, make_adata, write

DEMO_H5AD = REPO / "demo" / "pbmc68k.h5ad"
SEED_CELL_TYPES = ["Dendritic cells", "CD14+ Monocytes"]


@pytest.fixture(scope="module")
def files(server):
    """Every AnnData variant written by anndata into a folder of this module's own (the server
    may hold test_anndata's files open), registered through the package: {variant: (key, path)}."""
    folder = server.files / "package"
    folder.mkdir(exist_ok=True)
    client = artiflight.connect(server.url)
    out = {}
    for how, x_kind in VARIANTS:
        suffix = ".h5ad" if how.startswith("h5ad") else ".zarr"
        path = folder / f"{how}_{x_kind}{suffix}"
        write(make_adata(x_kind, seed=8), path, how)  # not test_anndata.py's bytes: the same content would return its records
        out[(how, x_kind)] = (client.register(path, f"package/{how}_{x_kind}{suffix}").key, path)
    client.close()
    return out


@pytest.fixture()
def af(server):
    client = artiflight.connect(server.url)
    yield client
    client.close()


def local_demo() -> pa.Table:
    return pads.dataset(DEMO, format="parquet", partitioning="hive").to_table()


def canonical(table: pa.Table, by: list[str]) -> pd.DataFrame:
    frame = table.to_pandas().reset_index(drop=True)
    for name in frame.columns:
        if isinstance(frame[name].dtype, pd.CategoricalDtype):
            frame[name] = frame[name].astype(str)
    return frame.sort_values(by).reset_index(drop=True)


SORT = ["louvain", "n_genes", "percent_mito"]


# --- connecting and records ----------------------------------------------------------------------


def test_connect_reads_the_environment_and_status_runs(server, monkeypatch):
    monkeypatch.setenv("ARTIFLIGHT_SERVER", server.url)
    client = artiflight.connect()
    assert client.uri == server.url
    assert "sharded_parquet" in client.status()["keys"]
    out = subprocess.run([sys.executable, "-m", "artiflight"], capture_output=True, text=True,
                         env={**os.environ, "ARTIFLIGHT_SERVER": server.url}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"server: {server.url}" in out.stdout and "pbmc68k.h5ad" in out.stdout
    down = subprocess.run([sys.executable, "-m", "artiflight", "grpc://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_records_are_the_catalog(af, client):
    listed = {f.descriptor.path[0].decode() for f in client.list_flights()}
    frame = af.artifacts()
    assert set(frame["key"]) == listed
    assert set(af.artifacts(suffix=".h5ad")["key"]) == {"pbmc68k.h5ad"} | {
        k for k in listed if k.endswith(".h5ad")}
    assert set(af.artifacts(key_prefix="sharded_parquet_shard")["key"]) == {
        "sharded_parquet_shard1", "sharded_parquet_shard2"}
    artifact = af.artifact("sharded_parquet")
    assert artifact.key == "sharded_parquet" and artifact.n_files == 11 and len(artifact.uid) == 20
    assert [v.uid for v in artifact.versions()][-1] == artifact.uid
    text = artifact.describe(print_it=False)
    assert "n_files: 11" in text
    assert "n_obs × n_vars = 70 × 765" in af.artifact("pbmc68k.h5ad").describe(print_it=False)
    collection = af.collection("sharded_parquet_collection")
    assert collection.members == ["sharded_parquet_shard1", "sharded_parquet_shard2"]
    with pytest.raises(TypeError, match="collection"):
        af.artifact("sharded_parquet_collection")


def test_writers_save_register_collect_and_delete(af, server):
    first = pd.DataFrame({"a": np.arange(5), "b": list("vwxyz")})
    saved = af.save(first, "pkg/saved")
    assert saved.key == "pkg/saved" and saved.suffix == ".parquet"
    assert af.artifact("pkg/saved").open().to_pandas().equals(first)
    second = af.save(pa.table({"a": np.arange(5, 8), "b": list("abc")}), "pkg/saved")
    assert second.uid[:16] == saved.uid[:16] and second.uid != saved.uid
    assert [v.uid for v in second.versions()] == [saved.uid, second.uid]
    assert af.artifact("pkg/saved", version=saved.uid).open().count_rows() == 5

    registered = af.register(server.files / "sharded_parquet", "pkg/registered")
    expected = local_demo()
    assert registered.open().count_rows() == expected.num_rows

    other = af.save(pl.DataFrame({"a": [100], "b": ["q"]}), "pkg/other")
    collection = af.create_collection("pkg/both", [second, other])
    table = collection.open().to_table()
    assert table.column("a").to_pylist() == [5, 6, 7, 100]

    other.delete()
    with pytest.raises(KeyError):
        af.artifact("pkg/other")
    with pytest.raises(PermissionError, match="allowed storage roots"):
        af.register("/etc", "pkg/escape")


# --- tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sql", "expression"])
def test_tables_equal_pyarrow_dataset(af, how):
    ds = af.artifact("sharded_parquet").open()
    expected = local_demo()
    assert ds.schema.names == expected.schema.names
    assert canonical(ds.to_table(), SORT).equals(canonical(expected, SORT))
    if how == "sql":
        where = "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05"
    else:
        where = pc.field("cell_type").isin(SEED_CELL_TYPES) & (pc.field("percent_mito") <= 0.05)
    local = expected.filter(pc.field("cell_type").isin(SEED_CELL_TYPES) & (pc.field("percent_mito") <= 0.05))
    got = ds.to_table(filter=where, columns=["cell_type", "n_genes", "percent_mito", "louvain"])
    assert got.column_names == ["cell_type", "n_genes", "percent_mito", "louvain"]
    assert canonical(got, SORT).equals(canonical(local.select(got.column_names), SORT))
    assert ds.count_rows(where) == local.num_rows
    assert ds.count_rows() == expected.num_rows
    assert ds.head(7).num_rows == 7
    assert ds.filter(where).select(["n_genes"]).to_table().num_rows == local.num_rows


def test_untranslatable_and_bad_filters_say_why(af):
    ds = af.artifact("sharded_parquet").open()
    with pytest.raises(ValueError, match="multiply"):
        ds.to_table(filter=pc.field("n_genes") * 2 > 10)
    with pytest.raises(ValueError, match="no_such_column"):
        ds.to_table(filter="no_such_column > 1")
    with pytest.raises(KeyError, match="no artifact or collection with key 'nope'"):
        af.artifact("nope")
    with pytest.raises(TypeError):
        ds.to_table(filter=3)


def test_batches_stream_every_row_in_bounded_shuffled_order(af):
    ds = af.collection("sharded_parquet_collection").open()
    whole = ds.to_table()
    epochs = []
    for seed in (1, 2):
        batches = list(ds.to_batches(batch_size=50, shuffle=seed, in_flight=1))
        assert all(b.num_rows == 50 for b in batches[:-1]) and 0 < batches[-1].num_rows <= 50
        table = pa.Table.from_batches(batches)
        by = ["n_genes", "percent_mito", "n_counts"]
        assert canonical(table, by).equals(canonical(whole, by))
        epochs.append(table.column("n_genes").to_pylist())
    shards = af.artifact("sharded_parquet").open()
    orders = {tuple(b.column("louvain")[0].as_py() for b in shards.to_batches(shuffle=s)) for s in range(4)}
    assert len(orders) > 1, "shuffle must change the order of shards between seeds"
    stopped = shards.to_batches(in_flight=2)
    next(stopped)
    stopped.close()  # a consumer that stops early leaves nothing running


def test_polars_pushes_filter_columns_and_limit_down(af):
    lf = af.artifact("sharded_parquet").open(engine="polars")
    local = pl.scan_parquet(str(DEMO / "**" / "*.parquet"), hive_partitioning=True)
    total = local.select(pl.len()).collect().item()

    af.stats.reset()
    got = lf.filter((pl.col("n_genes") > 1200) & pl.col("cell_type").is_in(SEED_CELL_TYPES)) \
        .select(["cell_type", "n_genes"]).collect()
    want = local.filter((pl.col("n_genes") > 1200) & pl.col("cell_type").cast(pl.String).is_in(SEED_CELL_TYPES)) \
        .select(["cell_type", "n_genes"]).collect()
    assert sorted(got.with_columns(pl.col("cell_type").cast(pl.String)).rows()) == \
        sorted(want.with_columns(pl.col("cell_type").cast(pl.String)).rows())
    assert af.stats.rows == got.height < total, af.stats  # the filter ran on the server

    af.stats.reset()
    head = lf.select(["n_genes"]).head(5).collect()
    assert head.height == 5 and head.columns == ["n_genes"]
    assert af.stats.rows == 5, af.stats  # the limit ran on the server

    af.stats.reset()
    odd = lf.filter(pl.col("cell_type").cast(pl.String).str.contains("Mono")).select(["n_genes"]).collect()
    want = local.filter(pl.col("cell_type").cast(pl.String).str.contains("Mono")).select(["n_genes"]).collect()
    assert sorted(odd["n_genes"].to_list()) == sorted(want["n_genes"].to_list())
    assert af.stats.rows == total  # untranslatable: applied here, on every row


# --- AnnData ---------------------------------------------------------------------------------------


def test_seed_accessor_workflow_on_the_demo(af):
    adata = af.artifact("pbmc68k.h5ad").open()
    assert adata.shape == (70, 765)
    obs_idx = adata.obs.cell_type.isin(["Dendritic cells", "CD14+ Monocytes"]) & (adata.obs.percent_mito <= 0.05)
    adata_subset = adata[obs_idx]
    assert adata_subset.shape == (35, 765)
    assert "AnnDataAccessorSubset object with n_obs × n_vars = 35 × 765" in repr(adata_subset)

    truth = ad.read_h5ad(DEMO_H5AD)
    want = truth[(truth.obs.cell_type.isin(["Dendritic cells", "CD14+ Monocytes"])
                  & (truth.obs.percent_mito <= 0.05)).to_numpy()].copy()
    np.testing.assert_array_equal(adata_subset.X, dense(want.X))
    memory = adata_subset.to_memory()
    assert isinstance(memory, ad.AnnData) and memory.shape == (35, 765)
    pd.testing.assert_frame_equal(memory.obs, want.obs, check_names=False)
    pd.testing.assert_frame_equal(memory.var, want.var, check_names=False)
    for name in want.obsm:
        np.testing.assert_array_equal(memory.obsm[name], want.obsm[name])
    for name in want.varm:
        np.testing.assert_array_equal(memory.varm[name], want.varm[name])
    for name in want.obsp:
        np.testing.assert_array_equal(dense(memory.obsp[name]), dense(want.obsp[name]))
    assert set(memory.uns) == set(want.uns)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_accessor_slices_equal_anndata(af, files, variant):
    key, path = files[variant]
    adata = af.artifact(key).open()
    truth = ad.read_h5ad(path) if str(path).endswith(".h5ad") else ad.read_zarr(path)
    assert adata.shape == truth.shape
    pd.testing.assert_index_equal(adata.obs_names, truth.obs_names)
    mask = (adata.obs.cell_type.isin(["Dendritic cells", "CD14+ Monocytes"]) & (adata.obs.percent_mito <= 0.05))
    want = truth[mask.to_numpy()].copy()
    view = adata[mask]
    x = view.X
    assert sp.issparse(x) == (variant[1] != "dense")
    if sp.issparse(x):
        assert isinstance(x, sp.csr_matrix)
    np.testing.assert_array_equal(dense(x), dense(want.X))
    np.testing.assert_array_equal(view.layers["counts"], dense(want.layers["counts"]))
    np.testing.assert_array_equal(view.obsm["X_pca"], want.obsm["X_pca"])
    np.testing.assert_array_equal(dense(view.obsp["connectivities"]), dense(want.obsp["connectivities"]))

    genes = ["GENE031", "GENE002", "GENE017"]
    rows = np.array([200, 3, 3, 57])  # unordered, repeated: anndata's integer indexing
    sub = adata[rows, genes]
    np.testing.assert_array_equal(dense(sub.X), dense(truth[rows, genes].X))
    np.testing.assert_array_equal(sub.varm["PCs"], truth[:, genes].varm["PCs"])
    chained = adata[mask][2:9][:, [True, False] * 20]
    np.testing.assert_array_equal(dense(chained.X), dense(want[2:9][:, [True, False] * 20].X))
    assert adata[np.zeros(adata.n_obs, dtype=bool)].X.shape == (0, adata.n_vars)

    memory = view.to_memory()
    pd.testing.assert_frame_equal(memory.obs, want.obs, check_names=False)
    pd.testing.assert_frame_equal(memory.var, want.var, check_names=False)
    np.testing.assert_array_equal(dense(memory.X), dense(backed(path)[mask.to_numpy()].X))


def test_accessor_asks_the_server_for_the_selected_rows_only(af, files):
    key, _ = files[("h5ad", "csr")]
    adata = af.artifact(key).open()
    _ = adata.obs, adata.var
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[[5, 6, 7, 100, 101, 230]] = True
    af.stats.reset()
    x = adata[mask].X
    assert x.shape[0] == 6
    assert af.stats.rows == 6, af.stats
    assert artiflight.AnnDataView  # the public name of a view


def test_positions_travel_as_runs():
    from artiflight._anndata import runs
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(0, 300))
        positions = np.flatnonzero(rng.random(n) < rng.random())
        spans = runs(positions)
        rebuilt = [p for start, stop in spans for p in range(start, stop)]
        assert rebuilt == positions.tolist()
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # apart: runs are maximal


def test_torch_iterable_dataset(af):
    torch = pytest.importorskip("torch")

    class Shards(torch.utils.data.IterableDataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __iter__(self):
            for batch in self.dataset.to_batches(columns=["n_genes"], batch_size=64, shuffle=0):
                yield torch.from_numpy(batch.column(0).to_numpy())

    total = sum(len(t) for t in torch.utils.data.DataLoader(
        Shards(af.artifact("sharded_parquet").open()), batch_size=None))
    assert total == 700


def test_example_script_runs(server):
    script = REPO / "python" / "examples" / "lamindb_workflows.py"
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "ARTIFLIGHT_SERVER": server.url})
    assert out.returncode == 0, out.stderr
    assert "AnnDataAccessorSubset object with n_obs × n_vars = 35 × 765" in out.stdout


def test_sparse_rows_become_csr_without_copying():
    from artiflight._anndata import _matrix_of
    offsets = pa.array([0, 2, 2, 5], pa.int32())
    indices = pa.ListArray.from_arrays(offsets, pa.array([1, 4, 0, 2, 3], pa.int32()))
    data = pa.ListArray.from_arrays(offsets, pa.array([1.5, 2.5, 3.5, 4.5, 5.5], pa.float32()))
    table = pa.table({"obs_names": ["a", "b", "c"], "indices": indices, "data": data})
    x = _matrix_of(table, 6)
    assert isinstance(x, sp.csr_matrix) and x.shape == (3, 6)
    np.testing.assert_array_equal(x.toarray()[2], [3.5, 0, 4.5, 5.5, 0, 0])
    values = np.frombuffer(data.values.buffers()[1], dtype=np.float32)
    assert np.shares_memory(x.data, values), "CSR data must be the Arrow buffer itself"
    sliced = _matrix_of(table.slice(1), 6)  # offsets not starting at 0
    np.testing.assert_array_equal(sliced.toarray(), x.toarray()[1:])
