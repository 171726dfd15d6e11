"""One true answer across versions, servers and deletes (SPEC section 10), through pyarrow.flight:
uids are never issued twice, a ticket plans the same on a server with other partitions, a
permanent delete waits for the streams reading the artifact, and CSC matrices stream in blocks."""

import json
import os
import time

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import scipy.sparse as sp

from conftest import Server


def put(client, key, table):
    writer, reader = client.do_put(flight.FlightDescriptor.for_path(key), table.schema)
    writer.write_table(table, max_chunksize=100_000)
    writer.done_writing()
    record = json.loads(reader.read().to_pybytes())
    writer.close()
    return record


def action(client, kind, **body):
    results = list(client.do_action(flight.Action(kind, json.dumps(body).encode())))
    return json.loads(results[0].body.to_pybytes()) if results else None


def first_chunk(reader):
    """The first batch of a stream as a table (empty if the stream has none)."""
    try:
        return pa.Table.from_batches([reader.read_chunk().data])
    except StopIteration:
        return reader.schema.empty_table()


def tickets(client, command):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command)))
    return info, [e.ticket for e in info.endpoints]


def test_uids_are_never_reused_after_a_permanent_delete(client):
    v1 = put(client, "reused", pa.table({"x": [1, 2, 3]}))
    v2 = put(client, "reused", pa.table({"x": [4, 5, 6]}))
    assert v2["uid"][:16] == v1["uid"][:16] and v2["version"] == v1["version"] + 1
    _, old = tickets(client, {"key": "reused", "version": v2["uid"]})
    action(client, "delete", key="reused", version=v2["uid"], permanent=True)
    v3 = put(client, "reused", pa.table({"x": [7, 8, 9]}))
    assert v3["uid"] != v2["uid"], "a deleted version's uid was issued again"
    assert v3["version"] == v2["version"] + 1
    # A ticket for the deleted version reads that version (its plan may still be held) or fails
    # with NOT_FOUND; never v3's rows.
    try:
        assert client.do_get(old[0]).read_all().column("x").to_pylist() == [4, 5, 6]
    except KeyError:
        pass
    with pytest.raises(KeyError):
        tickets(client, {"key": "reused", "version": v2["uid"]})
    assert client.do_get(tickets(client, {"key": "reused"})[1][0]).read_all().column("x").to_pylist() == [7, 8, 9]


def test_a_ticket_is_served_by_a_server_with_other_partitions(server, tmp_path):
    # A second server on the same data dir and catalog, with 7 target partitions of its own.
    other = Server(tmp_path, partitions=7, data_dir=server.data_dir)
    try:
        a, b = server.client(), other.client()
        for command in [{"key": "sharded_parquet"},
                        {"key": "sharded_parquet", "filter": "louvain IN (1, 2, 3)", "columns": ["n_genes"]},
                        {"key": "pbmc68k.h5ad", "element": ["X"]}]:
            info, issued = tickets(a, command)
            mine = [a.do_get(t).read_all() for t in issued]
            theirs = [b.do_get(t).read_all() for t in issued]
            assert [t.num_rows for t in mine] == [t.num_rows for t in theirs], command
            for x, y in zip(mine, theirs):
                assert x.equals(y), command
            # The other server's own plan has other partitions: the ticket, not the server, decides.
            own, _ = tickets(b, command)
            if command["key"] == "sharded_parquet" and "filter" not in command:
                assert len(own.endpoints) != len(info.endpoints)
    finally:
        other.stop()


def test_a_permanent_delete_waits_for_the_streams_reading_it(client, server):
    # Three row groups (uploads are written in groups of a million rows): two are read after the
    # delete.
    n = 3_000_000
    table = pa.table({"i": pa.array(np.arange(n)), "v": pa.array(np.arange(n) * 0.5)})
    record = put(client, "deleted_while_read", table)
    _, issued = tickets(client, {"key": "deleted_while_read"})
    readers = [client.do_get(t) for t in issued]
    firsts = [first_chunk(r) for r in readers]
    action(client, "delete", key="deleted_while_read", permanent=True)
    parts = []
    for first, reader in zip(firsts, readers):
        parts += [first, reader.read_all()]
    got = pa.concat_tables(parts)
    assert got.num_rows == n and got.column("i").to_pylist() == list(range(n))
    # Once the streams have ended, the files go (the server removes them off its async threads).
    path = record["path"].removeprefix("file://")
    for _ in range(100):
        if not os.path.exists(path):
            break
        time.sleep(0.05)
    assert not os.path.exists(path), "the deleted artifact's file stayed"


def test_csc_streams_in_several_endpoints_equal_to_anndata(client, server):
    rng = np.random.default_rng(11)
    n_obs, n_vars = 60_000, 300
    x = sp.random(n_obs, n_vars, density=0.05, format="csc", random_state=rng, dtype=np.float32)
    adata = ad.AnnData(X=x, obs={"n": np.arange(n_obs)})
    adata.obs_names = [f"c{i}" for i in range(n_obs)]
    adata.var_names = [f"g{i}" for i in range(n_vars)]
    path = server.files / "big_csc.h5ad"
    adata.write_h5ad(path)
    action(client, "register", path=str(path), key="big_csc.h5ad")
    info, issued = tickets(client, {"key": "big_csc.h5ad", "element": ["X"], "filter": "n % 3 = 0"})
    assert len(issued) > 1, "a large CSC selection is one endpoint"
    table = pa.concat_tables(client.do_get(t).read_all() for t in issued)
    indices, data = table.column("indices").combine_chunks(), table.column("data").combine_chunks()
    indptr = np.concatenate([[0], np.cumsum(indices.value_lengths().to_numpy(zero_copy_only=False))])
    got = sp.csr_matrix((data.flatten().to_numpy(), indices.flatten().to_numpy(), indptr),
                        shape=(table.num_rows, n_vars))
    want = x.tocsr()[np.arange(0, n_obs, 3)]
    assert (got != want).nnz == 0
