"""Interop: Flight SQL through the ADBC Flight SQL driver from PyPI (its DB-API), on the same port as
plain Flight. Every query runs as the same SQL text in DuckDB over the same files (parquet read by
DuckDB itself; AnnData elements as anndata reads them), and the answers must be equal.
"""

import json
import math

import adbc_driver_flightsql.dbapi as flight_sql
import anndata as ad
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pytest
import scipy.sparse as sp

from conftest import DEMO, REPO

PBMC = REPO / "demo" / "pbmc68k.h5ad"


@pytest.fixture(scope="module")
def conn(server):
    c = flight_sql.connect(server.url, autocommit=True)
    yield c
    c.close()


@pytest.fixture(scope="module")
def duck():
    """DuckDB with the same tables under the same names."""
    db = duckdb.connect()
    db.execute(
        "CREATE VIEW sharded_parquet AS SELECT * FROM "
        f"read_parquet('{DEMO}/**/*.parquet', hive_partitioning = true)"
    )
    adata = ad.read_h5ad(PBMC)
    obs = adata.obs.copy()
    obs.insert(0, "obs_names", obs.index.astype(str))
    var = adata.var.copy()
    var.insert(0, "var_names", var.index.astype(str))
    x = np.asarray(adata.X)
    rows, cols = np.indices(x.shape)
    long = pd.DataFrame({
        "obs_name": np.asarray(adata.obs_names)[rows.ravel()],
        "var_name": np.asarray(adata.var_names)[cols.ravel()],
        "value": x.ravel(),
    })
    for name, frame in [("obs", obs.reset_index(drop=True)), ("var", var.reset_index(drop=True)),
                        ("X", long)]:
        db.register(f"pbmc_{name}", frame)
        db.execute(f'CREATE TABLE "pbmc68k.h5ad/{name}" AS SELECT * FROM pbmc_{name}')
    yield db
    db.close()


def plain(table: pa.Table) -> list[tuple]:
    """Rows as sorted tuples, dictionaries decoded, so that two engines' answers compare."""
    columns = []
    for column in table.columns:
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        columns.append(column.to_pylist())
    rows = list(zip(*columns)) if columns else []
    return sorted(rows, key=lambda r: tuple((v is None, v) for v in r))


def same(ours: list[tuple], theirs: list[tuple]):
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    for a, b in zip(ours, theirs):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            if isinstance(x, float) or isinstance(y, float):
                assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-9), (a, b)
            else:
                assert x == y, (a, b)


def query(conn, sql: str, parameters=None) -> pa.Table:
    with conn.cursor() as cur:
        cur.execute(sql, parameters)
        return cur.fetch_arrow_table()


QUERIES = {
    "filter": "SELECT cell_type, n_genes, percent_mito FROM sharded_parquet "
              "WHERE cell_type IN ('CD19+ B', 'CD56+ NK') AND percent_mito <= 0.02",
    "aggregate": "SELECT louvain, count(*) AS n, sum(n_genes) AS genes, avg(n_counts) AS counts "
                 "FROM sharded_parquet GROUP BY louvain",
    "window": "SELECT \"index\", louvain, rank() OVER (PARTITION BY louvain ORDER BY n_genes DESC, "
              "\"index\") AS r FROM sharded_parquet",
    "self join": "SELECT a.louvain, count(*) AS pairs FROM sharded_parquet a JOIN sharded_parquet b "
                 "ON a.cell_type = b.cell_type AND a.louvain = b.louvain WHERE a.n_genes > b.n_genes "
                 "GROUP BY a.louvain",
    "anndata obs": 'SELECT obs_names, cell_type, n_genes FROM "pbmc68k.h5ad/obs" '
                   "WHERE cell_type = 'Dendritic cells' OR percent_mito > 0.05",
    "anndata join": 'SELECT o.cell_type, count(*) AS n, avg(x.value) AS mean FROM "pbmc68k.h5ad/X" x '
                    'JOIN "pbmc68k.h5ad/obs" o ON x.obs_name = o.obs_names '
                    "WHERE x.var_name IN ('HES4', 'SSU72') GROUP BY o.cell_type",
    "anndata var": 'SELECT var_names FROM "pbmc68k.h5ad/var" ORDER BY var_names LIMIT 5',
}


@pytest.mark.parametrize("name", list(QUERIES))
def test_queries_equal_duckdb(conn, duck, name):
    sql = QUERIES[name]
    ours = plain(query(conn, sql))
    theirs = plain(duck.sql(sql).to_arrow_table())
    assert ours, "the query selects nothing: it would prove nothing"
    same(ours, theirs)


def test_prepared_statement_with_bound_parameters(conn, duck):
    sql = "SELECT count(*) AS n, sum(n_genes) AS g FROM sharded_parquet WHERE louvain = ? AND n_genes > ?"
    with conn.cursor() as cur:
        for louvain, genes in [(3, 500), (0, 900), (10, 0)]:
            cur.execute(sql, (louvain, genes))
            ours = plain(cur.fetch_arrow_table())
            theirs = sorted(duck.execute(sql, [louvain, genes]).fetchall())
            same(ours, theirs)
            assert ours[0][0] > 0


def test_results_split_into_partitions(conn, duck):
    sql = "SELECT \"index\", n_genes FROM sharded_parquet WHERE n_genes > 700"
    with conn.cursor() as cur:
        partitions, schema = cur.adbc_execute_partitions(sql)
        assert len(partitions) > 1, "a scan of 11 shards should give several endpoints"
        tables = []
        for partition in partitions:
            cur.adbc_read_partition(partition)
            tables.append(cur.fetch_arrow_table())
    ours = plain(pa.concat_tables(tables))
    same(ours, plain(duck.sql(sql).to_arrow_table()))
    assert schema.names == ["index", "n_genes"]


def test_get_objects_and_table_schema(conn):
    objects = conn.adbc_get_objects(depth="all", catalog_filter="artiflight").read_all().to_pylist()
    assert [c["catalog_name"] for c in objects] == ["artiflight"]
    schemas = objects[0]["catalog_db_schemas"]
    assert [s["db_schema_name"] for s in schemas] == ["public"]
    tables = {t["table_name"]: t for t in schemas[0]["db_schema_tables"]}
    for name in ["sharded_parquet", "pbmc68k.h5ad/obs", "pbmc68k.h5ad/var", "pbmc68k.h5ad/X",
                 "pbmc68k.zarr/obs"]:
        assert name in tables, sorted(tables)
        assert tables[name]["table_type"] == "TABLE"
    columns = [c["column_name"] for c in tables["sharded_parquet"]["table_columns"]]
    expected = ds.dataset(DEMO, format="parquet", partitioning="hive").schema
    assert columns == expected.names
    assert [c["column_name"] for c in tables["pbmc68k.h5ad/X"]["table_columns"]] == [
        "obs_name", "var_name", "value"]

    schema = conn.adbc_get_table_schema("sharded_parquet")
    assert schema.names == expected.names
    for field in expected:
        theirs = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        ours = schema.field(field.name).type
        ours = ours.value_type if pa.types.is_dictionary(ours) else ours
        assert ours == theirs or (field.name == "louvain" and pa.types.is_integer(ours)), field

    assert conn.adbc_get_table_types() == ["TABLE"]
    info = conn.adbc_get_info()
    assert info["vendor_name"] == "artiflight"


def test_pandas_reads_through_adbc(conn):
    frame = pd.read_sql('SELECT * FROM "pbmc68k.h5ad/obs"', conn)
    adata = ad.read_h5ad(PBMC)
    assert list(frame["obs_names"]) == list(adata.obs_names)
    assert list(frame["cell_type"].astype(str)) == list(adata.obs["cell_type"].astype(str))
    np.testing.assert_allclose(frame["percent_mito"], adata.obs["percent_mito"], rtol=1e-6)


def test_sparse_x_in_long_form_lists_nonzeros(server, conn):
    rng = np.random.default_rng(3)
    dense = rng.random((50, 12), dtype=np.float32)
    dense[dense < 0.8] = 0
    adata = ad.AnnData(sp.csr_matrix(dense))
    adata.obs_names = [f"c{i}" for i in range(50)]
    adata.var_names = [f"g{j}" for j in range(12)]
    path = server.files / "sparse_sql.h5ad"
    adata.write_h5ad(path)
    client = server.client()
    list(client.do_action(flight.Action("register", json.dumps(
        {"path": str(path), "key": "sparse_sql.h5ad"}).encode())))
    client.close()
    table = query(conn, 'SELECT obs_name, var_name, value FROM "sparse_sql.h5ad/X"')
    rows, cols = np.nonzero(dense)
    expected = sorted(zip([f"c{i}" for i in rows], [f"g{j}" for j in cols],
                          dense[rows, cols].tolist()))
    same(plain(table), expected)


def test_spatialdata_table_by_path(conn):
    table = query(conn, 'SELECT count(*) AS n FROM "blobs.zarr/tables/table/obs" WHERE clone = \'diploid\'')
    assert table.column("n")[0].as_py() > 0


def test_refused_writes_leave_the_connection_working(conn):
    for sql in ["INSERT INTO sharded_parquet VALUES (1)", "DROP TABLE sharded_parquet",
                "CREATE TABLE t AS SELECT 1"]:
        with conn.cursor() as cur:
            with pytest.raises(Exception, match="read-only") as raised:
                cur.execute(sql)
            assert "PERMISSION_DENIED" in str(raised.value) or "UNAUTHORIZED" in str(raised.value)
    assert query(conn, "SELECT count(*) AS n FROM sharded_parquet").column("n")[0].as_py() == 700


def test_user_errors_name_the_column_or_table(conn):
    with conn.cursor() as cur:
        with pytest.raises(Exception, match="nope") as raised:
            cur.execute("SELECT nope FROM sharded_parquet")
        assert "INVALID_ARGUMENT" in str(raised.value)
        with pytest.raises(Exception, match="no_such_table") as raised:
            cur.execute("SELECT * FROM no_such_table")
        assert "INVALID_ARGUMENT" in str(raised.value)
        with pytest.raises(Exception, match="holds arrays"):
            cur.execute('SELECT * FROM "pbmc68k.h5ad"')
    assert pc.sum(query(conn, "SELECT 1 AS one").column("one")).as_py() == 1
