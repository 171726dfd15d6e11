"""Fixtures: a real artiflight server binary on 127.0.0.1 with an ephemeral port."""

import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time

import pyarrow.flight as flight
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO = REPO / "demo" / "sharded_parquet"
START_TIMEOUT_S = 120


def binary() -> str:
    path = os.environ.get("ARTIFLIGHT_BIN") or str(REPO / "target" / "debug" / "artiflight")
    if not pathlib.Path(path).exists():
        pytest.fail(f"artiflight binary not found at {path}: run `cargo build` or scripts/test.sh")
    return path


class Server:
    def __init__(self, tmp: pathlib.Path, *args: str, env: dict | None = None, partitions: int = 2,
                 data_dir: pathlib.Path | None = None):
        self.tmp = tmp
        self.data_dir = data_dir or tmp / "data"
        self.files = tmp / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        # A file, not a pipe: a pipe nobody reads fills up and stops a talkative server.
        self.log_path = tmp / f"server-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [binary(), "serve", "--addr", "127.0.0.1:0", "--demo", "--data-dir", str(self.data_dir),
             # Endpoint counts follow the partitions: fixed, so tests do not depend on the machine.
             "--target-partitions", str(partitions),
             "--allow-root", str(self.files), *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=tmp,
            env={**os.environ, **(env or {})},
        )
        line = self._first_line()
        if not line.startswith("artiflight listening on "):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}\n{self.stderr()}")
        self.url = line.split()[-1]

    def _first_line(self) -> str:
        result = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(START_TIMEOUT_S)
        return result[0].strip() if result else ""

    def stderr(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def client(self) -> flight.FlightClient:
        return flight.connect(self.url)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(*buckets: str):
    """A real S3-compatible server (moto) on a free loopback port with `buckets` made. Yields its
    port and a boto3 client for it."""
    import boto3

    port = free_port()
    moto = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and moto.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield port, client
    finally:
        moto.terminate()
        moto.wait(timeout=30)


# What a server needs to reach an S3 server (moto or SeaweedFS) on loopback `port`.
def s3_env(port: int) -> dict:
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"}


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("artiflight"))
    # A copy of the demo folder inside an allowed root, for tests that register through the server.
    shutil.copytree(DEMO, s.files / "sharded_parquet")
    yield s
    s.stop()
    assert s.proc.returncode == 0, f"server exited with {s.proc.returncode}"


@pytest.fixture()
def client(server):
    c = server.client()
    yield c
    c.close()
