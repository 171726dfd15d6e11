"""A fleet on loopback: three servers on one shared catalog (SQLite, and a real PostgreSQL started
here with initdb and pg_ctl as the `postgres` user), each with its own data dir.

Endpoints name the live server that rendezvous hashing picks for their data; pyarrow, the Python
package and the Rust client (the CLI) read each endpoint from its location and get what
pyarrow.dataset reads from the files; a server killed without leaving drops out of the locations
within the heartbeat window, and one that stops cleanly leaves at once.
"""

import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import artiflight
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from conftest import Server, binary, moto_server, s3_env

HEARTBEAT = "200ms"
# Five missed heartbeats and a server is out; the polls below allow twice that and more.
WAIT_S = 15
SHARDS = 20


def write_shards(folder):
    rng = np.random.default_rng(11)
    for shard in range(SHARDS):
        part = folder / f"shard={shard}"
        part.mkdir(parents=True)
        pq.write_table(pa.table({"id": np.arange(shard * 1000, shard * 1000 + 1000),
                                 "x": rng.random(1000)}), part / "part-0.parquet")


def as_postgres(*command: str, **kwargs) -> subprocess.CompletedProcess:
    """Runs a PostgreSQL tool as the `postgres` user (as ourselves when not root)."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *command], check=True, capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own on a free loopback port, in a temporary directory."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        pytest.fail("PostgreSQL is not installed: run scripts/setup.sh")
    bindir = bins[-1]
    # Not under pytest's tmp_path: its parents are private to root, and initdb runs as postgres.
    home = tempfile.mkdtemp(prefix="artiflight-pg-")
    os.chmod(home, 0o755)
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = os.path.join(home, "data")
    as_postgres(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    as_postgres(f"{bindir}/pg_ctl", "-D", data, "-w", "-t", "60", "-l", os.path.join(home, "log"),
                "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        yield f"postgres://postgres@127.0.0.1:{port}/postgres", bindir, port, home
    finally:
        as_postgres(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


def shared_catalog(request, tmp_path, kind: str) -> str:
    """A catalog URL that a fleet shares: a SQLite file, or a database of this test's own in the
    module's PostgreSQL (so that tests do not see each other's records)."""
    if kind == "sqlite":
        return f"sqlite://{tmp_path / 'shared' / 'catalog.sqlite'}"
    url, bindir, port, home = request.getfixturevalue("postgres")
    name = f"fleet_{time.monotonic_ns()}"
    as_postgres(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), name)
    request.node.psql = [f"{bindir}/psql", "-h", "127.0.0.1", "-p", str(port), "-d", name, "-tAc"]
    return url.rsplit("/", 1)[0] + "/" + name


def start_fleet(tmp_path, catalog, *args, env=None, partitions=SHARDS):
    return [Server(tmp_path, "--catalog", catalog, "--heartbeat", HEARTBEAT, *args, env=env,
                   partitions=partitions, data_dir=tmp_path / f"data{i}") for i in range(3)]


def stop_fleet(servers):
    for s in servers:
        if s.proc.poll() is None:
            s.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def fleet(request, tmp_path):
    catalog = shared_catalog(request, tmp_path, request.param)
    write_shards(tmp_path / "files" / "shards")
    servers = start_fleet(tmp_path, catalog)
    yield servers, tmp_path / "files" / "shards"
    stop_fleet(servers)


def locations(server, key="shards"):
    client = server.client()
    try:
        info = client.get_flight_info(flight.FlightDescriptor.for_path(key))
    finally:
        client.close()
    return info, [e.locations[0].uri.decode() if e.locations else None for e in info.endpoints]


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"not within {WAIT_S} s: {what}")


def expected_table(folder) -> pa.Table:
    return pads.dataset(folder, format="parquet", partitioning="hive").to_table().sort_by("id")


def statement_query(sql: str) -> bytes:
    """Flight SQL's CommandStatementQuery in a protobuf Any, written by hand (two string fields)."""
    def field(number: int, payload: bytes) -> bytes:
        length, varint = len(payload), b""
        while True:
            byte, length = length & 0x7F, length >> 7
            varint += bytes([byte | (0x80 if length else 0)])
            if not length:
                return bytes([number << 3 | 2]) + varint + payload
    type_url = b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
    return field(1, type_url) + field(2, field(1, sql.encode()))


def test_endpoints_spread_over_the_fleet_and_route_around_a_lost_server(fleet, request):
    servers, folder = fleet
    a, b, c = servers
    urls = {s.url for s in servers}
    artiflight.connect(a.url).register(folder, "shards")  # through one server, read through others
    psql = getattr(request.node, "psql", None)
    if psql:  # the records and the membership really are in PostgreSQL
        assert as_postgres(*psql, "SELECT key FROM artifacts WHERE key = 'shards'").stdout.strip() == "shards"
        live = wait_for(lambda: (lambda n: n if n == 3 else None)(
            int(as_postgres(*psql, "SELECT count(*) FROM servers").stdout)), "three servers in PostgreSQL")
        assert live == 3

    _, spread = wait_for(lambda: (lambda r: r if set(r[1]) == urls else None)(locations(b)),
                         "endpoints on all three servers")
    assert len(spread) == SHARDS
    # The same shard goes to the same server, whichever server is asked.
    assert wait_for(lambda: locations(c)[1] == spread, "the same routing from every server")

    # pyarrow, by hand: each endpoint from its location.
    info, _ = locations(b)
    parts = []
    for endpoint in info.endpoints:
        client = flight.connect(endpoint.locations[0].uri.decode())
        parts.append(client.do_get(endpoint.ticket).read_all())
        client.close()
    want = expected_table(folder)
    assert pa.concat_tables(parts).sort_by("id").select(["id", "x"]).equals(want.select(["id", "x"]))

    # The package follows locations, and says which server sent what.
    package = artiflight.connect(b.url)
    table = package.artifact("shards").open().to_table()
    assert table.sort_by("id").select(["id", "x"]).equals(want.select(["id", "x"]))
    assert set(package.stats.by_server) == urls

    # The Rust client (the CLI) too.
    out = a.tmp / "via-cli.parquet"
    run = subprocess.run([binary(), "get", "shards", "--server", c.url, "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert pq.read_table(out).sort_by("id").select(["id", "x"]).equals(want.select(["id", "x"]))

    # Flight SQL: a scan's independent partitions are spread the same way, and read whole from
    # their locations (by hand with pyarrow, and through ADBC).
    sql = "SELECT id, x FROM shards"
    sql_info = b.client().get_flight_info(flight.FlightDescriptor.for_command(statement_query(sql)))
    sql_locations = {e.locations[0].uri.decode() for e in sql_info.endpoints if e.locations}
    assert len(sql_info.endpoints) > 1 and sql_locations == urls
    parts = [flight.connect(e.locations[0].uri.decode()).do_get(e.ticket).read_all() for e in sql_info.endpoints]
    assert pa.concat_tables(parts).sort_by("id").equals(want.select(["id", "x"]))
    import adbc_driver_flightsql.dbapi as flightsql

    with flightsql.connect(b.url) as conn, conn.cursor() as cur:
        cur.execute(sql)
        assert cur.fetch_arrow_table().sort_by("id").equals(want.select(["id", "x"]))

    # kill -9: no goodbye; the others route around it once its heartbeat is old.
    c.proc.kill()
    c.proc.wait(timeout=30)
    c.log.close()
    left = wait_for(lambda: (lambda r: r if c.url not in r[1] else None)(locations(a)),
                    "the killed server leaving the locations")[1]
    assert set(left) == {a.url, b.url}
    # Keys of the surviving servers stay where they were (rendezvous hashing).
    assert all(after == before for before, after in zip(spread, left) if before != c.url)
    # A location that fails falls back to the server asked: the FlightInfo from before the kill
    # names the dead server for some endpoints, and still reads whole.
    stale = artiflight.connect(b.url)
    table = stale.read(info)
    assert table.sort_by("id").select(["id", "x"]).equals(want.select(["id", "x"]))
    assert c.url not in stale.stats.by_server

    # A clean stop leaves at once.
    a.stop()
    assert wait_for(lambda: locations(b)[1] == [None] * SHARDS, "a fleet of one routing nothing")


def test_concurrent_writers_on_two_servers_keep_every_version_and_one_latest(fleet):
    servers, _ = fleet
    errors = []

    def write(server, n):
        try:
            client = artiflight.connect(server.url)
            for i in range(n):
                client.save(pa.table({"writer": [server.url], "i": [i]}), "contended")
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s, 5)) for s in servers[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    client = servers[2].client()
    body = json.dumps({"key": "contended"}).encode()
    versions = json.loads(list(client.do_action(flight.Action("list_versions", body)))[0].body.to_pybytes())
    client.close()
    versions = versions if isinstance(versions, list) else versions["versions"]
    assert len(versions) == 10
    assert sorted(v["version"] for v in versions) == list(range(1, 11))
    assert sum(v["is_latest"] for v in versions) == 1


BUCKET = "managed"


def objects(s3, prefix="uploads/"):
    answer = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in answer.get("Contents", []))


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_uploads_to_shared_s3_storage_are_read_by_every_server(request, tmp_path, kind):
    catalog = shared_catalog(request, tmp_path, kind)
    with moto_server(BUCKET) as (port, s3):
        servers = start_fleet(tmp_path, catalog, "--managed-storage", f"s3://{BUCKET}/uploads",
                              "--allow-root", f"s3://{BUCKET}/data", env=s3_env(port))
        try:
            a, b, c = servers
            # A 20-shard folder in S3, registered through one server: the FlightInfo from another
            # has endpoints on all three, and pyarrow reads them from their locations.
            folder = tmp_path / "files" / "shards"
            write_shards(folder)
            for path in sorted(folder.rglob("*.parquet")):
                s3.upload_file(str(path), BUCKET, f"data/shards/{path.relative_to(folder).as_posix()}")
            artiflight.connect(a.url).register(f"s3://{BUCKET}/data/shards", "remote-shards")
            info, spread = wait_for(
                lambda: (lambda r: r if set(r[1]) == {s.url for s in servers} else None)(
                    locations(b, "remote-shards")), "remote endpoints on all three servers")
            parts = [flight.connect(uri).do_get(e.ticket).read_all() for e, uri in zip(info.endpoints, spread)]
            want = expected_table(folder).select(["id", "x"])
            assert pa.concat_tables(parts).sort_by("id").select(["id", "x"]).equals(want)

            table = pa.table({"id": np.arange(5000), "x": np.random.default_rng(3).random(5000)})
            saved = artiflight.connect(a.url).save(table, "shared")
            assert saved.path.startswith(f"s3://{BUCKET}/uploads/") and saved.path.endswith(".parquet")
            # The staged copy is gone from the uploading server's data dir; the object is in S3.
            assert not list((a.data_dir / "objects").glob("*.parquet"))
            assert objects(s3) == [saved.path.removeprefix(f"s3://{BUCKET}/")]
            for server in (b, c):  # read through the others
                got = artiflight.connect(server.url).artifact("shared").open().to_table()
                assert got.sort_by("id").equals(table)

            # The same content through another server is the same record, and the same object.
            twin = artiflight.connect(b.url).save(table, "twin")
            assert (twin.key, twin.uid) == ("shared", saved.uid) and len(objects(s3)) == 1
            # Deleted through the server that wrote it: the readers' servers hold leases on what
            # they planned, and would remove it when those end.
            artiflight.connect(a.url).artifact("shared").delete(permanent=True)
            assert objects(s3) == []

            # Deletes on one server race identical uploads on another: the catalog's lock keeps
            # the object of every record an upload commits.
            errors, small = [], pa.table({"v": np.arange(100)})

            def churn(server, key, delete, rounds=8):
                try:
                    client, reader = artiflight.connect(server.url), artiflight.connect(c.url)
                    for _ in range(rounds):
                        record = client.save(small, key)
                        if record.key != key:  # the other writer's record, returned as a twin
                            continue
                        if delete:
                            record.delete(permanent=True)
                        else:
                            assert reader.artifact(key).open().to_table().equals(small)
                except Exception as e:  # noqa: BLE001 (reported below)
                    errors.append(e)

            threads = [threading.Thread(target=churn, args=(a, "churn-deleted", True)),
                       threading.Thread(target=churn, args=(b, "churn-kept", False))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=180)
            assert not errors, errors
            kept = artiflight.connect(b.url).save(small, "churn-kept")
            assert kept.key == "churn-kept"
            assert objects(s3) == [kept.path.removeprefix(f"s3://{BUCKET}/")]
            assert artiflight.connect(c.url).artifact("churn-kept").open().to_table().equals(small)
        finally:
            stop_fleet(servers)


def scrape(server) -> str:
    import re
    import urllib.request

    url = re.search(r"metrics on (http://\S+/metrics)", server.stderr()).group(1)
    return urllib.request.urlopen(url, timeout=30).read().decode()


def worker_calls(server) -> int:
    import re

    found = re.search(r'artiflight_calls_total\{rpc="ExecuteTask"\} (\d+)', scrape(server))
    return int(found.group(1)) if found else 0


def test_sql_that_exchanges_data_runs_its_stages_across_the_fleet(request, tmp_path):
    import adbc_driver_flightsql.dbapi as flightsql
    import duckdb

    # Big enough at 64 KiB per task to need every server; a 10-million-row run is in BENCHMARKS.md.
    rows, files = 400_000, 8
    facts = tmp_path / "files" / "facts"
    facts.mkdir(parents=True)
    rng = np.random.default_rng(17)
    for i in range(files):
        n = rows // files
        pq.write_table(pa.table({"id": np.arange(i * n, (i + 1) * n),
                                 "g": rng.integers(0, 50, n).astype("int32"),
                                 "v": rng.random(n)}), facts / f"part-{i}.parquet", row_group_size=10_000)
    dims = tmp_path / "files" / "dims.parquet"
    pq.write_table(pa.table({"g": np.arange(50, dtype="int32"),
                             "label": [f"group-{i % 7}" for i in range(50)]}), dims)

    catalog = shared_catalog(request, tmp_path, "postgres")
    # With --auth: each task carries the client's token to the server that runs it, which checks it
    # against the shared catalog.
    def token(name, role):
        out = subprocess.run([binary(), "--data-dir", str(tmp_path / "cli"), "--catalog", catalog, "token",
                              "create", name, "--role", role], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().splitlines()[-1]

    writer = token("writer", "write")
    reader = {"username": "reader", "password": token("reader", "read")}
    servers = start_fleet(tmp_path, catalog, "--auth", "--sql-task-bytes", "64KiB",
                          "--metrics-addr", "127.0.0.1:0", partitions=2)
    try:
        a, b, c = servers
        client = artiflight.connect(a.url, token=writer)
        client.register(facts, "facts")
        client.register(dims, "dims")
        psql = request.node.psql
        wait_for(lambda: int(as_postgres(*psql, "SELECT count(*) FROM servers").stdout) == 3,
                 "three servers in the catalog")
        time.sleep(1)  # five heartbeats: every server has read the three back
        queries = {
            "group by": "SELECT g, count(*) AS n, sum(v) AS s, min(id) AS lo FROM facts GROUP BY g ORDER BY g",
            "join": "SELECT d.label, count(*) AS n, avg(f.v) AS mean FROM facts f JOIN dims d ON f.g = d.g "
                    "WHERE f.v < 0.5 GROUP BY d.label ORDER BY d.label",
        }
        duck = duckdb.connect()
        duck.execute(f"CREATE VIEW facts AS SELECT * FROM read_parquet('{facts}/*.parquet')")
        duck.execute(f"CREATE VIEW dims AS SELECT * FROM read_parquet('{dims}')")
        before = {s.url: worker_calls(s) for s in servers}
        with flightsql.connect(a.url, db_kwargs=reader) as conn:
            for name, sql in queries.items():
                with conn.cursor() as cur:
                    cur.execute(sql)
                    got = cur.fetch_arrow_table()
                want = duck.sql(sql).to_arrow_table()
                assert got.column_names == want.column_names, name
                for column in got.column_names:
                    g, w = got[column].to_pylist(), want[column].to_pylist()
                    if isinstance(w[0], float):
                        assert np.allclose(g, w, rtol=1e-9), (name, column)
                    else:
                        assert g == w, (name, column)
        ran = {s.url: worker_calls(s) - before[s.url] for s in servers}
        # EXPLAIN ANALYZE shows the stages, each of three tasks, one per server.
        with flightsql.connect(a.url, db_kwargs=reader) as conn, conn.cursor() as cur:
            cur.execute("EXPLAIN ANALYZE " + queries["join"])
            plan = cur.fetch_arrow_table().to_pylist()[-1]["plan"]
        assert "DistributedExec" in plan and "NetworkShuffleExec" in plan, plan
        assert "tasks=3" in plan, plan
        assert sum(1 for n in ran.values() if n > 0) >= 2, f"stages ran on {ran}"

        # A fleet of one plans as a single server always did: no stage leaves it.
        b.stop()
        c.stop()
        psql_count = lambda: int(as_postgres(*psql, "SELECT count(*) FROM servers").stdout)  # noqa: E731
        wait_for(lambda: psql_count() == 1, "a fleet of one in the catalog")
        time.sleep(1)  # five heartbeats: the survivor has read it back
        alone = worker_calls(a)
        with flightsql.connect(a.url, db_kwargs=reader) as conn, conn.cursor() as cur:
            cur.execute(queries["group by"])
            assert cur.fetch_arrow_table().num_rows == 50
        assert worker_calls(a) == alone
    finally:
        stop_fleet(servers)


def test_json_logs_and_metrics_from_the_binary(tmp_path):
    import re
    import urllib.request

    server = Server(tmp_path, "--log-format", "json", "--metrics-addr", "127.0.0.1:0")
    try:
        client = server.client()
        info = client.get_flight_info(flight.FlightDescriptor.for_path("sharded_parquet"))
        rows = sum(client.do_get(e.ticket).read_all().num_rows for e in info.endpoints)
        client.close()
        lines = [json.loads(line) for line in server.stderr().splitlines() if line.strip()]
        assert lines and all("level" in line and "fields" in line for line in lines)
        said = " ".join(str(line["fields"].get("message", "")) for line in lines)
        url = re.search(r"metrics on (http://\S+/metrics)", said).group(1)
        text = urllib.request.urlopen(url, timeout=30).read().decode()
        assert f"artiflight_rows_sent_total {rows}" in text
        assert 'artiflight_calls_total{rpc="GetFlightInfo"} 1' in text
    finally:
        server.stop()
