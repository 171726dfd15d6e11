"""Fixtures: a real artiflight server binary on 127.0.0.1 with an ephemeral port."""

import os
import pathlib
import shutil
import subprocess
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
