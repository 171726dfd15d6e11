"""Tokens, roles, TLS and listening rules, with pyarrow.flight and the CLI as the clients."""

import json
import pathlib
import signal
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, Server, binary

TIMEOUT_S = 120


def cli(data_dir, *args, check=True, cwd=None):
    result = subprocess.run([binary(), "--data-dir", str(data_dir), *args],
                            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def create_token(data_dir, name, role):
    out = cli(data_dir, "token", "create", name, "--role", role).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture()
def auth_server(tmp_path):
    data = tmp_path / "data"
    tokens = {"reader": create_token(data, "reader", "read"), "writer": create_token(data, "writer", "write")}
    s = Server(tmp_path, "--auth")
    yield s, tokens
    s.stop()


def call_options(client, name, token):
    header = client.authenticate_basic_token(name.encode(), token.encode())
    return flight.FlightCallOptions(headers=[header])


def test_tokens_are_required_and_roles_are_kept(auth_server):
    server, tokens = auth_server
    client = server.client()
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(client.list_flights())
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(client.list_actions())
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.authenticate_basic_token(b"reader", b"afl_wrong")

    # Basic auth in the handshake answers with a bearer header that pyarrow sends from then on.
    read = call_options(client, "reader", tokens["reader"])
    keys = {i.descriptor.path[0].decode() for i in client.list_flights(options=read)}
    assert "sharded_parquet" in keys
    info = client.get_flight_info(flight.FlightDescriptor.for_path("sharded_parquet"), options=read)
    table = pa.concat_tables(client.do_get(e.ticket, options=read).read_all() for e in info.endpoints)
    assert table.num_rows == pq.read_table(DEMO).num_rows

    # A plain bearer header works as well.
    bearer = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {tokens['reader']}".encode())])
    assert list(client.list_flights(options=bearer))

    data = pa.table({"x": [1, 2, 3]})
    with pytest.raises(flight.FlightUnauthorizedError, match="write token"):
        writer, reader = client.do_put(flight.FlightDescriptor.for_path("uploaded"), data.schema, options=read)
        writer.write_table(data)
        writer.done_writing()
        reader.read()
        writer.close()
    body = json.dumps({"path": str(server.files), "key": "x"}).encode()
    with pytest.raises(flight.FlightUnauthorizedError):
        list(client.do_action(flight.Action("register", body), options=read))

    write = call_options(client, "writer", tokens["writer"])
    writer, reader = client.do_put(flight.FlightDescriptor.for_path("uploaded"), data.schema, options=write)
    writer.write_table(data)
    writer.done_writing()
    record = json.loads(reader.read().to_pybytes())
    writer.close()
    assert record["key"] == "uploaded" and record["n_observations"] == 3
    client.close()


def test_flight_sql_clients_log_in_with_the_token(auth_server):
    import adbc_driver_flightsql.dbapi as flight_sql
    from adbc_driver_manager import ProgrammingError, OperationalError
    server, tokens = auth_server
    # ADBC (and so BI tools) send user and password through the handshake, then the bearer.
    with flight_sql.connect(server.url, db_kwargs={"username": "reader", "password": tokens["reader"]},
                            autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) AS n FROM sharded_parquet WHERE louvain = 3")
        assert cur.fetch_arrow_table().column("n")[0].as_py() == pq.read_table(DEMO, filters=[("louvain", "=", 3)]).num_rows
    with pytest.raises((ProgrammingError, OperationalError), match="(?i)unauthenticated|token"):
        with flight_sql.connect(server.url, db_kwargs={"username": "reader", "password": "afl_wrong"},
                                autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")


def test_token_commands_never_show_tokens_and_revoke_takes_effect(auth_server):
    server, tokens = auth_server
    listing = cli(server.data_dir, "token", "list").stdout
    assert "reader" in listing and "read" in listing and "writer" in listing
    assert tokens["reader"] not in listing and tokens["writer"] not in listing
    # The catalog keeps hashes only.
    assert tokens["reader"].encode() not in (server.data_dir / "catalog.sqlite").read_bytes()
    duplicate = cli(server.data_dir, "token", "create", "reader", check=False)
    assert duplicate.returncode != 0 and "reader" in duplicate.stderr

    # The CLI as a client, with the token from the environment.
    env_get = subprocess.run(
        [binary(), "--server", server.url, "get", "sharded_parquet", "--filter", "louvain = 3"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env={"ARTIFLIGHT_TOKEN": tokens["reader"]})
    assert env_get.returncode == 0, env_get.stderr
    no_token = cli(server.data_dir, "--server", server.url, "ls", check=False)
    assert no_token.returncode != 0 and "Unauthenticated" in no_token.stderr

    client = server.client()
    read = call_options(client, "reader", tokens["reader"])
    cli(server.data_dir, "token", "revoke", "reader")
    deadline = time.monotonic() + 10
    while True:
        try:
            list(client.list_flights(options=read))
        except flight.FlightUnauthenticatedError:
            break
        assert time.monotonic() < deadline, "a revoked token still works after 10 s"
        time.sleep(0.1)
    client.close()


def test_the_python_package_sends_tokens_and_names_refusals(auth_server, monkeypatch):
    import artiflight

    server, tokens = auth_server
    with pytest.raises(PermissionError) as refused:
        artiflight.connect(server.url).artifacts()
    assert isinstance(refused.value, artiflight.UnauthenticatedError)
    reader = artiflight.connect(server.url, token=tokens["reader"])
    assert reader.artifact("sharded_parquet").open().count_rows() == pq.read_table(DEMO).num_rows
    with pytest.raises(PermissionError) as denied:
        reader.save(pa.table({"a": [1]}), "from_reader")
    assert isinstance(denied.value, artiflight.AccessDeniedError)
    monkeypatch.setenv("ARTIFLIGHT_TOKEN", tokens["writer"])
    writer = artiflight.connect(server.url)
    assert writer.save(pa.table({"a": [1]}), "from_writer").key == "from_writer"


def make_certificates(directory: pathlib.Path):
    """A CA and a server certificate for localhost and 127.0.0.1 that it signed."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=TIMEOUT_S)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=artiflight test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def test_tls_with_a_certificate_the_client_trusts(tmp_path):
    ca, cert, key = make_certificates(tmp_path)
    s = Server(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert s.url.startswith("grpc+tls://127.0.0.1:")
        client = flight.connect(s.url, tls_root_certs=ca.read_bytes())
        info = client.get_flight_info(flight.FlightDescriptor.for_path("sharded_parquet"))
        table = pa.concat_tables(client.do_get(e.ticket).read_all() for e in info.endpoints)
        assert table.num_rows == pq.read_table(DEMO).num_rows
        client.close()
        # A client that does not trust the CA is refused, and so is plain text.
        untrusting = flight.connect(s.url)
        with pytest.raises(flight.FlightUnavailableError):
            list(untrusting.list_flights())
        plain = flight.connect(s.url.replace("grpc+tls://", "grpc://"))
        with pytest.raises(flight.FlightUnavailableError):
            list(plain.list_flights())
        # The Python package, trusting the CA from its file.
        import artiflight
        assert artiflight.connect(s.url, tls_root_certs=str(ca)).artifact("sharded_parquet").open().count_rows() \
            == pq.read_table(DEMO).num_rows
        # The Rust client (the CLI) with --tls-ca.
        out = subprocess.run([binary(), "--server", s.url, "--tls-ca", str(ca), "ls"],
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        assert out.returncode == 0 and "sharded_parquet" in out.stdout, out.stderr
    finally:
        s.stop()


def test_non_loopback_addresses_need_auth_or_insecure(tmp_path):
    # The address is refused before anything binds it.
    result = subprocess.run([binary(), "--data-dir", str(tmp_path / "d"), "serve", "--addr", "0.0.0.0:0"],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    assert "--auth" in result.stderr and "--insecure" in result.stderr


def write_big_parquet(path: pathlib.Path, rows=2_000_000):
    ids = pa.array(range(rows), pa.int64())
    pq.write_table(pa.table({"id": ids, "v": pa.compute.multiply(ids, 2)}), path, row_group_size=100_000)


def test_sigterm_ends_streams_cleanly_and_exits_zero(tmp_path):
    s = Server(tmp_path, "--shutdown-grace", "1s")
    write_big_parquet(s.files / "big.parquet")
    client = s.client()
    body = json.dumps({"path": str(s.files / "big.parquet"), "key": "big"}).encode()
    list(client.do_action(flight.Action("register", body)))
    info = client.get_flight_info(flight.FlightDescriptor.for_path("big"))
    outcome = {}

    def slow_reader():
        try:
            reader = client.do_get(info.endpoints[0].ticket)
            for _ in range(10_000):
                reader.read_chunk()
                time.sleep(0.02)
        except StopIteration:
            outcome["ended"] = "complete"
        except flight.FlightUnavailableError as e:
            outcome["ended"] = f"unavailable: {e}"
        except Exception as e:  # noqa: BLE001 (any other end is the failure reported below)
            outcome["ended"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=slow_reader, daemon=True)
    thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=30) == 0, s.stderr()
    assert time.monotonic() - started < 10
    thread.join(30)
    # Five seconds of reading at this pace: the one-second grace ends it, saying why.
    assert outcome["ended"].startswith("unavailable") and "shutting down" in outcome["ended"], outcome
    client.close()
    # The catalog was closed cleanly: a new server on the same data dir has every record.
    again = Server(tmp_path)
    try:
        keys = {i.descriptor.path[0].decode() for i in again.client().list_flights()}
        assert {"big", "sharded_parquet"} <= keys
    finally:
        again.stop()
