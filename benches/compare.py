"""Full-scan throughput of artiflight next to its peers, measured in the same run.

Peers: pyarrow's own Flight server (a Python FlightServerBase streaming the same files with
pyarrow.dataset) and a local pyarrow.dataset read. One pyarrow.flight client reads both servers.

    cargo build --release --bin artiflight
    .venv/bin/python benches/compare.py [--rows 10000000] [--shards 20] [--repeat 3]

Prints a table of seconds, GB/s (Arrow in-memory bytes) and the ratio to the Python Flight server.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def serve(binary: str, data_dir: pathlib.Path, folder: pathlib.Path, key: str):
    """Starts artiflight on an ephemeral loopback port with `folder` registered as `key`; returns
    the process and its URL."""
    proc = subprocess.Popen(
        [binary, "serve", "--addr", "127.0.0.1:0", "--data-dir", str(data_dir),
         "--allow-root", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    url = proc.stdout.readline().split()[-1]
    client = flight.connect(url)
    body = json.dumps({"path": str(folder), "key": key}).encode()
    list(client.do_action(flight.Action("register", body)))
    client.close()
    return proc, url


class PyarrowServer(flight.FlightServerBase):
    """The peer: a plain pyarrow Flight server over a pyarrow dataset."""

    def __init__(self, folder, **kw):
        super().__init__("grpc://127.0.0.1:0", **kw)
        self.dataset = ds.dataset(folder, format="parquet", partitioning="hive")

    def get_flight_info(self, context, descriptor):
        ticket = flight.Ticket(b"all")
        return flight.FlightInfo(self.dataset.schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    def do_get(self, context, ticket):
        return flight.GeneratorStream(self.dataset.schema, self.dataset.to_batches())


def scan(url: str, descriptor, parallel: bool) -> tuple[float, int, int]:
    client = flight.connect(url)
    start = time.perf_counter()
    info = client.get_flight_info(descriptor)
    results = [None] * len(info.endpoints)

    def fetch(i, endpoint):
        c = flight.connect(url) if parallel else client
        results[i] = c.do_get(endpoint.ticket).read_all()

    if parallel:
        threads = [threading.Thread(target=fetch, args=(i, e)) for i, e in enumerate(info.endpoints)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, e in enumerate(info.endpoints):
            fetch(i, e)
    elapsed = time.perf_counter() - start
    rows = sum(t.num_rows for t in results)
    nbytes = sum(t.nbytes for t in results)
    return elapsed, rows, nbytes


def best(fn, repeat):
    runs = [fn() for _ in range(repeat)]
    return min(runs, key=lambda r: r[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--binary", default=str(REPO / "target" / "release" / "artiflight"))
    parser.add_argument("--data", default=str(REPO / "bench-data"))
    args = parser.parse_args()

    folder = make_data(pathlib.Path(args.data), args.rows, args.shards)
    proc, url = serve(args.binary, pathlib.Path(args.data) / "artiflight-data", folder, "scan")
    try:
        peer = PyarrowServer(folder)
        peer_url = f"grpc://127.0.0.1:{peer.port}"
        threading.Thread(target=peer.serve, daemon=True).start()

        ours_desc = flight.FlightDescriptor.for_path("scan")
        peer_desc = flight.FlightDescriptor.for_path("scan")
        results = {}
        # Warm the page cache once before timing anything.
        ds.dataset(folder, format="parquet", partitioning="hive").to_table()
        results["pyarrow.dataset (local, no network)"] = best(
            lambda: (lambda t0, t: (time.perf_counter() - t0, t.num_rows, t.nbytes))(
                time.perf_counter(), ds.dataset(folder, format="parquet", partitioning="hive").to_table()),
            args.repeat)
        results["pyarrow Flight server (Python)"] = best(lambda: scan(peer_url, peer_desc, False), args.repeat)
        results["artiflight, endpoints in sequence"] = best(lambda: scan(url, ours_desc, False), args.repeat)
        results["artiflight, endpoints in parallel"] = best(lambda: scan(url, ours_desc, True), args.repeat)
        peer.shutdown()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    base = results["pyarrow Flight server (Python)"][0]
    print(f"full scan: {args.rows:,} rows x 10 columns in {args.shards} shards, best of {args.repeat}")
    print(f"{'reader':<40} {'seconds':>8} {'GB/s':>7} {'vs pyarrow Flight':>18}")
    for name, (secs, rows, nbytes) in results.items():
        assert rows == args.rows, (name, rows)
        print(f"{name:<40} {secs:>8.3f} {nbytes / secs / 1e9:>7.2f} {base / secs:>17.2f}x")


if __name__ == "__main__":
    sys.exit(main())
