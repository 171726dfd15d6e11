"""A fleet of 1, 2 and 3 servers on this machine: scan throughput and SQL latency, each next to
the one-server figure measured in the same run.

The servers share one SQLite catalog (`--catalog sqlite://...`), each with its own data dir. The
client asks server 0 for the FlightInfo of compare.py's 10 M x 10 table in 20 shards, then fetches
every endpoint from its location, all in parallel, the way the Python package does. SQL goes through
ADBC to server 0: a GROUP BY over the table, and a join of it with a 100-row dimension table. With
two or three servers both run their stages on every server (datafusion-distributed); the `stages`
column gives each stage's task count, from EXPLAIN ANALYZE. Every answer is checked: the scan's row
count against pyarrow.dataset, the SQL answers against DuckDB over the same files.

    cargo build --release --bin artiflight
    .venv/bin/python benches/fleet_compare.py [--rows 10000000] [--shards 20] [--repeat 3]

On this 2-core machine, the servers share the cores with each other and with the client, so
more servers cannot add throughput here. What the run shows is the cost of spreading: routing,
one connection per server, and a cold cache on each. BENCHMARKS.md has the figures and a
paper estimate for a fleet of 10 machines.
"""

import argparse
import pathlib
import sys
import tempfile
import threading
import time

import re

import adbc_driver_flightsql.dbapi as flight_sql
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import DEFAULT_BINARY, DEFAULT_DATA, register, serve, stop  # noqa: E402
from compare import make_data  # noqa: E402

GROUP_BY = "SELECT h, f, count(*) AS n, sum(a) AS sa FROM fleet GROUP BY h, f ORDER BY h, f"
JOIN = ("SELECT d.label, count(*) AS n, sum(t.c) AS sc FROM fleet t JOIN dims d ON t.f = d.f "
        "WHERE t.g > 0 GROUP BY d.label ORDER BY d.label")
PARTITIONS = "6"  # endpoints per scan, whatever the fleet's size, so that only the fleet changes


def start_fleet(binary: str, n: int, folder: pathlib.Path, work: pathlib.Path):
    catalog = f"sqlite://{work / 'catalog.sqlite'}"
    servers = [serve(binary, work / f"data{i}", folder.parent, "--catalog", catalog, "--heartbeat", "200ms",
                     "--target-partitions", PARTITIONS) for i in range(n)]
    urls = [url for _, url in servers]
    register(urls[0], folder, "fleet")
    register(urls[0], dims_file(folder), "dims")
    deadline = time.monotonic() + 30
    while True:
        info = flight.connect(urls[0]).get_flight_info(flight.FlightDescriptor.for_path("fleet"))
        located = {e.locations[0].uri.decode() for e in info.endpoints if e.locations}
        if n == 1 or located == set(urls):
            return servers, urls
        if time.monotonic() > deadline:
            raise RuntimeError(f"the fleet of {n} did not form: endpoints on {located}")
        time.sleep(0.2)


def scan(url: str) -> tuple[float, int, int]:
    """Seconds, rows and bytes of a full scan, endpoints fetched from their locations at once."""
    start = time.perf_counter()
    info = flight.connect(url).get_flight_info(flight.FlightDescriptor.for_path("fleet"))
    results = [None] * len(info.endpoints)

    def fetch(i, endpoint):
        where = endpoint.locations[0].uri.decode() if endpoint.locations else url
        table = flight.connect(where).do_get(endpoint.ticket).read_all()
        results[i] = (table.num_rows, table.nbytes)

    threads = [threading.Thread(target=fetch, args=(i, e)) for i, e in enumerate(info.endpoints)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, sum(r for r, _ in results), sum(b for _, b in results)


def dims_file(folder: pathlib.Path) -> pathlib.Path:
    path = folder.parent / "dims-f.parquet"
    if not path.exists():
        pq.write_table(pa.table({"f": np.arange(100, dtype=np.int16),
                                 "label": [f"label-{i % 9}" for i in range(100)]}), path)
    return path


def sql(url: str, query: str) -> tuple[float, pa.Table]:
    with flight_sql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        start = time.perf_counter()
        cursor.execute(query)
        table = cursor.fetch_arrow_table()
        return time.perf_counter() - start, table


def stages(url: str, query: str) -> str:
    """Each stage's task count, from EXPLAIN ANALYZE ('-' when the plan is not distributed)."""
    _, table = sql(url, "EXPLAIN ANALYZE " + query)
    counts = re.findall(r"Stage \d+ ── tasks=(\d+)", table.to_pylist()[-1]["plan"])
    return ",".join(counts) or "-"


def check(got: pa.Table, want: pa.Table, what: str):
    assert got.column_names == want.column_names, what
    for name in got.column_names:
        g, w = got[name].to_pylist(), want[name].to_pylist()
        same = np.allclose(g, w, rtol=1e-9) if isinstance(w[0], float) else g == w
        assert same, f"{what}: column {name} differs from DuckDB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--binary", default=DEFAULT_BINARY)
    parser.add_argument("--data", default=DEFAULT_DATA)
    args = parser.parse_args()
    folder = make_data(pathlib.Path(args.data), args.rows, args.shards)
    want = ds.dataset(folder, format="parquet", partitioning="hive").count_rows()
    duck = duckdb.connect()
    duck.execute(f"CREATE VIEW fleet AS SELECT * FROM read_parquet('{folder}/*/*.parquet', hive_partitioning=true)")
    duck.execute(f"CREATE VIEW dims AS SELECT * FROM read_parquet('{dims_file(folder)}')")
    answers = {q: duck.sql(q).to_arrow_table() for q in (GROUP_BY, JOIN)}
    print(f"fleet of 1-3 servers on one machine: {args.rows:,} rows x 10 columns in {args.shards} shards, "
          f"best of {args.repeat}")
    print(f"{'servers':>7} {'scan s':>8} {'GB/s':>6} {'vs 1':>6} {'group-by s':>11} {'vs 1':>6} "
          f"{'join s':>8} {'vs 1':>6}  stages (tasks)")
    first = None
    for n in (1, 2, 3):
        with tempfile.TemporaryDirectory(dir=args.data) as work:
            servers, urls = start_fleet(args.binary, n, folder, pathlib.Path(work))
            try:
                runs = [scan(urls[0]) for _ in range(args.repeat + 1)][1:]  # the first warms caches
                seconds, rows, nbytes = min(runs)
                assert rows == want, (rows, want)
                timed = {}
                for query, name in ((GROUP_BY, "group by"), (JOIN, "join")):
                    check(sql(urls[0], query)[1], answers[query], name)
                    timed[query] = min(sql(urls[0], query)[0] for _ in range(args.repeat))
                shape = f"group by {stages(urls[0], GROUP_BY)}; join {stages(urls[0], JOIN)}"
            finally:
                for proc, _ in servers:
                    stop(proc)
        gbps = nbytes / seconds / 1e9
        first = first or (gbps, timed[GROUP_BY], timed[JOIN])
        print(f"{n:>7} {seconds:>8.3f} {gbps:>6.2f} {gbps / first[0]:>6.2f} {timed[GROUP_BY]:>11.3f} "
              f"{timed[GROUP_BY] / first[1]:>6.2f} {timed[JOIN]:>8.3f} {timed[JOIN] / first[2]:>6.2f}  {shape}")


if __name__ == "__main__":
    sys.exit(main())
