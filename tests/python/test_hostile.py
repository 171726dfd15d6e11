"""No input can stop, exhaust or escape the server (SPEC section 10). Each test sends the hostile
input from a real client (pyarrow.flight, ADBC, raw sockets) and checks that the server is alive,
answers the next request, and stayed inside its bounds (peak RSS from /proc, time)."""

import json
import os
import pathlib
import socket
import struct
import subprocess
import threading
import time

import adbc_driver_flightsql.dbapi as flight_sql
import anndata as ad
import h5py
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import Server, binary
from test_security import create_token, make_certificates, write_big_parquet

TIMEOUT_S = 120


def peak_rss_mb(server) -> float:
    """The server's peak resident memory (VmHWM), in MB."""
    for line in pathlib.Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def alive(server):
    """The server answers a real request after whatever came before."""
    assert server.proc.poll() is None, f"the server exited:\n{server.stderr()[-3000:]}"
    client = server.client()
    table = client.do_get(
        client.get_flight_info(flight.FlightDescriptor.for_path("sharded_parquet")).endpoints[0].ticket
    ).read_all()
    assert table.num_rows > 0
    client.close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("hostile"), "--max-query-memory", "64MiB")
    yield s
    s.stop()


# Protobuf by hand: the few messages these tests forge.
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def lying_lz4_parameters() -> bytes:
    """An IPC stream of one LZ4 batch whose data buffer claims 2^62 uncompressed bytes."""
    batch = pa.record_batch({"$1": pa.array(np.zeros(1000, dtype=np.int64))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_batch(batch)
    data = bytearray(sink.getvalue().to_pybytes())
    # A compressed buffer starts with its uncompressed length, an int64: 8,000 for the data.
    prefix = struct.pack("<q", 8000)
    at = data.find(prefix)
    assert at > 0 and data.find(prefix, at + 1) == -1, "the data buffer's length prefix"
    data[at:at + 8] = struct.pack("<q", 1 << 62)
    return bytes(data)


def test_a_lying_compressed_batch_is_refused_and_the_server_lives(hostile):
    statement = field(1, 1) + field(2, b"SELECT $1") + field(3, lying_lz4_parameters())
    command = field(1, statement)
    any_ = field(1, b"type.googleapis.com/arrow.flight.protocol.sql.CommandPreparedStatementQuery") + \
        field(2, command)
    client = hostile.client()
    with pytest.raises(pa.ArrowInvalid, match="compressed"):
        client.get_flight_info(flight.FlightDescriptor.for_command(any_))
    # The same batch, compressed honestly, in a DoPut: refused before decoding.
    table = pa.table({"x": np.arange(1000)})
    options = flight.FlightCallOptions(write_options=pa.ipc.IpcWriteOptions(compression="zstd"))
    writer, reader = client.do_put(flight.FlightDescriptor.for_path("zstd_upload"), table.schema, options=options)
    with pytest.raises(pa.ArrowInvalid, match="compressed"):
        writer.write_table(table)
        writer.done_writing()
        reader.read()
        writer.close()
    alive(hostile)


def test_query_memory_is_bounded_and_spills(hostile):
    before = peak_rss_mb(hostile)
    with flight_sql.connect(hostile.url, autocommit=True) as conn, conn.cursor() as cur:
        # Ten million groups: unbounded, this took the server past 900 MB.
        try:
            cur.execute("SELECT v % 10000000 AS g, count(*) FROM generate_series(1, 10000000) t(v) "
                        "GROUP BY g ORDER BY g DESC LIMIT 3")
            rows = cur.fetchall()
            assert rows[0][0] == 9999999
        except Exception as e:  # a bound too small to spill into is RESOURCE_EXHAUSTED, named
            assert "--max-query-memory" in str(e), e
    after = peak_rss_mb(hostile)
    print(f"peak RSS {before:.0f} MB -> {after:.0f} MB with --max-query-memory 64MiB")
    assert after - before < 400, f"peak RSS grew {after - before:.0f} MB under a 64 MiB bound"
    alive(hostile)


def test_a_query_longer_than_max_query_time_ends(tmp_path):
    s = Server(tmp_path, "--max-query-time", "2s")
    try:
        start = time.monotonic()
        with flight_sql.connect(s.url, autocommit=True) as conn, conn.cursor() as cur:
            with pytest.raises(Exception, match="--max-query-time"):
                cur.execute("SELECT count(*) FROM generate_series(1, 9223372036854775807)")
                cur.fetchall()
        assert time.monotonic() - start < 30
        alive(s)
    finally:
        s.stop()


def test_a_shape_bomb_fails_its_request_and_never_stalls_listing(hostile):
    # A real store registered, then its metadata rewritten to claim 10^15 cells.
    path = hostile.files / "bomb.zarr"
    adata = ad.AnnData(X=np.ones((20, 3), dtype=np.float32))
    adata.obs_names = [f"c{i}" for i in range(20)]
    adata.write_zarr(path)
    client = hostile.client()
    list(client.do_action(flight.Action("register", json.dumps({"path": str(path), "key": "bomb.zarr"}).encode())))
    huge = 10**15

    def claim(meta):
        if isinstance(meta, dict):
            if (meta.get("shape") or [None])[0] == 20:
                meta["shape"][0] = huge
            for value in meta.values():
                claim(value)

    for meta in path.rglob("*"):
        if meta.name in (".zarray", ".zmetadata"):
            document = json.loads(meta.read_text())
            claim(document)
            meta.write_text(json.dumps(document))
    assert str(huge) in (path / "X" / ".zarray").read_text()
    start = time.monotonic()
    listed = list(client.list_flights())
    assert any(f.descriptor.path == [b"bomb.zarr"] for f in listed)
    assert time.monotonic() - start < 30, "ListFlights stalled on one bad entry"
    for element in (["obs"], ["X"]):
        with pytest.raises(flight.FlightError, match="declares shape|larger than"):
            cmd = json.dumps({"key": "bomb.zarr", "element": element})
            info = client.get_flight_info(flight.FlightDescriptor.for_command(cmd))
            for e in info.endpoints:
                client.do_get(e.ticket).read_all()
    # Registering such a store is refused outright.
    with pytest.raises(flight.FlightError, match="declares shape"):
        list(client.do_action(flight.Action("register", json.dumps({"path": str(path), "key": "bomb2.zarr"}).encode())))
    assert time.monotonic() - start < 60
    alive(hostile)


def test_hdf5_links_out_of_the_roots_are_refused(hostile, tmp_path):
    secret = tmp_path / "secret.bin"  # outside every allowed root
    secret.write_bytes(b"TOP SECRET DATA!" * 4)
    cases = {}
    path = hostile.files / "external_raw.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("stolen", shape=(64,), dtype="u1", external=[(str(secret), 0, 64)])
    cases["external_raw.h5"] = "external files"
    path = hostile.files / "external_link.h5"
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = np.arange(10)
    with h5py.File(path, "w") as f:
        f["here"] = np.arange(3)
        f["elsewhere"] = h5py.ExternalLink(str(other), "/data")
    cases["external_link.h5"] = "external link"
    path = hostile.files / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(10,), dtype="i8")
    layout[:] = h5py.VirtualSource(str(other), "data", shape=(10,))
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("mapped", layout)
    cases["virtual.h5"] = "virtual dataset"
    client = hostile.client()
    for name, what in cases.items():
        body = json.dumps({"path": str(hostile.files / name), "key": name}).encode()
        with pytest.raises(flight.FlightUnauthorizedError, match=what) as raised:
            list(client.do_action(flight.Action("register", body)))
        assert "TOP SECRET" not in str(raised.value)
    alive(hostile)


def test_a_stalled_reader_loses_its_slot(tmp_path):
    s = Server(tmp_path, "--max-streams", "1", "--stall-timeout", "1s", "--queue-timeout", "20s")
    try:
        write_big_parquet(s.files / "big.parquet", rows=4_000_000)
        client = s.client()
        body = json.dumps({"path": str(s.files / "big.parquet"), "key": "big"}).encode()
        list(client.do_action(flight.Action("register", body)))
        info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps({"key": "big"})))
        stalled = client.do_get(info.endpoints[0].ticket)
        stalled.read_chunk()  # then nothing: its 64 MB cannot all fit in the client's buffers
        start = time.monotonic()
        other = s.client()
        table = other.do_get(other.get_flight_info(flight.FlightDescriptor.for_path("sharded_parquet"))
                             .endpoints[0].ticket).read_all()
        waited = time.monotonic() - start
        assert table.num_rows > 0
        print(f"the slot came free after {waited:.1f} s (--stall-timeout 1s)")
        assert waited < 15
        with pytest.raises(flight.FlightError):
            stalled.read_all()
        alive(s)
    finally:
        s.stop()


def test_a_tls_handshake_that_never_finishes_is_dropped(tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    s = Server(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        host, port = s.url.removeprefix("grpc+tls://").rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=30)
        start = time.monotonic()
        try:
            assert sock.recv(1) == b"", "the server kept a silent connection"
        except ConnectionResetError:
            pass
        print(f"silent TLS connection dropped after {time.monotonic() - start:.1f} s")
        sock.close()
    finally:
        s.stop()


def test_tokens_are_checked_before_the_body_is_read(tmp_path):
    data = tmp_path / "data"
    create_token(data, "reader", "read")
    s = Server(tmp_path, "--auth", "--max-message-size", "512MiB")
    try:
        before = peak_rss_mb(s)
        client = s.client()
        big = pa.table({"x": np.zeros(40_000_000, dtype=np.int64)})  # 320 MB in one message
        with pytest.raises(flight.FlightUnauthenticatedError):
            writer, reader = client.do_put(flight.FlightDescriptor.for_path("nope"), big.schema)
            writer.write_table(big, max_chunksize=40_000_000)
            writer.done_writing()
            reader.read()
            writer.close()
        grew = peak_rss_mb(s) - before
        print(f"an unauthenticated 320 MB upload grew the server's peak RSS by {grew:.0f} MB")
        assert grew < 100
        assert s.proc.poll() is None
    finally:
        s.stop()


def test_a_connection_is_told_its_stream_bound(hostile):
    """The HTTP/2 SETTINGS the server sends bound the calls one connection may run at once."""
    host, port = hostile.url.removeprefix("grpc://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        header = sock.recv(9, socket.MSG_WAITALL)
        length, kind = int.from_bytes(header[:3], "big"), header[3]
        assert kind == 4, "the server's first frame is SETTINGS"
        payload = sock.recv(length, socket.MSG_WAITALL)
    settings = {int.from_bytes(payload[i:i + 2], "big"): int.from_bytes(payload[i + 2:i + 6], "big")
                for i in range(0, len(payload), 6)}
    assert settings.get(3) == 100, settings  # SETTINGS_MAX_CONCURRENT_STREAMS


def test_a_forged_ticket_naming_many_uids_is_refused_fast(hostile):
    command = json.dumps({"key": "sharded_parquet"}).encode()
    uids = b"".join(field(3, b"%020d" % i) for i in range(200_000))
    ticket = field(1, 1) + field(2, command) + uids + field(4, 0) + field(5, 1)
    client = hostile.client()
    start = time.monotonic()
    with pytest.raises(pa.ArrowInvalid, match="at most"):
        client.do_get(flight.Ticket(ticket)).read_all()
    assert time.monotonic() - start < 10
    alive(hostile)


def test_errors_do_not_show_the_servers_paths(hostile):
    shards = hostile.files / "corrupt_shards"
    shards.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"x": np.arange(100) + i}), shards / f"part-{i}.parquet")
    client = hostile.client()
    list(client.do_action(flight.Action("register", json.dumps({"path": str(shards), "key": "corrupt"}).encode())))
    (shards / "part-1.parquet").write_bytes(b"PAR1" + b"\x00" * 100 + b"PAR1")
    with pytest.raises(flight.FlightError) as raised:
        info = client.get_flight_info(flight.FlightDescriptor.for_path("corrupt"))
        for e in info.endpoints:
            client.do_get(e.ticket).read_all()
    message = str(raised.value)
    assert str(hostile.tmp) not in message and "file://" not in message, message
    assert "corrupt" in message or "part-1.parquet" in message, message
    alive(hostile)


def test_commands_other_than_serve_leave_the_servers_cache_alone(tmp_path):
    data = tmp_path / "data"
    cache = data / "cache"
    cache.mkdir(parents=True)
    (cache / ".tmp-in-progress").write_bytes(b"x" * 1000)
    (cache / "entry").write_bytes(b"y" * 1000)
    out = subprocess.run([binary(), "--data-dir", str(data), "ls"], capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    assert (cache / ".tmp-in-progress").exists() and (cache / "entry").exists()
