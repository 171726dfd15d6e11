"""What the benchmark scripts share: starting the server, timing, memory, and result rows."""

import dataclasses
import json
import os
import pathlib
import resource
import subprocess
import time

import pyarrow.flight as flight

REPO = pathlib.Path(__file__).resolve().parents[1]
# Where `cargo build --release` puts the binary (CARGO_TARGET_DIR moves it, as CI does).
DEFAULT_BINARY = str(pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target") / "release" / "artiflight")
DEFAULT_DATA = str(REPO / "bench-data")


@dataclasses.dataclass
class Row:
    """One measured figure next to its peer's, for the harness's summary table."""

    case: str
    measure: str
    ours: float
    peer: float | None
    unit: str
    # "ours / peer" is the ratio; `target` says which side of it is good, e.g. "<= 0.5" or ">= 1.5".
    target: str = ""
    peer_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.peer else self.ours / self.peer

    @property
    def met(self) -> str:
        """Against the target: the ratio when there is a peer, else our own figure."""
        if not self.target:
            return ""
        op, bound = self.target.split()
        value = self.ratio if self.peer is not None else self.ours
        if value is None:
            return ""
        ok = value <= float(bound) if op == "<=" else value >= float(bound)
        return "yes" if ok else "MISSED"


def print_rows(rows: list[Row]):
    print(f"{'case':<36} {'measure':<46} {'ours':>10} {'peer':>10} {'unit':<5} {'ratio':>6} "
          f"{'target':>8} {'met':>6}  peer / note")
    for r in rows:
        peer = f"{r.peer:>10.3f}" if r.peer is not None else f"{'':>10}"
        ratio = f"{r.ratio:>6.2f}" if r.ratio is not None else f"{'':>6}"
        print(f"{r.case:<36} {r.measure:<46} {r.ours:>10.3f} {peer} {r.unit:<5} {ratio} "
              f"{r.target:>8} {r.met:>6}  {'; '.join(x for x in [r.peer_name, r.note] if x)}")


def serve(binary: str, data_dir: pathlib.Path, root: pathlib.Path, *extra: str):
    """Starts artiflight on an ephemeral loopback port, reading under `root`; returns the process
    and its URL."""
    proc = subprocess.Popen(
        [binary, "serve", "--addr", "127.0.0.1:0", "--data-dir", str(data_dir),
         "--allow-root", str(root), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("artiflight listening on "):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, line.split()[-1]


def register(url: str, path: pathlib.Path, key: str) -> dict:
    client = flight.connect(url)
    body = json.dumps({"path": str(path), "key": key}).encode()
    result = list(client.do_action(flight.Action("register", body)))
    client.close()
    return json.loads(result[0].body.to_pybytes())


def stop(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def best(fn, repeat: int):
    """The fastest of `repeat` runs of `fn`, which returns a tuple starting with seconds."""
    runs = [fn() for _ in range(max(1, repeat))]
    return min(runs, key=lambda r: r[0])


def timed(fn):
    """Runs `fn`; returns (seconds, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(list(pathlib.Path(f"/proc/{pid}/fd").iterdir()))


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user and system, all threads) of this process, plus that of process `pid`: the
    benchmark's clients and in-process peers run here, our server in its own process."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    if pid is not None:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def cpu_per_gb(fn, repeat: int, pid: int | None = None) -> float:
    """Core-seconds per GB over `repeat` runs of `fn`, which returns (seconds, rows, bytes):
    client and server together, since on one machine they share the cores."""
    before = cpu_seconds(pid)
    nbytes = sum(fn()[2] for _ in range(max(1, repeat)))
    return (cpu_seconds(pid) - before) / (nbytes / 1e9)
