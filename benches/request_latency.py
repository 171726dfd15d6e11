"""The fixed cost of one AnnData slice, request by request: where the time goes, and how it spreads.

Best-of-N figures hide a slow request; this prints every one. For each of `--requests` identical
requests (the 1 % obs predicate of anndata_compare.py on one storage) it shows GetFlightInfo's
time, the DoGets' time (endpoints one after another, on one held connection), and the CPU the
server spent, read from /proc. A spike with server CPU to match is work in the server; one without
is waiting.

    cargo build --release --bin artiflight
    .venv/bin/python benches/anndata_compare.py   # writes the data once, if not yet there
    .venv/bin/python benches/request_latency.py [--storage dense-h5ad.h5ad] [--requests 30]

This script found the transparent huge pages behind dense h5ad's 0.1-0.4 s spikes (BENCHMARKS.md).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import pyarrow.flight as flight

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from anndata_compare import PREDICATE  # noqa: E402
from common import DEFAULT_BINARY, DEFAULT_DATA, register, serve, stop  # noqa: E402


def server_cpu(pid: int) -> float:
    """User plus system seconds the process has used (fields 14 and 15 of /proc/PID/stat)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default=DEFAULT_BINARY)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--storage", default="dense-h5ad.h5ad", help="a file in the AnnData bench data")
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    folders = sorted(pathlib.Path(args.data).glob("anndata-*"))
    if not folders or not (folders[0] / args.storage).exists():
        sys.exit(f"no {args.storage} under {args.data}/anndata-*: run benches/anndata_compare.py first")
    path = folders[0] / args.storage
    work = pathlib.Path(args.data) / f"artiflight-data-latency-{path.stem}"
    proc, url = serve(args.binary, work, path.parent)
    try:
        register(url, path, "latency")
        client = flight.connect(url)
        command = json.dumps({"key": "latency", "element": ["X"], "filter": PREDICATE})
        totals = []
        print(f"{path.name}: {args.requests} requests")
        print(f"{'#':>3} {'info ms':>8} {'DoGets ms':>10} {'server CPU ms':>14}")
        for i in range(args.requests):
            cpu = server_cpu(proc.pid)
            start = time.perf_counter()
            info = client.get_flight_info(flight.FlightDescriptor.for_command(command))
            planned = time.perf_counter()
            for endpoint in info.endpoints:
                client.do_get(endpoint.ticket).read_all()
            done = time.perf_counter()
            totals.append(done - start)
            print(f"{i:>3} {1e3 * (planned - start):>8.1f} {1e3 * (done - planned):>10.1f} "
                  f"{1e3 * (server_cpu(proc.pid) - cpu):>14.0f}")
        ms = sorted(1e3 * t for t in totals)
        print(f"total per request: median {statistics.median(ms):.1f} ms, "
              f"p90 {ms[int(0.9 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms")
    finally:
        stop(proc)


if __name__ == "__main__":
    sys.exit(main())
