"""The connection to a server, and the records it keeps: artifacts, collections and query sets."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.flight as flight

from ._errors import translated

if TYPE_CHECKING:
    import pandas as pd

    from ._anndata import AnnDataAccessor
    from ._dataset import Dataset

DEFAULT_SERVER = "grpc://127.0.0.1:8815"


def connect(
    uri: str | None = None,
    token: str | None = None,
    tls_root_certs: str | bytes | None = None,
) -> Client:
    """Connects to an artiflight server.

    `uri` defaults to `ARTIFLIGHT_SERVER`, then `grpc://127.0.0.1:8815`; `token` to
    `ARTIFLIGHT_TOKEN`. `tls_root_certs` is PEM text or a path to a PEM file, for a server with
    a private CA (`grpc+tls://`).

    >>> import artiflight
    >>> client = artiflight.connect("grpc://127.0.0.1:8815")        # doctest: +SKIP
    >>> client.artifact("sharded_parquet").open().head(5)           # doctest: +SKIP
    """
    return Client(uri, token, tls_root_certs)


class Stats:
    """What this client has received, counted per record batch: pushdown shows here."""

    def __init__(self):
        self._lock = threading.Lock()
        self.streams = 0
        self.rows = 0
        self.bytes = 0
        self.by_server: dict[str, int] = {}  # rows received from each server of a fleet

    def add(self, batch: pa.RecordBatch, server: str):
        with self._lock:
            self.rows += batch.num_rows
            self.bytes += batch.nbytes
            self.by_server[server] = self.by_server.get(server, 0) + batch.num_rows

    def reset(self):
        with self._lock:
            self.streams = self.rows = self.bytes = 0
            self.by_server = {}

    def __repr__(self) -> str:
        return f"Stats(streams={self.streams}, rows={self.rows}, bytes={self.bytes})"


class Client:
    """A connection to one server. Thread-safe: endpoints are fetched in parallel over it."""

    def __init__(self, uri: str | None = None, token: str | None = None,
                 tls_root_certs: str | bytes | None = None):
        self.uri = uri or os.environ.get("ARTIFLIGHT_SERVER") or DEFAULT_SERVER
        token = token if token is not None else os.environ.get("ARTIFLIGHT_TOKEN")
        kwargs: dict[str, Any] = {}
        if tls_root_certs is not None:
            if isinstance(tls_root_certs, str) and not tls_root_certs.lstrip().startswith("-----"):
                with open(tls_root_certs, "rb") as f:
                    tls_root_certs = f.read()
            kwargs["tls_root_certs"] = tls_root_certs
        with translated():
            self._flight = flight.FlightClient(self.uri, **kwargs)
        self._kwargs = kwargs
        self._peers: dict[str, flight.FlightClient] = {}
        self._peers_lock = threading.Lock()
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = flight.FlightCallOptions(headers=headers)
        self.stats = Stats()

    def __repr__(self) -> str:
        return f"artiflight.Client({self.uri!r})"

    def close(self):
        self._flight.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc):
        self.close()

    # --- records -------------------------------------------------------------------------------

    def artifacts(self, key_prefix: str | None = None, suffix: str | None = None,
                  otype: str | None = None) -> pd.DataFrame:
        """The latest artifacts and collections as a DataFrame, one row each, indexed by uid
        (lamindb's `Artifact.filter(...).to_dataframe()`)."""
        import pandas as pd

        records = self.records(key_prefix=key_prefix, suffix=suffix, otype=otype)
        frame = pd.DataFrame.from_records(records)
        if "uid" in frame:
            frame = frame.set_index("uid")
        return frame

    def records(self, **criteria: str | None) -> list[dict]:
        """The latest records matching `criteria` (`key_prefix`, `suffix`, `otype`), as dicts."""
        wanted = {k: v for k, v in criteria.items() if v is not None}
        body = json.dumps(wanted).encode() if wanted else b""
        with translated():
            infos = list(self._flight.list_flights(body, options=self._options))
        return [json.loads(info.app_metadata) for info in infos if info.app_metadata]

    def artifact(self, key: str, version: str | None = None) -> Artifact:
        """The artifact under `key` (the latest version, or the uid `version`)."""
        record = self.describe(key, version)
        if record.get("kind") == "collection":
            raise TypeError(f"'{key}' is a collection: use client.collection({key!r})")
        return Artifact(self, record)

    def collection(self, key: str, version: str | None = None) -> Collection:
        """The collection under `key`."""
        record = self.describe(key, version)
        if record.get("kind") != "collection":
            raise TypeError(f"'{key}' is an artifact: use client.artifact({key!r})")
        return Collection(self, record)

    def query(self, key_prefix: str | None = None, suffix: str | None = None,
              otype: str | None = None) -> QuerySet:
        """A query set: every latest artifact matching the filter, opened as one table in key
        order (lamindb's `Artifact.filter(suffix=".parquet").open()`)."""
        wanted = {"key_prefix": key_prefix, "suffix": suffix, "otype": otype}
        return QuerySet(self, {k: v for k, v in wanted.items() if v is not None})

    def describe(self, key: str, version: str | None = None) -> dict:
        """The record of `key` as the server describes it (with the structure, for AnnData)."""
        body: dict[str, Any] = {"key": key}
        if version is not None:
            body["version"] = version
        return self.action("describe", body)

    # --- writes --------------------------------------------------------------------------------

    def register(self, path: str | os.PathLike, key: str, description: str | None = None) -> Artifact:
        """Registers a file or folder the server can read (under its allowed roots)."""
        body: dict[str, Any] = {"path": os.fspath(path), "key": key}
        if description is not None:
            body["description"] = description
        return Artifact(self, self.action("register", body))

    def save(self, data: Any, key: str) -> Artifact:
        """Uploads a table (pyarrow Table or RecordBatch, pandas or polars DataFrame) as a parquet
        artifact in the server's managed storage: a new version if `key` exists."""
        table = _as_table(data)
        descriptor = flight.FlightDescriptor.for_path(key)
        with translated():
            writer, reader = self._flight.do_put(descriptor, table.schema, options=self._options)
            with writer:
                writer.write_table(table)
                writer.done_writing()
                answer = reader.read()
        record = json.loads(answer.to_pybytes()) if answer is not None else self.describe(key)
        return Artifact(self, record)

    def create_collection(self, key: str, members: Sequence[str | Artifact]) -> Collection:
        """A collection of artifacts (by key or object), in the order given."""
        keys = [m.key if isinstance(m, Artifact) else m for m in members]
        return Collection(self, self.action("create_collection", {"key": key, "members": keys}))

    # --- the wire --------------------------------------------------------------------------------

    def action(self, name: str, body: dict) -> Any:
        """Runs a DoAction with a JSON body; returns its JSON answer."""
        with translated():
            results = list(self._flight.do_action(
                flight.Action(name, json.dumps(body).encode()), options=self._options))
        return json.loads(results[0].body.to_pybytes()) if results else None

    def flight_info(self, command: dict) -> flight.FlightInfo:
        """GetFlightInfo for a JSON command (docs/PROTOCOL.md section 3)."""
        descriptor = flight.FlightDescriptor.for_command(json.dumps(command))
        with translated():
            return self._flight.get_flight_info(descriptor, options=self._options)

    def schema(self, command: dict) -> pa.Schema:
        """The schema a command's flight announces."""
        descriptor = flight.FlightDescriptor.for_command(json.dumps(command))
        with translated():
            return self._flight.get_schema(descriptor, options=self._options).schema

    def _at(self, uri: str) -> flight.FlightClient:
        """A connection to the fleet server at `uri` (kept), with this client's TLS roots."""
        if uri == self.uri or uri.startswith("arrow-flight-reuse-connection:"):
            return self._flight
        with self._peers_lock:
            peer = self._peers.get(uri)
            if peer is None:
                peer = self._peers[uri] = flight.FlightClient(uri, **self._kwargs)
            return peer

    def _open(self, endpoint: flight.FlightEndpoint) -> tuple[str, Iterator]:
        """The endpoint's stream, from its first location when it names one (a fleet), else, or
        when that server cannot be reached, from this server: any server serves any ticket."""
        locations = [loc.uri.decode() if isinstance(loc.uri, bytes) else str(loc.uri)
                     for loc in endpoint.locations]
        if locations:
            try:
                reader = iter(self._at(locations[0]).do_get(endpoint.ticket, options=self._options))
                first = next(reader, None)
                chunks = iter([first] if first is not None else [])
                return locations[0], _chain(chunks, reader)
            except (flight.FlightUnavailableError, flight.FlightTimedOutError, OSError):
                pass
        return self.uri, iter(self._flight.do_get(endpoint.ticket, options=self._options))

    def stream(self, endpoint: flight.FlightEndpoint) -> Iterator[pa.RecordBatch]:
        """The record batches of one endpoint, counted in `stats`."""
        with self.stats._lock:
            self.stats.streams += 1
        with translated():
            server, chunks = self._open(endpoint)
            for chunk in chunks:
                self.stats.add(chunk.data, server)
                yield chunk.data

    def read(self, info: flight.FlightInfo, threads: int = 4) -> pa.Table:
        """Every endpoint of `info`, fetched in parallel, in endpoint order."""
        endpoints = list(info.endpoints)

        def fetch(endpoint: flight.FlightEndpoint) -> list[pa.RecordBatch]:
            return list(self.stream(endpoint))

        if len(endpoints) <= 1:
            parts = [fetch(e) for e in endpoints]
        else:
            with ThreadPoolExecutor(min(threads, len(endpoints))) as pool:
                parts = list(pool.map(fetch, endpoints))
        return pa.Table.from_batches([b for part in parts for b in part], schema=info.schema)

    def status(self) -> dict:
        """A short account of the server: address, reachable, what it holds."""
        records = self.records()
        kinds: dict[str, int] = {}
        for r in records:
            kinds[r.get("kind", "artifact")] = kinds.get(r.get("kind", "artifact"), 0) + 1
        return {"server": self.uri, "artifacts": kinds.get("artifact", 0),
                "collections": kinds.get("collection", 0),
                "keys": sorted(r["key"] for r in records)}


def _chain(*parts: Iterator) -> Iterator:
    for part in parts:
        yield from part


def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if hasattr(data, "to_arrow") and type(data).__module__.startswith("polars"):
        return _plain_strings(data.to_arrow())
    if type(data).__module__.startswith("pandas"):
        return pa.Table.from_pandas(data)
    raise TypeError(f"cannot save a {type(data).__name__}: pass a pyarrow Table, pandas or polars DataFrame")


def _plain_strings(table: pa.Table) -> pa.Table:
    """polars' large and view strings as plain ones, so its uploads unify with pandas' and
    pyarrow's in a collection."""
    fields = []
    for field in table.schema:
        if pa.types.is_large_string(field.type) or pa.types.is_string_view(field.type):
            field = field.with_type(pa.string())
        elif pa.types.is_large_binary(field.type) or pa.types.is_binary_view(field.type):
            field = field.with_type(pa.binary())
        fields.append(field)
    return table.cast(pa.schema(fields, metadata=table.schema.metadata))


class Record:
    """A catalog record: its fields are attributes (`uid`, `key`, `version`, `hash`, ...)."""

    def __init__(self, client: Client, record: dict):
        self._client = client
        self.record = record

    def __getattr__(self, name: str) -> Any:
        record = self.__dict__.get("record", {})
        if name in record:
            return record[name]
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __dir__(self) -> Iterable[str]:
        return [*super().__dir__(), *self.record]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={self.record[k]!r}" for k in
                           ("uid", "key", "suffix", "otype", "size", "version", "is_latest")
                           if k in self.record and self.record[k] is not None)
        return f"{type(self).__name__}({fields})"

    def versions(self) -> list:
        """Every version of this key, oldest first."""
        answer = self._client.action("list_versions", {"key": self.key})
        records = answer if isinstance(answer, list) else answer.get("versions", [])
        return [type(self)(self._client, r) for r in records]

    def delete(self, permanent: bool = False) -> dict:
        """Moves this version to the trash, or deletes its record (`permanent`). Never deletes a
        user's own files outside the server's managed storage."""
        body = {"key": self.key, "version": self.uid, "permanent": permanent}
        return self._client.action("delete", body)

    def _command(self) -> dict:
        return {"key": self.key, "version": self.uid}


class Artifact(Record):
    """A registered file or folder: a table, an AnnData, or a tree of arrays."""

    def describe(self, print_it: bool = True) -> str:
        """The record, and the file tree (folders) or the structure (AnnData), as `show` prints."""
        text = _describe(self._client.describe(self.key, self.uid))
        if print_it:
            print(text)
        return text

    def open(self, engine: str = "pyarrow", element: Sequence[str] | str | None = None,
             ) -> Dataset | AnnDataAccessor | Any:
        """Opens the artifact lazily, reading nothing yet.

        A table (parquet, a folder of shards, csv, arrow) gives a `Dataset` (or, with
        `engine="polars"`, a `polars.LazyFrame`); an AnnData (`.h5ad`, `.zarr`) an
        `AnnDataAccessor`; `element` opens one element of an AnnData or a dataset of a generic
        HDF5/zarr tree as a `Dataset` (`"obs"`, `["layers", "counts"]`, `"group/dataset"`).
        """
        from ._anndata import AnnDataAccessor
        from ._dataset import Dataset

        elements = [element] if isinstance(element, str) else list(element or [])
        if self.record.get("otype") in ("AnnData",) and not elements and engine == "pyarrow":
            return AnnDataAccessor(self._client, self.record)
        dataset = Dataset(self._client, {**self._command(), **({"element": elements} if elements else {})})
        return dataset.to_polars() if engine == "polars" else _engine(dataset, engine)


class Collection(Record):
    """An ordered list of artifacts, read as the union of their tables."""

    @property
    def members(self) -> list[str]:
        return list(self.record.get("member_keys", []))

    def artifacts(self) -> list[Artifact]:
        """The member artifacts, in order (the member versions the collection holds)."""
        return [self._client.artifact(key, uid) for key, uid in
                zip(self.record.get("member_keys", []), self.record.get("members", []))]

    def describe(self, print_it: bool = True) -> str:
        text = _describe(self.record)
        if print_it:
            print(text)
        return text

    def open(self, engine: str = "pyarrow") -> Dataset | Any:
        """The members' tables as one lazy `Dataset` (or `polars.LazyFrame`), in member order."""
        from ._dataset import Dataset

        return _engine(Dataset(self._client, self._command()), engine)


class QuerySet:
    """Latest artifacts matching a record filter, opened as one table in key order."""

    def __init__(self, client: Client, criteria: dict):
        self._client, self.criteria = client, criteria

    def __repr__(self) -> str:
        return f"QuerySet({self.criteria})"

    def to_dataframe(self) -> pd.DataFrame:
        return self._client.artifacts(**self.criteria)

    def open(self, engine: str = "pyarrow") -> Dataset | Any:
        from ._dataset import Dataset

        return _engine(Dataset(self._client, {"query": self.criteria}), engine)


def _engine(dataset: Dataset, engine: str) -> Any:
    if engine == "pyarrow":
        return dataset
    if engine == "polars":
        return dataset.to_polars()
    raise ValueError(f"unknown engine {engine!r}: 'pyarrow' or 'polars'")


def _describe(record: dict) -> str:
    """The record as `artiflight show` prints it: fields, then the structure if any."""
    lines = [f"{'Collection' if record.get('kind') == 'collection' else 'Artifact'} {record.get('key')}"]
    for field in ("uid", "description", "suffix", "otype", "size", "hash", "n_files", "n_observations",
                  "version", "is_latest", "created_at", "path", "member_keys"):
        if record.get(field) is not None:
            lines.append(f"  {field}: {record[field]}")
    structure = record.get("structure")
    if isinstance(structure, dict) and structure.get("otype") == "AnnData":
        shape = structure.get("shape") or ["?", "?"]
        lines.append(f"  AnnData object with n_obs × n_vars = {shape[0]} × {shape[1]}")
        for kind in ("obs", "var", "layers", "obsm", "varm", "obsp", "varp", "uns"):
            names = structure.get(kind)
            if names:
                names = list(names) if not isinstance(names, dict) else list(names.keys())
                lines.append(f"    {kind}: {', '.join(repr(n) for n in names)}")
    elif structure is not None:
        lines.append("  structure: " + json.dumps(structure, indent=2).replace("\n", "\n  "))
    if record.get("tree"):
        lines.append(str(record["tree"]))
    return "\n".join(lines)
