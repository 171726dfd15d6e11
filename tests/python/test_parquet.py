"""Interop: pyarrow.flight against artiflight, checked with pyarrow.dataset and DuckDB."""

import json
import shutil

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import DEMO


def cmd(**fields) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(fields))


def read_all(client, descriptor):
    info = client.get_flight_info(descriptor)
    tables = [client.do_get(e.ticket).read_all() for e in info.endpoints]
    return info, pa.concat_tables(tables) if tables else info.schema.empty_table()


def demo_dataset():
    return ds.dataset(DEMO, format="parquet", partitioning="hive")


def duck(filter_sql: str, columns: str = "*"):
    con = duckdb.connect()
    glob = str(DEMO / "**" / "*.parquet")
    return con.sql(
        f"SELECT {columns} FROM read_parquet('{glob}', hive_partitioning = true) WHERE {filter_sql}"
    ).arrow().read_all()


def sort_table(table: pa.Table, keys):
    return table.sort_by([(k, "ascending") for k in keys])


def test_lists_the_demo(client):
    infos = list(client.list_flights())
    keys = [i.descriptor.path[0].decode() for i in infos]
    assert "sharded_parquet" in keys and "sharded_parquet_collection" in keys
    parquet_only = list(client.list_flights(json.dumps({"suffix": ".parquet"}).encode()))
    assert {"sharded_parquet_shard1", "sharded_parquet_shard2"} <= {
        i.descriptor.path[0].decode() for i in parquet_only}
    assert all(json.loads(i.app_metadata)["suffix"] == ".parquet" for i in parquet_only)
    assert "sharded_parquet" not in {i.descriptor.path[0].decode() for i in parquet_only}


def test_every_endpoint_equals_pyarrow_dataset(client):
    info, ours = read_all(client, flight.FlightDescriptor.for_path("sharded_parquet"))
    theirs = demo_dataset().to_table()
    assert info.total_records == theirs.num_rows
    assert ours.schema.names == theirs.schema.names
    assert ours.schema.field("louvain").type == theirs.schema.field("louvain").type == pa.int32()
    # Same rows in the same order (both read the shards in path order), same pandas frame.
    assert ours.to_pandas().equals(theirs.to_pandas())
    assert ours.schema.metadata.get(b"pandas") is not None


def test_the_docs_predicate_selects_like_duckdb(client):
    predicate = "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05"
    _, ours = read_all(client, cmd(key="sharded_parquet", filter=predicate, columns=["n_genes", "percent_mito"]))
    theirs = duck(predicate, "n_genes, percent_mito")
    assert ours.num_rows == theirs.num_rows > 0
    keys = ["n_genes", "percent_mito"]
    assert sort_table(ours, keys).to_pydict() == sort_table(theirs, keys).to_pydict()


@pytest.mark.parametrize("predicate", [
    "louvain = 3",
    "louvain = '3'",
    "louvain IN (0, 10) AND n_genes > 700",
    "phase = 'G2M' OR percent_mito > 0.03",
    "n_counts BETWEEN 2000 AND 2500",
])
def test_filters_equal_duckdb(client, predicate):
    columns = ["n_genes", "n_counts", "louvain"]
    _, ours = read_all(client, cmd(key="sharded_parquet", filter=predicate, columns=columns))
    theirs = duck(predicate.replace("'3'", "3"), ", ".join(columns))
    assert ours.num_rows == theirs.num_rows > 0
    ours = ours.set_column(2, "louvain", pc.cast(ours["louvain"], pa.int64()))
    theirs = theirs.set_column(2, "louvain", pc.cast(theirs["louvain"], pa.int64()))
    assert sort_table(ours, columns).to_pydict() == sort_table(theirs, columns).to_pydict()


def test_projection_and_limit(client):
    info, ours = read_all(client, cmd(key="sharded_parquet", columns=["percent_mito", "cell_type"], limit=9))
    assert ours.schema.names == ["percent_mito", "cell_type"]
    assert ours.num_rows == 9
    every = demo_dataset().to_table(columns=["percent_mito", "cell_type"]).to_pylist()
    for row in ours.to_pylist():
        assert row in every


def test_collection_and_query_set(client):
    _, ours = read_all(client, flight.FlightDescriptor.for_path("sharded_parquet_collection"))
    shards = [pq.read_table(next((DEMO / f"louvain={n}").glob("*.parquet"))) for n in (0, 1)]
    expected = pa.concat_tables(shards)
    assert ours.to_pandas().equals(expected.to_pandas())
    _, query = read_all(client, cmd(query={"key_prefix": "sharded_parquet_shard"}))
    assert query.to_pandas().equals(expected.to_pandas())


def test_doput_round_trip(client):
    table = pa.table({
        "gene": pa.array(["CD3E", "MS4A1", None]),
        "score": pa.array([1.5, -2.0, 0.25]),
        "count": pa.array([1, None, 3], pa.int64()),
    })
    descriptor = flight.FlightDescriptor.for_path("uploaded")
    writer, reader = client.do_put(descriptor, table.schema)
    writer.write_table(table)
    writer.done_writing()
    record = json.loads(reader.read().to_pybytes())
    writer.close()
    assert record["key"] == "uploaded" and record["n_observations"] == 3
    _, back = read_all(client, descriptor)
    assert back.equals(table)


def register(client, path, key):
    body = json.dumps({"path": str(path), "key": key}).encode()
    return json.loads(next(iter(client.do_action(flight.Action("register", body)))).body.to_pybytes())


def test_register_through_the_server(client, server):
    copy = server.files / "sharded_parquet"
    # Identical content is the same artifact, whatever the key.
    same = register(client, copy, "registered")
    assert same["key"] == "sharded_parquet" and same["n_files"] == 11
    # Different content (one shard fewer) is a new artifact.
    shutil.rmtree(copy / "louvain=10")
    record = register(client, copy, "registered")
    assert record["key"] == "registered" and record["n_files"] == 10 and record["suffix"] == ""
    _, ours = read_all(client, flight.FlightDescriptor.for_path("registered"))
    expected = ds.dataset(copy, format="parquet", partitioning="hive").to_table()
    assert ours.to_pandas().equals(expected.to_pandas())


@pytest.mark.parametrize("descriptor, exception", [
    (flight.FlightDescriptor.for_path("no-such-key"), KeyError),
    (cmd(key="sharded_parquet", filter="nope > 1"), pa.ArrowInvalid),
    (cmd(key="sharded_parquet", filter="n_genes >"), pa.ArrowInvalid),
    (cmd(key="sharded_parquet", colums=["x"]), pa.ArrowInvalid),
    (flight.FlightDescriptor.for_command(b"\xff not json"), pa.ArrowInvalid),
])
def test_errors_reach_pyarrow_as_the_right_class(client, descriptor, exception):
    with pytest.raises(exception):
        client.get_flight_info(descriptor)


def test_permission_denied_is_unauthorized(client, tmp_path):
    pq.write_table(pa.table({"a": [1]}), tmp_path / "outside.parquet")
    body = json.dumps({"path": str(tmp_path / "outside.parquet"), "key": "outside"}).encode()
    with pytest.raises(flight.FlightUnauthorizedError):
        list(client.do_action(flight.Action("register", body)))


def test_unknown_action_is_invalid(client):
    with pytest.raises(pa.ArrowInvalid, match="frobnicate"):
        list(client.do_action(flight.Action("frobnicate", b"{}")))


def test_null_partitions_read_as_pyarrow_reads_them(server, client):
    # pyarrow writes a null partition value as `key=__HIVE_DEFAULT_PARTITION__`.
    folder = server.files / "null_partitions"
    table = pa.table({
        "n": pa.array([1, 2, None, 4, None], pa.int32()),
        "s": pa.array(["a", None, "b", "a", None]),
        "v": pa.array([0.5, 1.5, 2.5, 3.5, 4.5]),
    })
    ds.write_dataset(table, folder, format="parquet", partitioning=["n", "s"], partitioning_flavor="hive")
    body = json.dumps({"path": str(folder), "key": "null_partitions"}).encode()
    record = json.loads(next(iter(client.do_action(flight.Action("register", body)))).body.to_pybytes())
    assert record["n_observations"] == 5
    expected = ds.dataset(folder, format="parquet", partitioning="hive")
    _, got = read_all(client, flight.FlightDescriptor.for_path("null_partitions"))
    want = expected.to_table()
    assert got.schema.field("n").type == want.schema.field("n").type == pa.int32()
    assert got.schema.field("s").type == pa.string()
    assert sort_table(got.select(["v", "n", "s"]), ["v"]).equals(
        sort_table(want.select(["v", "n", "s"]).cast(got.select(["v", "n", "s"]).schema), ["v"]))
    for predicate, arrow_filter in [
        ("n IS NULL", pc.field("n").is_null()),
        ("s IS NULL AND n = 2", pc.field("s").is_null() & (pc.field("n") == 2)),
        ("n > 1", pc.field("n") > 1),
    ]:
        _, got = read_all(client, cmd(key="null_partitions", filter=predicate, columns=["v"]))
        want = expected.to_table(filter=arrow_filter, columns=["v"])
        assert sorted(got.column("v").to_pylist()) == sorted(want.column("v").to_pylist()), predicate
