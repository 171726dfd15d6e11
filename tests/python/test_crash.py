"""kill -9 during DoPut and during register: after a restart the catalog is consistent, crashed
uploads are swept, and every earlier artifact reads back identical."""

import json
import pathlib
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

from conftest import Server

TIMEOUT_S = 60


def read(client, key):
    info = client.get_flight_info(flight.FlightDescriptor.for_path(key))
    return pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints])


def put(client, key, table):
    writer, reader = client.do_put(flight.FlightDescriptor.for_path(key), table.schema)
    writer.write_table(table)
    writer.done_writing()
    record = json.loads(reader.read().to_pybytes())
    writer.close()
    return record


def records(client):
    return {i.descriptor.path[0].decode(): json.loads(i.app_metadata) for i in client.list_flights()}


def managed_files(data_dir: pathlib.Path):
    return sorted(p.name for p in (data_dir / "objects").iterdir() if not p.name.endswith(".lock"))


def check_consistent(server, before):
    """The catalog is intact, managed storage holds exactly what records name, and every earlier
    artifact reads back as it was."""
    db = sqlite3.connect(f"file:{server.data_dir / 'catalog.sqlite'}?mode=ro", uri=True)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    client = server.client()
    now = records(client)
    for key, table in before.items():
        assert read(client, key).equals(table), key
    named = set()
    for record in now.values():
        path = urllib.parse.urlparse(record.get("path", ""))
        if record.get("managed"):
            named.add(pathlib.Path(urllib.request.url2pathname(path.path.rstrip("/"))).name)
    assert set(managed_files(server.data_dir)) == named, "managed storage differs from the catalog"
    client.close()
    return now


def earlier_artifacts(client, files):
    tables = {"sharded_parquet": read(client, "sharded_parquet")}
    for i in range(2):
        table = pa.table({"n": list(range(i * 10, i * 10 + 10)), "s": [f"r{j}" for j in range(10)]})
        put(client, f"kept{i}", table)
        tables[f"kept{i}"] = read(client, f"kept{i}")
    return tables


def test_kill_during_do_put(tmp_path):
    s = Server(tmp_path)
    client = s.client()
    before = earlier_artifacts(client, s.files)
    objects = s.data_dir / "objects"

    def endless_upload():
        batch = pa.record_batch({"n": pa.array(range(50_000)), "s": pa.array(["x" * 20] * 50_000)})
        try:
            writer, _ = client.do_put(flight.FlightDescriptor.for_path("crashed"), batch.schema)
            for _ in range(2_000):
                writer.write_batch(batch)
                time.sleep(0.01)
        except Exception:  # noqa: BLE001 (the server is killed under it)
            pass

    thread = threading.Thread(target=endless_upload, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not any(p.name.startswith(".upload-") for p in objects.iterdir()):
        assert time.monotonic() < deadline, "the upload never started"
        time.sleep(0.05)
    time.sleep(0.3)
    s.proc.kill()
    s.proc.wait(timeout=TIMEOUT_S)
    thread.join(TIMEOUT_S)
    assert any(p.name.startswith(".upload-") for p in objects.iterdir())
    # A kill between a finished upload's rename and its catalog commit leaves a complete file that
    # no record names: the sweep removes it too.
    (objects / "AAAAAAAAAAAAAAAAAAAAAA.parquet").write_bytes(b"PAR1 orphan PAR1")

    again = Server(tmp_path)
    try:
        now = check_consistent(again, before)
        assert "crashed" not in now
        assert not any(p.name.startswith(".upload-") for p in objects.iterdir())
        # And the server takes uploads again.
        c = again.client()
        put(c, "after", pa.table({"n": [1]}))
        assert read(c, "after").num_rows == 1
        c.close()
    finally:
        again.stop()


def test_kill_during_register(tmp_path):
    s = Server(tmp_path)
    client = s.client()
    before = earlier_artifacts(client, s.files)
    client.close()
    folder = s.files / "many"
    table = pa.table({"id": pa.array(range(20_000), pa.int64()), "v": pa.array([0.5] * 20_000)})
    for part in range(150):
        (folder / f"part={part}").mkdir(parents=True)
        pq.write_table(table, folder / f"part={part}" / "data.parquet")
    expected = ds.dataset(folder, format="parquet", partitioning="hive").to_table()

    # Kills at several moments of registration (listing, inspecting, hashing, committing).
    server = s
    for delay in (0.05, 0.2, 0.5, 1.0):
        c = server.client()

        def register():
            body = json.dumps({"path": str(folder), "key": "many"}).encode()
            try:
                list(c.do_action(flight.Action("register", body)))
            except Exception:  # noqa: BLE001 (the server is killed under it)
                pass

        thread = threading.Thread(target=register, daemon=True)
        thread.start()
        time.sleep(delay)
        server.proc.kill()
        server.proc.wait(timeout=TIMEOUT_S)
        thread.join(TIMEOUT_S)
        server = Server(tmp_path)
        now = check_consistent(server, before)
        if "many" in now:
            # Registered whole, or not at all.
            got = read(server.client(), "many")
            assert got.num_rows == expected.num_rows
            assert now["many"]["n_files"] == 150
    server.stop()


def test_an_upload_whose_client_goes_leaves_nothing(tmp_path):
    s = Server(tmp_path)
    uploader = (
        "import sys, time, pyarrow as pa, pyarrow.flight as flight\n"
        "client = flight.connect(sys.argv[1])\n"
        "batch = pa.record_batch({'n': pa.array(range(50_000))})\n"
        "writer, _ = client.do_put(flight.FlightDescriptor.for_path('abandoned'), batch.schema)\n"
        "writer.write_batch(batch)\n"
        "time.sleep(600)\n"
    )
    client = None
    try:
        objects = s.data_dir / "objects"
        proc = subprocess.Popen([sys.executable, "-c", uploader, s.url])
        deadline = time.monotonic() + TIMEOUT_S
        while not any(p.name.startswith(".upload-") for p in objects.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "the upload never started"
            time.sleep(0.05)
        # The client vanishes mid-stream: its connection closes without a word.
        proc.kill()
        proc.wait(timeout=TIMEOUT_S)
        deadline = time.monotonic() + 10
        while any(p.name.startswith(".upload-") for p in objects.iterdir()):
            assert time.monotonic() < deadline, "the abandoned upload's file stayed"
            time.sleep(0.05)
        client = s.client()
        assert "abandoned" not in records(client)
    finally:
        if client is not None:
            client.close()
        s.stop()
