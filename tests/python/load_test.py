"""A bounded load test on loopback: many clients for a while, mixing ListFlights, GetFlightInfo,
DoGet (whole, and abandoned after one batch) and garbage requests, against one server.

It passes when no good request failed, every garbage request got its client-error status, the
server's peak RSS stayed under the bound, and its open file descriptors came back to where they
were. `pytest` runs it small (tests/python/test_load.py); the full size is

    .venv/bin/python tests/python/load_test.py --clients 64 --seconds 60

which prints the figures recorded in RELIABILITY.md.
"""

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from conftest import Server  # noqa: E402

GOOD = ("list", "info", "get", "get_abandoned", "sql_like_filter")
GARBAGE = ("bad_json", "unknown_field", "bad_filter", "unknown_key", "bad_ticket", "bad_action")
# The statuses that garbage must get: INVALID_ARGUMENT (ArrowInvalid) or NOT_FOUND (KeyError).
CLIENT_ERRORS = (pa.ArrowInvalid, KeyError)


def rss_kib(pid):
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def command(**fields):
    return flight.FlightDescriptor.for_command(json.dumps(fields))


class Worker(threading.Thread):
    def __init__(self, url, seed, deadline, max_ops, expected_rows):
        super().__init__(daemon=True)
        self.url, self.rng, self.deadline, self.max_ops = url, random.Random(seed), deadline, max_ops
        self.expected_rows = expected_rows
        self.latencies = {op: [] for op in GOOD + GARBAGE}
        self.failures = []

    def run(self):
        client = flight.connect(self.url)
        try:
            for _ in range(self.max_ops):
                if time.monotonic() > self.deadline:
                    break
                op = self.rng.choice(GOOD + GARBAGE) if self.rng.random() < 0.3 else self.rng.choice(GOOD)
                started = time.perf_counter()
                try:
                    getattr(self, op)(client)
                    if op in GARBAGE:
                        self.failures.append(f"{op}: garbage was accepted")
                except CLIENT_ERRORS as e:
                    if op in GOOD:
                        self.failures.append(f"{op}: {type(e).__name__}: {e}")
                except Exception as e:  # noqa: BLE001 (every other outcome is a failure)
                    self.failures.append(f"{op}: {type(e).__name__}: {e}")
                self.latencies[op].append(time.perf_counter() - started)
        finally:
            client.close()

    def list(self, client):
        assert len(list(client.list_flights())) >= 2

    def info(self, client):
        info = client.get_flight_info(flight.FlightDescriptor.for_path("load"))
        assert info.total_records == self.expected_rows

    def get(self, client):
        info = client.get_flight_info(command(key="load", filter=f"g = {self.rng.randrange(10)}"))
        rows = sum(client.do_get(e.ticket).read_all().num_rows for e in info.endpoints)
        assert rows == self.expected_rows // 10, rows

    def get_abandoned(self, client):
        info = client.get_flight_info(flight.FlightDescriptor.for_path("load"))
        reader = client.do_get(info.endpoints[0].ticket)
        reader.read_chunk()
        reader.cancel()

    def sql_like_filter(self, client):
        info = client.get_flight_info(command(key="sharded_parquet", filter="louvain IN (1, 2) AND n_genes > 700",
                                              columns=["n_genes"]))
        assert sum(client.do_get(e.ticket).read_all().num_rows for e in info.endpoints) > 0

    def bad_json(self, client):
        client.get_flight_info(flight.FlightDescriptor.for_command(bytes(self.rng.randbytes(40))))

    def unknown_field(self, client):
        client.get_flight_info(command(key="load", colums=["g"]))

    def bad_filter(self, client):
        client.get_flight_info(command(key="load", filter=self.rng.choice(["g = = 1", "nope > 1", "g IN ("])))

    def unknown_key(self, client):
        client.get_flight_info(flight.FlightDescriptor.for_path(f"missing-{self.rng.randrange(1000)}"))

    def bad_ticket(self, client):
        client.do_get(flight.Ticket(self.rng.randbytes(self.rng.randrange(1, 200)))).read_all()

    def bad_action(self, client):
        list(client.do_action(flight.Action("describe", b"{not json")))


def run(clients=8, seconds=5.0, max_ops=100_000, rss_bound_mib=2048, data_dir=None):
    tmp = pathlib.Path(data_dir or tempfile.mkdtemp(prefix="artiflight-load-"))
    server = Server(tmp)
    try:
        rows = 200_000
        table = pa.table({"id": pa.array(range(rows), pa.int64()), "g": pa.array([i % 10 for i in range(rows)], pa.int32()),
                          "s": pa.array([f"row{i}" for i in range(rows)])})
        pq.write_table(table, server.files / "load.parquet", row_group_size=20_000)
        c = server.client()
        body = json.dumps({"path": str(server.files / "load.parquet"), "key": "load"}).encode()
        list(c.do_action(flight.Action("register", body)))
        c.close()
        pid = server.proc.pid
        # One short warm-up, so that the baseline counts the pools every server keeps.
        Worker(server.url, 0, time.monotonic() + 1, 50, rows).run()
        fds_before, rss_before = open_fds(pid), rss_kib(pid)
        peak = [rss_before]
        deadline = time.monotonic() + seconds
        stop = threading.Event()

        def sample():
            while not stop.wait(0.2):
                peak[0] = max(peak[0], rss_kib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        workers = [Worker(server.url, seed, deadline, max_ops, rows) for seed in range(1, clients + 1)]
        started = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join(seconds + 120)
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join(5)
        # Connections close and streams end asynchronously: give them a moment, bounded.
        fds_after = open_fds(pid)
        for _ in range(50):
            if fds_after <= fds_before + 4:
                break
            time.sleep(0.1)
            fds_after = open_fds(pid)
        alive = server.proc.poll() is None
        latencies = {op: [t for w in workers for t in w.latencies[op]] for op in GOOD + GARBAGE}
        failures = [f for w in workers for f in w.failures]
        report = {
            "clients": clients, "seconds": round(elapsed, 1),
            "requests": sum(len(v) for v in latencies.values()),
            "good": sum(len(latencies[op]) for op in GOOD),
            "garbage": sum(len(latencies[op]) for op in GARBAGE),
            "failed": len(failures), "failures": failures[:10],
            "rss_mib_before": round(rss_before / 1024, 1), "rss_mib_peak": round(peak[0] / 1024, 1),
            "fds_before": fds_before, "fds_after": fds_after, "server_alive": alive,
            "latency_ms": {op: {"n": len(v), "p50": round(statistics.median(v) * 1000, 1),
                                "p99": round(sorted(v)[int(len(v) * 0.99) - 1 if len(v) > 1 else 0] * 1000, 1)}
                           for op, v in latencies.items() if v},
        }
        report["ok"] = (alive and not failures and peak[0] / 1024 < rss_bound_mib
                        and fds_after <= fds_before + 4 and report["good"] > 0)
        return report
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rss-bound-mib", type=float, default=2048)
    args = parser.parse_args()
    report = run(args.clients, args.seconds, rss_bound_mib=args.rss_bound_mib)
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
