"""Case 7 of the benchmark harness: start-up and catalog at scale (absolute targets, no peer).

- the server answers within 1 s of start with `--artifacts` (10,000) registered artifacts;
- ListFlights of all of them in under 100 ms;
- registering a folder of `--folder-shards` (1,000) parquet shards takes seconds, not minutes.

    cargo build --release --bin artiflight
    .venv/bin/python benches/catalog_bench.py [--artifacts 10000] [--folder-shards 1000]
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import DEFAULT_BINARY, DEFAULT_DATA, Row, print_rows, register, serve, stop  # noqa: E402

START_TIMEOUT_S = 60


def small_files(root: pathlib.Path, n: int) -> pathlib.Path:
    """`n` distinct one-row-group parquet files (distinct content, so each registers anew)."""
    target = root / f"catalog-files-{n}"
    if (target / "_done").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pq.write_table(pa.table({"i": [i], "x": [float(i)]}), target / f"f{i:06d}.parquet")
    (target / "_done").write_text("ok")
    return target


def shard_folder(root: pathlib.Path, n: int) -> pathlib.Path:
    target = root / f"catalog-shards-{n}"
    if (target / "_done").exists():
        return target
    rng = np.random.default_rng(1)
    for i in range(n):
        out = target / f"part={i}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"v": rng.random(100)}), out / "data.parquet")
    (target / "_done").write_text("ok")
    return target


def populated_data_dir(binary: str, root: pathlib.Path, files: pathlib.Path, n: int) -> pathlib.Path:
    """A data dir whose catalog holds the `n` files, registered once and kept between runs."""
    data_dir = root / f"artiflight-data-catalog-{n}"
    if (data_dir / "_done").exists():
        return data_dir
    proc, url = serve(binary, data_dir, files)
    try:
        client = flight.connect(url)
        start = time.perf_counter()
        for i, path in enumerate(sorted(files.glob("*.parquet"))):
            body = json.dumps({"path": str(path), "key": f"a{i:06d}"}).encode()
            list(client.do_action(flight.Action("register", body)))
        print(f"registered {n} artifacts one by one in {time.perf_counter() - start:.1f} s", flush=True)
        client.close()
    finally:
        stop(proc)
    (data_dir / "_done").write_text("ok")
    return data_dir


def time_to_answer(binary: str, data_dir: pathlib.Path, root: pathlib.Path) -> tuple[float, subprocess.Popen, str]:
    """From spawning the server to its first answered GetFlightInfo."""
    start = time.perf_counter()
    proc, url = serve(binary, data_dir, root)
    client = flight.connect(url)
    deadline = start + START_TIMEOUT_S
    while True:
        try:
            client.get_flight_info(flight.FlightDescriptor.for_path("a000000"))
            break
        except flight.FlightUnavailableError:
            if time.perf_counter() > deadline:
                raise
            time.sleep(0.005)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed, proc, url


def run(args) -> list[Row]:
    root = pathlib.Path(args.data)
    files = small_files(root, args.artifacts)
    data_dir = populated_data_dir(args.binary, root, files, args.artifacts)
    rows = []
    started, proc, url = time_to_answer(args.binary, data_dir, files)
    try:
        rows.append(Row(f"7 catalog of {args.artifacts:,}", "start to first answer, s", started, None,
                        "s", "<= 1.0"))
        client = flight.connect(url)
        listed, times = 0, []
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            listed = sum(1 for _ in client.list_flights())
            times.append(time.perf_counter() - t0)
        assert listed >= args.artifacts, listed
        rows.append(Row(f"7 catalog of {args.artifacts:,}", "ListFlights of all, s", min(times), None,
                        "s", "<= 0.1", "", f"{listed} flights"))
        client.close()
    finally:
        stop(proc)

    folder = shard_folder(root, args.folder_shards)
    scratch = tempfile.TemporaryDirectory(dir=root)
    proc, url = serve(args.binary, pathlib.Path(scratch.name) / "data", folder)
    try:
        t0 = time.perf_counter()
        record = register(url, folder, "shards")
        secs = time.perf_counter() - t0
        assert record["n_files"] == args.folder_shards, record
        rows.append(Row(f"7 register {args.folder_shards:,} shards", "register action, s", secs, None,
                        "s", "<= 10"))
    finally:
        stop(proc)
        scratch.cleanup()
    return rows


def add_args(parser: argparse.ArgumentParser):
    parser.add_argument("--artifacts", type=int, default=10_000)
    parser.add_argument("--folder-shards", type=int, default=1_000)


def main():
    parser = argparse.ArgumentParser()
    add_args(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--binary", default=DEFAULT_BINARY)
    parser.add_argument("--data", default=DEFAULT_DATA)
    print_rows(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
