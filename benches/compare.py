"""Parquet cases of the benchmark harness, each next to its peer measured in the same run.

Data: `rows` rows x 10 columns in `shards` hive shards (fixed seed, `id` sorted, pyarrow's
default row groups). Peers: a pyarrow.flight server written in Python serving the same files with
pyarrow.dataset (what a Python user would write instead), and a local pyarrow.dataset read.

1. full scan, every endpoint fetched in parallel by a pyarrow.flight client;
2. a 1 % filter on the sorted id (row groups pruned reported from EXPLAIN ANALYZE);
3. a projection of 3 of 10 columns (bytes read from storage next to those columns' chunks);
6. concurrency: N clients at once, half full scans and half filters, for a fixed time.

    cargo build --release --bin artiflight
    .venv/bin/python benches/compare.py [--rows 10000000] [--shards 20] [--repeat 3]
"""

import argparse
import json
import multiprocessing
import os
import pathlib
import re
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import (DEFAULT_BINARY, DEFAULT_DATA, REPO, Row, best, cpu_per_gb,  # noqa: E402,F401
                    peak_rss_mb, print_rows, register, serve, stop, timed)

PROJECTED = ["id", "c", "h"]
# The data's own name. Each data set gets its own server data dir too: registering content that a
# catalog already holds returns its first record, under whatever key it was registered then.
KEY = "scan"


def make_data(root: pathlib.Path, rows: int, shards: int) -> pathlib.Path:
    """10 columns (ints, floats, a low-cardinality string), `shards` hive shards."""
    target = root / f"scan-{rows}-{shards}"
    if (target / "_done").exists():
        return target
    rng = np.random.default_rng(0)
    per = rows // shards
    for s in range(shards):
        start = s * per
        table = pa.table({
            "id": pa.array(np.arange(start, start + per, dtype=np.int64)),
            "a": rng.integers(0, 1000, per, dtype=np.int64),
            "b": rng.integers(0, 1 << 30, per, dtype=np.int32),
            "c": rng.random(per),
            "d": rng.random(per),
            "e": rng.random(per).astype(np.float32),
            "f": rng.integers(0, 100, per, dtype=np.int16),
            "g": rng.normal(size=per),
            "h": pa.array(np.array(["alpha", "beta", "gamma", "delta"])[rng.integers(0, 4, per)]),
        })
        out = target / f"shard={s}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "part-0.parquet", row_group_size=1 << 20)
    (target / "_done").write_text("ok")
    return target


class PyarrowServer(flight.FlightServerBase):
    """The peer: a plain pyarrow Flight server over a pyarrow dataset. A command descriptor
    `{"id": [lo, hi], "columns": [...]}` filters and projects, as pyarrow.dataset does."""

    def __init__(self, folder, **kw):
        super().__init__("grpc://127.0.0.1:0", **kw)
        self.dataset = ds.dataset(folder, format="parquet", partitioning="hive")

    def get_flight_info(self, context, descriptor):
        ticket = flight.Ticket(descriptor.command or b"{}")
        return flight.FlightInfo(self.dataset.schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    def do_get(self, context, ticket):
        spec = json.loads(ticket.ticket)
        kwargs = {}
        if "id" in spec:
            lo, hi = spec["id"]
            kwargs["filter"] = (pc.field("id") >= lo) & (pc.field("id") <= hi)
        if "columns" in spec:
            kwargs["columns"] = spec["columns"]
        scanner = self.dataset.scanner(**kwargs)
        return flight.GeneratorStream(scanner.projected_schema, scanner.to_batches())


def fetch(url: str, descriptor, parallel: bool, keep: bool = True) -> tuple[float, int, int]:
    """GetFlightInfo and every endpoint: seconds, rows, Arrow bytes. Without `keep`, batches are
    counted and dropped, so that many clients at once do not hold whole tables."""
    client = flight.connect(url)
    start = time.perf_counter()
    info = client.get_flight_info(descriptor)
    counts = [(0, 0)] * len(info.endpoints)

    def one(i, endpoint):
        c = flight.connect(url) if parallel else client
        reader = c.do_get(endpoint.ticket)
        if keep:
            table = reader.read_all()
            counts[i] = (table.num_rows, table.nbytes)
        else:
            rows = nbytes = 0
            for chunk in reader:
                rows += chunk.data.num_rows
                nbytes += chunk.data.nbytes
            counts[i] = (rows, nbytes)
        if parallel:
            c.close()

    if parallel and len(info.endpoints) > 1:
        threads = [threading.Thread(target=one, args=(i, e)) for i, e in enumerate(info.endpoints)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, e in enumerate(info.endpoints):
            one(i, e)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed, sum(r for r, _ in counts), sum(b for _, b in counts)


def ours_cmd(**cmd) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps({"key": KEY, **cmd}))


def peer_cmd(**cmd) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(cmd))


def explain(url: str, sql: str) -> dict:
    """DataFusion's scan metrics for `sql`, through Flight SQL's EXPLAIN ANALYZE."""
    import adbc_driver_flightsql.dbapi as flight_sql

    with flight_sql.connect(url, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN ANALYZE " + sql)
        text = " ".join(str(r[1]) for r in cur.fetchall())
    metrics = {}
    for name in ["row_groups_pruned_statistics", "files_ranges_pruned_statistics",
                 "page_index_rows_pruned"]:
        m = re.search(name + r"=([\d.]+) ?([KM]?) total → ([\d.]+) ?([KM]?) matched", text)
        if m:
            scale = {"": 1, "K": 1e3, "M": 1e6}
            metrics[name] = (float(m.group(1)) * scale[m.group(2)], float(m.group(3)) * scale[m.group(4)])
    m = re.search(r"bytes_scanned=([\d.]+) ?([KMG]?)", text)
    if m:
        metrics["bytes_scanned"] = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
    return metrics


def column_chunk_bytes(folder: pathlib.Path, columns: list[str], all_columns: bool = False) -> int:
    """Compressed bytes of `columns`' chunks over every file (what a reader of only those columns
    must read), or of every column."""
    total = 0
    for path in sorted(folder.rglob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                if all_columns or chunk.path_in_schema in columns:
                    total += chunk.total_compressed_size
    return total


def concurrent(url: str, scan, filt, clients: int, seconds: float) -> dict:
    """`clients` threads for `seconds`, half looping full scans, half filters."""
    stop_at = time.perf_counter() + seconds
    scan_bytes, latencies, errors = [0], [], []
    lock = threading.Lock()

    def worker(kind):
        # Bounded: at most 10,000 requests per client, and no new request after the deadline.
        for _ in range(10_000):
            if time.perf_counter() >= stop_at:
                return
            try:
                if kind == "scan":
                    _, _, nbytes = fetch(url, scan, parallel=False, keep=False)
                    with lock:
                        scan_bytes[0] += nbytes
                else:
                    secs, _, _ = fetch(url, filt, parallel=False)
                    with lock:
                        latencies.append(secs)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=("scan" if i % 2 == 0 else "filter",))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "gbps": scan_bytes[0] / elapsed / 1e9,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "filters": len(latencies),
        "errors": errors,
    }


def run(args) -> list[Row]:
    folder = make_data(pathlib.Path(args.data), args.rows, args.shards)
    proc, url = serve(args.binary, pathlib.Path(args.data) / f"artiflight-data-{folder.name}", folder)
    global KEY
    KEY = folder.name
    rows: list[Row] = []
    wanted = set(getattr(args, "only", None) or range(1, 8))
    peer = PyarrowServer(folder)
    peer_url = f"grpc://127.0.0.1:{peer.port}"
    threading.Thread(target=peer.serve, daemon=True).start()
    try:
        register(url, folder, KEY)
        print(f"parquet cases: {args.rows:,} rows x 10 columns in {args.shards} shards, best of {args.repeat}",
              flush=True)

        if 1 in wanted:
            rows.extend(full_scan(args, folder, url, peer_url, proc.pid))
        lo = args.rows // 2
        hi = lo + args.rows // 100 - 1
        ours_f = ours_cmd(filter=f"id BETWEEN {lo} AND {hi}")
        peer_f = peer_cmd(id=[lo, hi])
        if 2 in wanted:
            rows.append(selective(args, url, peer_url, ours_f, peer_f, lo, hi))
        if 3 in wanted:
            rows.extend(projection(args, folder, url, peer_url))
        if 6 in wanted:
            for clients in args.clients:
                rows.extend(concurrency(args, proc, url, peer_url, ours_f, peer_f, clients))
    finally:
        peer.shutdown()
        stop(proc)
    return rows


def pin(pid: int, cpus: set[int]):
    """Pins every thread of process `pid` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that just ended
            pass


def serve_peer_pinned(folder: str, ports, cpu: int):
    """The peer in a process of its own, pinned to `cpu` (for the pinned full scan)."""
    os.sched_setaffinity(0, {cpu})
    peer = PyarrowServer(pathlib.Path(folder))
    ports.put(peer.port)
    peer.serve()


def pinned_apart(args, folder, url, server_pid) -> list[Row]:
    """Case 1 with the server on core 0 and the client on core 1: two machines in miniature, so
    that neither side's CPU is the other's."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        return []
    server_cpu, client_cpu = sorted(cpus)[:2]
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    peer = ctx.Process(target=serve_peer_pinned, args=(str(folder), ports, server_cpu), daemon=True)
    peer.start()
    peer_url = f"grpc://127.0.0.1:{ports.get(timeout=120)}"
    try:
        pin(server_pid, {server_cpu})
        pin(os.getpid(), {client_cpu})
        local = best(lambda: (lambda t0, t: (time.perf_counter() - t0, t.num_rows, t.nbytes))(
            time.perf_counter(), ds.dataset(folder, format="parquet", partitioning="hive").to_table()),
            args.repeat)
        theirs = best(lambda: fetch(peer_url, peer_cmd(), False), args.repeat)
        par = best(lambda: fetch(url, ours_cmd(), True), args.repeat)
    finally:
        pin(os.getpid(), cpus)
        pin(server_pid, cpus)
        peer.terminate()
        peer.join(timeout=30)
    for name, r in [("local", local), ("peer", theirs), ("par", par)]:
        assert r[1] == args.rows, (name, r[1])
    gbps = lambda r: r[2] / r[0] / 1e9  # noqa: E731
    what = "GB/s, server on core 0, client on core 1"
    return [
        Row("1 full scan, pinned apart", what, gbps(par), gbps(theirs), "GB/s", ">= 1.5",
            "pyarrow Flight server (Python), pinned alike"),
        Row("1 full scan, pinned apart", what, gbps(par), gbps(local), "GB/s", ">= 1.0",
            "local pyarrow.dataset on core 1"),
    ]


def full_scan(args, folder, url, peer_url, server_pid) -> list[Row]:
    """Case 1."""
    ds.dataset(folder, format="parquet", partitioning="hive").to_table()  # warm the page cache
    local = best(lambda: (lambda t0, t: (time.perf_counter() - t0, t.num_rows, t.nbytes))(
        time.perf_counter(), ds.dataset(folder, format="parquet", partitioning="hive").to_table()),
        args.repeat)
    theirs = best(lambda: fetch(peer_url, peer_cmd(), False), args.repeat)
    seq = best(lambda: fetch(url, ours_cmd(), False), args.repeat)
    par = best(lambda: fetch(url, ours_cmd(), True), args.repeat)
    for name, r in [("local", local), ("peer", theirs), ("seq", seq), ("par", par)]:
        assert r[1] == args.rows, (name, r[1])
    gbps = lambda r: r[2] / r[0] / 1e9  # noqa: E731
    # What each way costs in CPU, client and server together: on a machine whose cores both
    # sides share, throughput is at most cores / (core-seconds per GB).
    cpu_ours = cpu_per_gb(lambda: fetch(url, ours_cmd(), True), args.repeat, server_pid)
    cpu_peer = cpu_per_gb(lambda: fetch(peer_url, peer_cmd(), False), args.repeat)
    cpu_local = cpu_per_gb(lambda: (0, args.rows, ds.dataset(folder, format="parquet", partitioning="hive").to_table().nbytes),
                           args.repeat)
    return [
        Row("1 full scan", "CPU core-s per GB, client + server", cpu_ours, cpu_peer,
            "s/GB", "", "pyarrow Flight server (Python)", f"local pyarrow.dataset: {cpu_local:.2f} s/GB"),
        Row("1 full scan", "GB/s, endpoints in parallel", gbps(par), gbps(theirs),
            "GB/s", ">= 1.5", "pyarrow Flight server (Python)"),
        Row("1 full scan", "GB/s, endpoints in parallel", gbps(par), gbps(local),
            "GB/s", ">= 1.0", "local pyarrow.dataset"),
        Row("1 full scan", "GB/s, endpoints in sequence", gbps(seq), gbps(theirs),
            "GB/s", "", "pyarrow Flight server (Python)"),
    ] + pinned_apart(args, folder, url, server_pid)


def selective(args, url, peer_url, ours_f, peer_f, lo, hi) -> Row:
    """Case 2: latency, and what pruning skipped (from EXPLAIN ANALYZE)."""
    assert fetch(url, ours_f, True)[1] == fetch(peer_url, peer_f, False)[1] == hi - lo + 1
    # Twenty milliseconds jitter by a few between runs here: the best of ten, on both sides.
    repeat = max(args.repeat, 10)
    t_ours = best(lambda: fetch(url, ours_f, True), repeat)[0]
    t_peer = best(lambda: fetch(peer_url, peer_f, False), repeat)[0]
    m = explain(url, f'SELECT * FROM "{KEY}" WHERE id BETWEEN {lo} AND {hi}')
    groups = m.get("row_groups_pruned_statistics", (0, 0))
    files = m.get("files_ranges_pruned_statistics", (0, 0))
    note = (f"file ranges {files[0]:.0f} -> {files[1]:.0f} by statistics, "
            f"row groups {groups[0]:.0f} -> {groups[1]:.0f}")
    return Row("2 1 % filter on sorted id", "seconds to a table", t_ours, t_peer, "s",
               "<= 1.0", "pyarrow Flight server (Python)", note)


def projection(args, folder, url, peer_url) -> list[Row]:
    """Case 3: latency, and bytes read from storage next to the projected columns' chunks."""
    ours_p = ours_cmd(columns=PROJECTED)
    peer_p = peer_cmd(columns=PROJECTED)
    t_ours = best(lambda: fetch(url, ours_p, True), args.repeat)[0]
    t_peer = best(lambda: fetch(peer_url, peer_p, False), args.repeat)[0]
    t_local = best(lambda: timed(lambda: ds.dataset(folder, format="parquet", partitioning="hive")
                                 .to_table(columns=PROJECTED)), args.repeat)[0]
    rows = [Row("3 projection, 3 of 10 columns", "seconds to a table", t_ours, t_peer, "s",
                "", "pyarrow Flight server (Python)"),
            Row("3 projection, 3 of 10 columns", "seconds to a table", t_ours, t_local, "s",
                "<= 1.0", "local pyarrow.dataset")]
    scanned = explain(url, f'SELECT {", ".join(PROJECTED)} FROM "{KEY}"').get("bytes_scanned", float("nan"))
    needed = column_chunk_bytes(folder, PROJECTED)
    everything = column_chunk_bytes(folder, [], all_columns=True)
    rows.append(Row("3 projection, 3 of 10 columns", "MB read from storage", scanned / 1e6,
                    needed / 1e6, "MB", "<= 1.05", "those 3 columns' chunks",
                    f"all columns' chunks: {everything / 1e6:.0f} MB"))
    return rows


def concurrency(args, proc, url, peer_url, ours_f, peer_f, clients) -> list[Row]:
    """Case 6, for one number of clients."""
    before = peak_rss_mb(proc.pid)
    ours_c = concurrent(url, ours_cmd(), ours_f, clients, args.seconds)
    peer_c = concurrent(peer_url, peer_cmd(), peer_f, clients, args.seconds)
    for result in (ours_c, peer_c):
        assert not result["errors"], result["errors"][:3]
    label = f"6 {clients} clients, {args.seconds:.0f} s"
    return [
        Row(label, "scan GB/s, all clients", ours_c["gbps"], peer_c["gbps"], "GB/s",
            "", "pyarrow Flight server (Python)"),
        Row(label, "filter p50 latency", ours_c["p50"], peer_c["p50"], "s", "",
            "pyarrow Flight server (Python)", f"{ours_c['filters']} filters"),
        Row(label, "filter p99 latency", ours_c["p99"], peer_c["p99"], "s", "",
            "pyarrow Flight server (Python)"),
        Row(label, "server peak RSS", peak_rss_mb(proc.pid), None, "MB", "",
            "", f"{before:.0f} MB before"),
    ]


def add_args(parser: argparse.ArgumentParser):
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level and server")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--binary", default=DEFAULT_BINARY)
    parser.add_argument("--data", default=DEFAULT_DATA)
    print_rows(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
