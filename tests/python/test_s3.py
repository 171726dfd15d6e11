"""Artifacts in S3: a real S3-compatible server (moto) on loopback, behind a counting proxy, so
that the requests and bytes the server fetched show that pushdown holds remotely. Answers are
compared with pyarrow.dataset and anndata reading the local copies."""

import http.client
import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import anndata as ad
import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, Server, binary, moto_server, s3_env

BUCKET = "artifacts"
START_TIMEOUT_S = 60


class CountingProxy:
    """Forwards HTTP to the S3 server and records each request: method, object key, range, bytes."""

    def __init__(self, upstream_port):
        self.requests = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                # A HEAD answer's length is the object's, not its (empty) body's.
                length = answer.getheader("Content-Length") if self.command == "HEAD" else len(data)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                url = urllib.parse.urlparse(self.path)
                with proxy.lock:
                    proxy.requests.append({
                        "method": self.command,
                        "key": urllib.parse.unquote(url.path.removeprefix(f"/{BUCKET}").lstrip("/")),
                        "query": url.query,
                        "range": self.headers.get("Range"),
                        "bytes": len(data) if self.command != "HEAD" else 0,
                    })

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def take(self):
        with self.lock:
            taken, self.requests = self.requests, []
        return taken


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server(BUCKET) as (port, client):
        proxy = CountingProxy(port)
        local = tmp_path_factory.mktemp("s3-local")
        yield {"client": client, "proxy": proxy, "local": local, "env": s3_env(proxy.port)}
        proxy.httpd.shutdown()


def upload(s3, local: pathlib.Path, prefix: str):
    paths = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for path in paths:
        key = prefix if local.is_file() else f"{prefix}/{path.relative_to(local).as_posix()}"
        s3["client"].upload_file(str(path), BUCKET, key)


def s3_server(s3, tmp_path_factory, name, cache_size):
    server = Server(tmp_path_factory.mktemp(name), "--allow-root", f"s3://{BUCKET}/allowed",
                    "--cache-size", cache_size, env=s3["env"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_server(s3, tmp_path_factory):
    """Without the range cache: what the proxy counts is what each request reads from storage."""
    yield from s3_server(s3, tmp_path_factory, "s3-server", "0")


@pytest.fixture(scope="module")
def cached_server(s3, tmp_path_factory):
    """With the range cache, as servers run by default."""
    yield from s3_server(s3, tmp_path_factory, "s3-cached", "256MiB")


def register(client, path, key):
    body = json.dumps({"path": path, "key": key}).encode()
    return json.loads(next(iter(client.do_action(flight.Action("register", body)))).body.to_pybytes())


def read(client, **command):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command)))
    return pa.concat_tables([client.do_get(e.ticket).read_all() for e in info.endpoints]), info


def test_sharded_parquet_from_s3_equals_the_local_copy(s3, remote_server, tmp_path):
    # The demo's shards with one more column: content the server has not registered locally
    # (known content would return its first record).
    shards = tmp_path / "shards"
    demo = ds.dataset(DEMO, format="parquet", partitioning="hive").to_table()
    demo = demo.append_column("remote", pa.array([True] * demo.num_rows))
    ds.write_dataset(demo, shards, format="parquet", partitioning=["louvain"], partitioning_flavor="hive")
    upload(s3, shards, "allowed/sharded_parquet")
    client = remote_server.client()
    record = register(client, f"s3://{BUCKET}/allowed/sharded_parquet/", "remote_shards")
    assert record["n_files"] == 11 and record["storage"] == f"s3://{BUCKET}/allowed"
    local = ds.dataset(shards, format="parquet", partitioning="hive")
    table, info = read(client, key="remote_shards")
    assert len(info.endpoints) >= 2
    assert table.num_rows == local.count_rows() == record["n_observations"]
    predicate = "cell_type IN ('Dendritic cells', 'CD14+ Monocytes') AND percent_mito <= 0.05"
    got, _ = read(client, key="remote_shards", filter=predicate, columns=["cell_type", "n_genes", "louvain"])
    want = local.to_table(filter=pc.field("cell_type").isin(["Dendritic cells", "CD14+ Monocytes"])
                          & (pc.field("percent_mito") <= 0.05), columns=["cell_type", "n_genes", "louvain"])
    key = lambda t: sorted(zip(t.column("n_genes").to_pylist(), t.column("louvain").to_pylist()))  # noqa: E731
    assert got.num_rows == want.num_rows > 0 and key(got) == key(want)
    # Partition pruning: a filter on louvain opens only that shard's object.
    s3["proxy"].take()
    read(client, key="remote_shards", filter="louvain = 3")
    touched = {r["key"].split("/")[2] for r in s3["proxy"].take() if r["method"] == "GET" and r["range"]}
    assert touched == {"louvain=3"}, touched
    client.close()


def test_parquet_pushdown_holds_remotely(s3, remote_server, tmp_path):
    n = 1_000_000
    ids = pa.array(np.arange(n, dtype=np.int64))
    columns = {"id": ids, **{f"c{i}": pa.array(np.random.default_rng(i).random(n)) for i in range(9)}}
    path = tmp_path / "sorted.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=50_000)
    size = path.stat().st_size
    upload(s3, path, "allowed/sorted.parquet")
    client = remote_server.client()
    register(client, f"s3://{BUCKET}/allowed/sorted.parquet", "remote_sorted")
    meta = pq.ParquetFile(path).metadata

    s3["proxy"].take()
    got, _ = read(client, key="remote_sorted", filter="id >= 500000 AND id < 510000")
    gets = [r for r in s3["proxy"].take() if r["method"] == "GET"]
    assert got.column("id").to_pylist() == list(range(500_000, 510_000))
    assert all(r["range"] for r in gets), "every read is a ranged read"
    fetched = sum(r["bytes"] for r in gets)
    one_group = sum(meta.row_group(10).column(c).total_compressed_size for c in range(10))
    print(f"1 % filter: {len(gets)} ranged GETs, {fetched} bytes of a {size}-byte file (one row group: {one_group})")
    # The footer and one row group of twenty, not the file.
    assert fetched < one_group + 2 * 1024 * 1024, (fetched, one_group, size)
    assert fetched < size / 8

    s3["proxy"].take()
    got, _ = read(client, key="remote_sorted", columns=["c3"])
    gets = [r for r in s3["proxy"].take() if r["method"] == "GET"]
    assert got.num_rows == n and got.column_names == ["c3"]
    fetched = sum(r["bytes"] for r in gets)
    c3 = sum(meta.row_group(g).column(4).total_compressed_size for g in range(meta.num_row_groups))
    print(f"1 of 10 columns: {len(gets)} ranged GETs, {fetched} bytes of {size} (that column: {c3})")
    # That column's chunks, and the footer; the other nine columns stay in storage. Row group 10's
    # chunk may come from the range cache: the filtered read above fetched it, and the cache
    # keeps it once its background write lands.
    cached = meta.row_group(10).column(4).total_compressed_size
    assert c3 - cached <= fetched < c3 + 2 * 1024 * 1024, (fetched, c3, size)
    assert fetched < size / 5
    client.close()


def test_repeated_reads_come_from_the_range_cache(s3, cached_server, tmp_path):
    path = tmp_path / "cached.parquet"
    n = 200_000
    pq.write_table(pa.table({"id": pa.array(np.arange(n)), "x": pa.array(np.random.default_rng(5).random(n)),
                             "y": pa.array(np.random.default_rng(6).random(n))}), path, row_group_size=20_000)
    upload(s3, path, "allowed/cached.parquet")
    client = cached_server.client()
    register(client, f"s3://{BUCKET}/allowed/cached.parquet", "cached")
    s3["proxy"].take()
    first, _ = read(client, key="cached", columns=["x"])
    fetched = sum(r["bytes"] for r in s3["proxy"].take() if r["method"] == "GET")
    # The same read again: nothing is fetched but what says whether the object changed.
    again, _ = read(client, key="cached", columns=["x"])
    refetched = sum(r["bytes"] for r in s3["proxy"].take() if r["method"] == "GET")
    print(f"1 of 3 columns: {fetched} bytes fetched, then {refetched} from storage the second time")
    assert again.equals(first) and first.num_rows == n
    assert fetched > 0 and refetched == 0, (fetched, refetched)
    assert any((cached_server.data_dir / "cache").iterdir())
    client.close()


def test_a_changed_object_is_never_read_from_the_cache(s3, cached_server, tmp_path):
    path = tmp_path / "changing.parquet"
    pq.write_table(pa.table({"v": pa.array(range(1000))}), path)
    upload(s3, path, "allowed/changing.parquet")
    client = cached_server.client()
    register(client, f"s3://{BUCKET}/allowed/changing.parquet", "changing")
    first, _ = read(client, key="changing")
    assert first.column("v").to_pylist() == list(range(1000))
    # The object is overwritten in place with other values of the same size.
    pq.write_table(pa.table({"v": pa.array(range(1000, 2000))}), path)
    upload(s3, path, "allowed/changing.parquet")
    second, _ = read(client, key="changing")
    assert second.column("v").to_pylist() == list(range(1000, 2000))
    client.close()


def make_adata(n_obs=400, n_vars=30):
    rng = np.random.default_rng(3)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(["B cells", "NK cells", "T cells"], n_obs)),
         "percent_mito": rng.random(n_obs).astype(np.float32) * 0.1},
        index=[f"cell{i:04d}" for i in range(n_obs)])
    var = pd.DataFrame(index=[f"GENE{j:03d}" for j in range(n_vars)])
    return ad.AnnData(X=rng.random((n_obs, n_vars), dtype=np.float32), obs=obs, var=var)


def test_zarr_anndata_from_s3_reads_only_the_needed_chunks(s3, remote_server, tmp_path):
    adata = make_adata()
    local = tmp_path / "remote.zarr"
    adata.write_zarr(local, chunks=(40, 30))
    upload(s3, local, "allowed/remote.zarr")
    client = remote_server.client()
    record = register(client, f"s3://{BUCKET}/allowed/remote.zarr/", "remote_adata")
    assert record["otype"] == "AnnData" and record["n_observations"] == 400

    backed = ad.read_zarr(local)
    mask = (backed.obs.cell_type == "NK cells") & (backed.obs.percent_mito <= 0.01)
    rows = np.flatnonzero(mask.to_numpy())
    assert 0 < len(rows) < 40
    s3["proxy"].take()
    x, _ = read(client, key="remote_adata", element=["X"], filter="cell_type = 'NK cells' AND percent_mito <= 0.01")
    got = x.column("X").combine_chunks().flatten().to_numpy().reshape(x.num_rows, -1)
    np.testing.assert_array_equal(got, backed.X[rows])
    assert x.column("obs_names").to_pylist() == list(backed.obs_names[rows])
    chunk_gets = {r["key"] for r in s3["proxy"].take()
                  if r["method"] == "GET" and r["key"].startswith("allowed/remote.zarr/X/")
                  and not r["key"].rsplit("/", 1)[-1].startswith(".")}
    chunks = {f"allowed/remote.zarr/X/{row // 40}.0" for row in rows}
    print(f"zarr X subset of {len(rows)} cells: chunks fetched {sorted(chunk_gets)} of 10")
    assert chunk_gets == chunks, (sorted(chunk_gets), sorted(chunks))
    obs, _ = read(client, key="remote_adata", element=["obs"])
    assert obs.column("obs_names").to_pylist() == list(backed.obs_names)
    client.close()


def test_h5ad_in_s3_is_refused_with_the_way_out(s3, remote_server, tmp_path):
    path = tmp_path / "remote.h5ad"
    make_adata().write_h5ad(path)
    upload(s3, path, "allowed/remote.h5ad")
    client = remote_server.client()
    with pytest.raises(pa.ArrowInvalid, match="local storage only.*zarr"):
        register(client, f"s3://{BUCKET}/allowed/remote.h5ad", "remote_h5ad")
    client.close()


def test_remote_roots_are_enforced(s3, remote_server):
    s3["client"].put_object(Bucket=BUCKET, Key="elsewhere/x.parquet", Body=b"PAR1")
    client = remote_server.client()
    for path in (f"s3://{BUCKET}/elsewhere/x.parquet", f"s3://{BUCKET}/allowed-not/x.parquet",
                 f"s3://{BUCKET}/allowed/../elsewhere/x.parquet"):
        with pytest.raises(flight.FlightUnauthorizedError, match="allowed storage roots"):
            register(client, path, "outside")
    client.close()


def test_cli_registers_s3_directly_as_the_operator(s3, remote_server, tmp_path):
    # The operator's own registration is trusted outside the allowed roots.
    local = tmp_path / "op.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), local)
    upload(s3, local, "operator/op.parquet")
    out = subprocess.run([binary(), "--data-dir", str(remote_server.data_dir), "register",
                          f"s3://{BUCKET}/operator/op.parquet", "--key", "operator_s3"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, **s3["env"]})
    assert out.returncode == 0, out.stderr
    client = remote_server.client()
    table, _ = read(client, key="operator_s3")
    assert table.column("x").to_pylist() == [1, 2, 3]
    client.close()


def loopback_port():
    """A free loopback port whose +10000 sibling is free too (SeaweedFS derives gRPC ports so)."""
    rng = np.random.default_rng()
    for _ in range(1000):
        port = int(rng.integers(20000, 45000))
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """SeaweedFS (`weed mini`), a second S3 implementation: servers differ in how they answer for
    prefixes that no object is named after."""
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "testing", "credentials": [{"accessKey": "testing", "secretKey": "testing"}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ["master", "volume", "filer", "s3", "admin", "webdav", "s3.port.iceberg", "s3.port.lance"]
    ports = {name: loopback_port() for name in names}
    args = [str(pathlib.Path(sys.executable).parent / "weed"), "mini", f"-dir={root / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false", f"-s3.config={config}", f"-bucket={BUCKET}",
            "-volume.max=8", "-master.volumeSizeLimitMB=64"]
    for name in ["master", "volume", "filer", "s3", "admin", "webdav"]:
        args += [f"-{name}.port={ports[name]}"]
        if name not in ("webdav",):
            args += [f"-{name}.port.grpc={ports[name] + 10000}"]
    args += [f"-{name}={ports[name]}" for name in ("s3.port.iceberg", "s3.port.lance")]
    (root / "data").mkdir()
    log = open(root / "weed.log", "w")
    weed = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.head_bucket(Bucket=BUCKET)
            break
        except Exception:
            assert time.monotonic() < deadline and weed.poll() is None, \
                f"SeaweedFS did not start:\n{(root / 'weed.log').read_text()[-2000:]}"
            time.sleep(0.3)
    yield {"client": client, "env": s3_env(ports["s3"])}
    weed.terminate()
    weed.wait(timeout=30)
    log.close()


@pytest.mark.parametrize("implementation", ["moto", "seaweedfs"])
def test_remote_folders_are_named_with_or_without_a_slash(implementation, request, tmp_path_factory):
    s3 = request.getfixturevalue("s3" if implementation == "moto" else "seaweed")
    tmp = tmp_path_factory.mktemp(f"noslash-{implementation}")
    prefix = f"allowed/noslash-{implementation}"
    shards = tmp / "shards"
    demo = ds.dataset(DEMO, format="parquet", partitioning="hive").to_table()
    demo = demo.append_column("impl", pa.array([implementation] * demo.num_rows))
    ds.write_dataset(demo, shards, format="parquet", partitioning=["louvain"], partitioning_flavor="hive")
    store = tmp / "x.zarr"
    make_adata().write_zarr(store, chunks=(40, 30))
    for local, name in ((shards, "shards"), (store, "x.zarr")):
        paths = sorted(p for p in local.rglob("*") if p.is_file())
        for path in paths:
            s3["client"].upload_file(str(path), BUCKET, f"{prefix}/{name}/{path.relative_to(local).as_posix()}")
    # Some tools leave an empty marker object named after the folder: a folder all the same.
    s3["client"].put_object(Bucket=BUCKET, Key=f"{prefix}/shards/", Body=b"")
    server = Server(tmp, "--allow-root", f"s3://{BUCKET}/allowed", "--cache-size", "0", env=s3["env"])
    try:
        client = server.client()
        record = register(client, f"s3://{BUCKET}/{prefix}/shards", f"noslash_shards_{implementation}")
        assert record["path"] == f"s3://{BUCKET}/{prefix}/shards/" and record["n_files"] == 11
        table, _ = read(client, key=f"noslash_shards_{implementation}", filter="louvain = 3")
        want = ds.dataset(shards, format="parquet", partitioning="hive").to_table(filter=pc.field("louvain") == 3)
        assert table.num_rows == want.num_rows > 0
        assert sorted(table.column("n_genes").to_pylist()) == sorted(want.column("n_genes").to_pylist())
        record = register(client, f"s3://{BUCKET}/{prefix}/x.zarr", f"noslash_zarr_{implementation}")
        assert record["otype"] == "AnnData" and record["n_observations"] == 400
        x, _ = read(client, key=f"noslash_zarr_{implementation}", element=["X"], obs_range=[10, 20])
        np.testing.assert_array_equal(x.column("X").combine_chunks().flatten().to_numpy().reshape(10, -1),
                                      ad.read_zarr(store).X[10:20])
        # A name with nothing under it is still NOT_FOUND.
        with pytest.raises(KeyError):
            register(client, f"s3://{BUCKET}/{prefix}/nothing", f"noslash_nothing_{implementation}")
        client.close()
    finally:
        server.stop()


def test_registering_a_remote_folder_downloads_no_data(s3, remote_server, tmp_path):
    """Identity comes from the store's ETags (lamindb's way for cloud files): registering reads
    parquet footers, never whole objects, and says how its hash was taken."""
    folder = tmp_path / "etag_shards"
    rng = np.random.default_rng(5)
    for shard in range(4):
        (folder / f"part={shard}").mkdir(parents=True)
        pq.write_table(pa.table({"v": rng.random(1_000_000)}), folder / f"part={shard}" / "data.parquet")
    upload(s3, folder, "allowed/etag_shards")
    total = sum(p.stat().st_size for p in folder.rglob("*.parquet"))
    client = remote_server.client()
    s3["proxy"].take()
    record = register(client, f"s3://{BUCKET}/allowed/etag_shards/", "etag_shards")
    requests = s3["proxy"].take()
    assert record["hash_type"] == "etag" and record["n_files"] == 4
    gets = [r for r in requests if r["method"] == "GET" and r["key"].startswith("allowed/etag_shards/")]
    assert all(r["range"] for r in gets), "a whole object was downloaded"
    assert sum(r["bytes"] for r in gets) < total / 10, (sum(r["bytes"] for r in gets), total)
    # The same content again is the same record; changed content is a new version.
    assert register(client, f"s3://{BUCKET}/allowed/etag_shards/", "etag_shards")["uid"] == record["uid"]
    pq.write_table(pa.table({"v": rng.random(1_000_000)}), folder / "part=2" / "data.parquet")
    upload(s3, folder, "allowed/etag_shards")
    changed = register(client, f"s3://{BUCKET}/allowed/etag_shards/", "etag_shards")
    assert changed["uid"] != record["uid"] and changed["version"] == record["version"] + 1
    # A local registration still hashes every byte.
    local = remote_server.files / "etag_local.parquet"
    pq.write_table(pa.table({"v": [1.0, 2.0]}), local)
    assert register(client, str(local), "etag_local")["hash_type"] == "blake3"
    client.close()
