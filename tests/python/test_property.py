"""One true answer: random selections, drawn by a seeded generator, must be answered by every
storage of pbmc68k (dense, CSR and CSC; h5ad, zarr v2 and v3) exactly as anndata answers
`adata[rows, vars]` on the same file, in every layout; and `SELECT count(*)` must equal the rows
of `SELECT *` for every SQL table.

The size is bounded for CI (ARTIFLIGHT_PROPERTY_CASES, default 30 per storage); the README gives
the command for a larger run. A failure names the seed and the request, so it can be replayed with
ARTIFLIGHT_PROPERTY_SEED.
"""

import json
import os
import random

import adbc_driver_flightsql.dbapi as flight_sql
import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import scipy.sparse as sp

from conftest import REPO

PBMC = REPO / "demo" / "pbmc68k.h5ad"
CASES = int(os.environ.get("ARTIFLIGHT_PROPERTY_CASES", "30"))
SEED = int(os.environ.get("ARTIFLIGHT_PROPERTY_SEED", "20261202"))

# (how it is written, how X is stored)
STORAGES = [
    ("h5ad", "dense"),
    ("h5ad", "csr"),
    ("h5ad", "csc"),
    ("h5ad_gzip", "dense"),
    ("zarr2", "dense"),
    ("zarr2", "csr"),
    ("zarr3", "dense"),
    ("zarr3", "csc"),
]

# SQL filters on obs, each with the pandas mask it means.
OBS_FILTERS = [
    ("cell_type IN ('Dendritic cells', 'CD14+ Monocytes')",
     lambda o: o.cell_type.isin(["Dendritic cells", "CD14+ Monocytes"])),
    ("percent_mito <= 0.015", lambda o: o.percent_mito <= np.float32(0.015)),
    ("n_genes > 1200 AND percent_mito < 0.02", lambda o: (o.n_genes > 1200) & (o.percent_mito < np.float32(0.02))),
    ("louvain = '3'", lambda o: o.louvain == "3"),
    ("cell_type = 'no such type'", lambda o: o.cell_type == "no such type"),
]
VAR_FILTERS = [
    ("highly_variable", lambda v: v.highly_variable),
    ("NOT highly_variable AND n_counts > 2000", lambda v: ~v.highly_variable & (v.n_counts > np.float32(2000))),
    ("n_counts < 100", lambda v: v.n_counts < np.float32(100)),
    ("var_names = 'no such gene'", lambda v: v.index == "no such gene"),
]


def write(adata, path, how, x_kind):
    adata = adata.copy()
    x = np.asarray(adata.X)
    adata.X = {"dense": x, "csr": sp.csr_matrix(x), "csc": sp.csc_matrix(x)}[x_kind]
    if how == "h5ad":
        adata.write_h5ad(path)
    elif how == "h5ad_gzip":
        adata.write_h5ad(path, compression="gzip")
    else:
        with ad.settings.override(zarr_write_format=2 if how == "zarr2" else 3):
            # Chunks across both axes, so column selections cross chunk edges too.
            adata.write_zarr(path, chunks=(16, 128))


@pytest.fixture(scope="module")
def storages(server):
    """Every storage of pbmc68k, registered; {storage: (key, anndata of that file in memory)}."""
    source = ad.read_h5ad(PBMC)
    client = server.client()
    out = {}
    for how, x_kind in STORAGES:
        suffix = ".h5ad" if how.startswith("h5ad") else ".zarr"
        key = f"prop_{how}_{x_kind}{suffix}"
        path = server.files / key
        write(source, path, how, x_kind)
        body = json.dumps({"path": str(path), "key": key}).encode()
        list(client.do_action(flight.Action("register", body)))
        adata = ad.read_h5ad(path) if suffix == ".h5ad" else ad.read_zarr(path)
        out[(how, x_kind)] = (key, adata)
    client.close()
    return out


def draw(rng, adata):
    """A random request on pbmc68k (without its key)."""
    names = adata.var_names.tolist()
    command = {}
    element = rng.choices(["X", "varm", "obsm", "obsp"], weights=[7, 1, 1, 1])[0]
    command["element"] = {"X": ["X"], "varm": ["varm", "PCs"], "obsm": ["obsm", "X_pca"],
                          "obsp": ["obsp", "connectivities"]}[element]
    if element != "varm":
        if rng.random() < 0.3:
            a, b = sorted(rng.choices(range(adata.n_obs + 1), k=2))
            command["obs_range"] = [a, b]
        if rng.random() < 0.6:
            command["filter"] = rng.randrange(len(OBS_FILTERS))
    if element in ("X", "varm"):
        r = rng.random()
        if r < 0.15:
            command["var_names"] = []
        elif r < 0.5:
            # Repeats and any order, as adata[:, names] takes them.
            command["var_names"] = rng.choices(names, k=rng.randint(1, 12))
        elif r < 0.7:
            command["var_filter"] = rng.randrange(len(VAR_FILTERS))
    if element == "X":
        command["layout"] = rng.choice([None, "dense", "sparse", "wide"])
        if rng.random() < 0.3:
            command["columns"] = rng.sample(["cell_type", "n_genes", "louvain"], k=rng.randint(1, 2))
    if rng.random() < 0.2:
        command["limit"] = rng.randint(0, 40)
    return {k: v for k, v in command.items() if v is not None}


def as_json(command):
    """The wire command: filters by their SQL text."""
    out = dict(command)
    if "filter" in out:
        out["filter"] = OBS_FILTERS[out["filter"]][0]
    if "var_filter" in out:
        out["var_filter"] = VAR_FILTERS[out["var_filter"]][0]
    return out


def expect(adata, command):
    """(obs positions, var positions) anndata selects, or the error the server must give."""
    rows = np.arange(adata.n_obs)
    if "obs_range" in command:
        a, b = command["obs_range"]
        rows = rows[a:b]
    if "filter" in command:
        mask = np.asarray(OBS_FILTERS[command["filter"]][1](adata.obs))
        rows = rows[mask[rows]]
    cols = np.arange(adata.n_vars)
    if "var_filter" in command:
        cols = cols[np.asarray(VAR_FILTERS[command["var_filter"]][1](adata.var))]
    if "var_names" in command:
        position = {name: i for i, name in enumerate(adata.var_names[cols])}
        missing = [n for n in command["var_names"] if n not in position]
        if missing:
            return KeyError
        cols = cols[[position[n] for n in command["var_names"]]].astype(np.int64)
    layout = command.get("layout")
    if layout == "wide" and len(set(adata.var_names[cols])) != len(cols):
        return pa.ArrowInvalid
    return rows, cols


def fetch(client, command):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command)))
    tables = [client.do_get(e.ticket).read_all() for e in info.endpoints]
    for t in tables:
        assert t.schema == info.schema, "a stream's schema differs from GetFlightInfo's"
    return info, pa.concat_tables(tables) if tables else info.schema.empty_table()


def dense_x(table, layout, var_names, n_cols):
    n = table.num_rows
    if layout == "dense":
        return table.column("X").combine_chunks().flatten().to_numpy().reshape(n, n_cols)
    if layout == "wide":
        if n_cols == 0:
            return np.zeros((n, 0), dtype=np.float32)
        return np.column_stack([table.column(name).to_numpy() for name in dict.fromkeys(var_names)])
    indices = table.column("indices").combine_chunks()
    data = table.column("data").combine_chunks()
    assert indices.value_lengths().to_pylist() == data.value_lengths().to_pylist()
    indptr = np.concatenate([[0], np.cumsum(indices.value_lengths().to_numpy(zero_copy_only=False))])
    return sp.csr_matrix((data.flatten().to_numpy(), indices.flatten().to_numpy(), indptr),
                         shape=(n, n_cols)).toarray()


def check(client, key, adata, command, x_kind):
    where = f"seed {SEED}, {x_kind} {key}: {json.dumps(as_json(command))}"
    wire = {"key": key, **as_json(command)}
    want = expect(adata, command)
    if isinstance(want, type):
        with pytest.raises(want):
            fetch(client, wire)
        return
    rows, cols = want
    info, table = fetch(client, wire)
    limit = command.get("limit")
    shown = rows if limit is None else rows[:limit]
    element = command["element"][0]
    if element == "varm":
        shown_vars = cols if limit is None else cols[:limit]
        assert table.column("var_names").to_pylist() == adata.var_names[shown_vars].tolist(), where
        k = adata.varm["PCs"].shape[1]
        values = table.column("values").combine_chunks().flatten().to_numpy().reshape(len(shown_vars), k)
        np.testing.assert_array_equal(values, adata.varm["PCs"][shown_vars], err_msg=where)
        return
    if element == "obsm":
        assert table.column("obs_names").to_pylist() == adata.obs_names[shown].tolist(), where
        k = adata.obsm["X_pca"].shape[1]
        values = table.column("values").combine_chunks().flatten().to_numpy().reshape(len(shown), k)
        np.testing.assert_array_equal(values, adata.obsm["X_pca"][shown], err_msg=where)
        return
    if element == "obsp":
        n = len(rows)
        want_p = sp.csr_matrix(adata.obsp["connectivities"])[rows][:, rows].toarray()
        got = np.zeros((n, n))
        r, c, v = (table.column(k).to_numpy() for k in ("row", "col", "value"))
        got[r, c] = v
        if limit is None:
            np.testing.assert_array_equal(got, want_p, err_msg=where)
        else:
            assert table.num_rows == min(limit, int(np.count_nonzero(want_p))), where
        return
    var_names = adata.var_names[cols].tolist()
    layout = command.get("layout") or ("dense" if x_kind == "dense" else "sparse")
    assert json.loads(info.schema.metadata[b"artiflight:shape"]) == [len(rows), len(cols)], where
    assert json.loads(info.schema.metadata[b"artiflight:var_names"]) == var_names, where
    assert table.column("obs_names").to_pylist() == adata.obs_names[shown].tolist(), where
    for name in command.get("columns", []):
        assert table.column(name).to_pylist() == adata.obs[name].iloc[shown].tolist(), where
    x = adata.X if not sp.issparse(adata.X) else adata.X.toarray()
    want_x = np.asarray(x)[np.ix_(shown, cols)]
    got = dense_x(table, layout, var_names, len(cols))
    assert got.shape == want_x.shape, where
    np.testing.assert_array_equal(got, want_x, err_msg=where)


@pytest.mark.parametrize("storage", STORAGES, ids=lambda s: f"{s[0]}-{s[1]}")
def test_random_selections_equal_anndata(client, storages, storage):
    key, adata = storages[storage]
    # The same requests for every storage: a storage that answers differently fails here.
    rng = random.Random(SEED)
    for _ in range(CASES):
        check(client, key, adata, draw(rng, adata), storage[1])


def test_the_edges_every_storage_must_agree_on(client, storages):
    gene0, gene1 = storages[STORAGES[0]][1].var_names[:2]
    edges = [
        # A name twice repeats its column; the sparse storages lost the first copy.
        {"element": ["X"], "var_names": [gene0, gene1, gene0], "obs_range": [0, 10], "layout": "dense"},
        {"element": ["X"], "var_names": [gene0, gene1, gene0], "obs_range": [0, 10], "layout": "sparse"},
        # Empty selections have zero width, or zero rows.
        {"element": ["X"], "var_names": [], "obs_range": [0, 5]},
        {"element": ["X"], "var_names": [], "obs_range": [0, 5], "layout": "sparse"},
        {"element": ["X"], "var_filter": 3, "obs_range": [0, 5], "layout": "wide"},
        {"element": ["X"], "obs_range": [7, 7]},
        {"element": ["X"], "filter": 4},
        # varm by var names, in the order given, repeats included.
        {"element": ["varm", "PCs"], "var_names": [gene1, gene0, gene1]},
        # The first and last gene only.
        {"element": ["X"], "var_names": [str(storages[STORAGES[0]][1].var_names[-1]), gene0]},
    ]
    for storage in STORAGES:
        key, adata = storages[storage]
        for command in edges:
            check(client, key, adata, command, storage[1])


def test_sql_count_equals_the_rows_of_a_full_read(server, storages):
    with flight_sql.connect(server.url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        # This module's storages and the demo's (other modules register deliberately broken files).
        tables = [row[0] for row in cur.fetchall()
                  if row[0].startswith(("prop_", "pbmc68k", "sharded_parquet"))]
        assert any(t.endswith(".h5ad/X") for t in tables)
        for table in tables:
            cur.execute(f'SELECT count(*) FROM "{table}"')
            (count,) = cur.fetchone()
            cur.execute(f'SELECT * FROM "{table}"')
            rows = cur.fetch_arrow_table().num_rows
            assert count == rows, table
        # The stored values of CSR X, not n_obs.
        key = storages[("h5ad", "csr")][0]
        cur.execute(f'SELECT count(*) FROM "{key}/X"')
        assert cur.fetchone()[0] == sp.csr_matrix(storages[("h5ad", "csr")][1].X).nnz
