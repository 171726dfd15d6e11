"""The command line against a running server, sharing its catalog from another process."""

import concurrent.futures
import json
import subprocess

import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

from conftest import DEMO, binary

TIMEOUT_S = 120


def cli(server, *args, check=True):
    result = subprocess.run(
        [binary(), "--data-dir", str(server.data_dir), *args],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=server.tmp,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_registers_next_to_a_running_server(server, client, tmp_path):
    # Outside the server's roots: the operator's own registration is trusted.
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "mine.parquet")
    record = json.loads(cli(server, "register", str(tmp_path / "mine.parquet"), "--key", "cli_mine").stdout)
    assert record["key"] == "cli_mine" and record["n_observations"] == 3
    keys = {i.descriptor.path[0].decode() for i in client.list_flights()}
    assert "cli_mine" in keys
    table = client.do_get(client.get_flight_info(flight.FlightDescriptor.for_path("cli_mine")).endpoints[0].ticket).read_all()
    assert table.column("x").to_pylist() == [1, 2, 3]


def test_two_processes_write_the_catalog_at_once(server, client, tmp_path):
    files = []
    for i in range(6):
        path = tmp_path / f"v{i}.parquet"
        pq.write_table(pa.table({"v": [i]}), path)
        files.append(path)

    def register(path):
        return cli(server, "register", str(path), "--key", "concurrent")

    def put(i):
        table = pa.table({"v": [100 + i]})
        c = server.client()
        writer, reader = c.do_put(flight.FlightDescriptor.for_path("concurrent_put"), table.schema)
        writer.write_table(table)
        writer.done_writing()
        reader.read()
        writer.close()
        c.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(register, f) for f in files] + [pool.submit(put, i) for i in range(6)]
        for job in jobs:
            job.result(timeout=TIMEOUT_S)
    for key in ("concurrent", "concurrent_put"):
        body = json.dumps({"key": key}).encode()
        versions = json.loads(next(iter(client.do_action(flight.Action("list_versions", body)))).body.to_pybytes())
        assert len(versions) == 6
        assert sorted(v["version"] for v in versions) == [1, 2, 3, 4, 5, 6]
        assert sum(v["is_latest"] for v in versions) == 1


def test_get_writes_files_equal_to_pyarrow(server, tmp_path):
    predicate = "louvain IN (2, 3) AND n_genes > 600"
    expected = ds.dataset(DEMO, format="parquet", partitioning="hive").to_table(
        filter=pc.field("louvain").isin([2, 3]) & (pc.field("n_genes") > 600),
        columns=["n_genes", "cell_type"],
    )
    for ext in ("parquet", "arrow", "csv"):
        out = tmp_path / f"out.{ext}"
        cli(server, "--server", server.url, "get", "sharded_parquet", "--filter", predicate,
            "--columns", "n_genes,cell_type", "--out", str(out))
        if ext == "parquet":
            got = pq.read_table(out)
        elif ext == "arrow":
            got = pa.ipc.open_file(out).read_all()
        else:
            got = pa.csv.read_csv(out)
        assert got.num_rows == expected.num_rows > 0
        assert sorted(got.column("n_genes").to_pylist()) == sorted(expected.column("n_genes").to_pylist())


def test_ls_show_and_errors(server):
    listing = cli(server, "ls").stdout
    assert "sharded_parquet" in listing and "sharded_parquet_collection" in listing
    shown = cli(server, "show", "sharded_parquet").stdout
    assert "11 sub-directories & 11 files with suffixes '.parquet'" in shown
    assert "└── louvain=9/" in shown
    missing = cli(server, "--server", server.url, "get", "no-such-key", check=False)
    assert missing.returncode != 0 and "no-such-key" in missing.stderr
    assert "panicked" not in missing.stderr


def test_get_takes_the_anndata_selectors_and_ls_a_key_prefix(server, tmp_path):
    import anndata as ad
    import numpy as np

    truth = ad.read_h5ad(server.data_dir / "demo" / "pbmc68k.h5ad")
    genes = ["TNFRSF4", "HES4"]
    out = tmp_path / "wide.parquet"
    cli(server, "get", "pbmc68k.h5ad", "--server", server.url, "--element", "X", "--var-names", ",".join(genes),
        "--obs-range", "10:25", "--layout", "wide", "--out", str(out))
    table = pq.read_table(out)
    assert table.column_names == ["obs_names", *genes]
    want = truth[10:25, genes]
    assert table.column("obs_names").to_pylist() == want.obs_names.tolist()
    got = np.column_stack([table.column(g).to_numpy() for g in genes])
    np.testing.assert_array_equal(got, np.asarray(want.X))

    out = tmp_path / "hv.parquet"
    cli(server, "get", "pbmc68k.h5ad", "--server", server.url, "--element", "X", "--var-filter", "highly_variable",
        "--layout", "sparse", "--out", str(out))
    sparse = pq.read_table(out)
    assert sparse.column_names == ["obs_names", "indices", "data"] and sparse.num_rows == truth.n_obs

    bad = cli(server, "get", "pbmc68k.h5ad", "--server", server.url, "--obs-range", "9:3", check=False)
    assert bad.returncode != 0 and "START is after STOP" in bad.stderr

    listed = cli(server, "ls", "--server", server.url, "--key-prefix", "sharded_parquet_shard").stdout
    keys = {line.split()[0] for line in listed.splitlines()[1:] if line.strip()}
    assert keys == {"sharded_parquet_shard1", "sharded_parquet_shard2"}
