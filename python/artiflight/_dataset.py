"""A lazy table on the server: nothing is read until asked, and then only what is asked."""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ._filters import to_sql

if TYPE_CHECKING:
    import pandas as pd

    from ._client import Client


class Dataset:
    """An artifact's, collection's or query set's table, opened lazily (lamindb's `open()`).

    Every read sends one command to the server: `filter` (SQL text or a
    `pyarrow.compute.Expression`), `columns` and `limit` are applied there, in the scan, so only
    the selected rows and columns travel.

    >>> ds = client.artifact("sharded_parquet").open()                     # doctest: +SKIP
    >>> ds.to_table(filter="louvain = 3 AND n_genes > 1000", columns=["cell_type"])  # doctest: +SKIP
    """

    def __init__(self, client: Client, command: dict):
        self._client = client
        self.command = dict(command)
        self._schema: pa.Schema | None = None

    def __repr__(self) -> str:
        return f"artiflight.Dataset({json.dumps(self.command)})"

    @property
    def schema(self) -> pa.Schema:
        """The table's schema, as the server announces it (one GetSchema, then kept)."""
        if self._schema is None:
            self._schema = self._client.schema(self.command)
        return self._schema

    def _selection(self, filter: Any = None, columns: Sequence[str] | None = None,
                   limit: int | None = None) -> dict:
        command = dict(self.command)
        sql = to_sql(filter)
        if sql is not None:
            previous = command.get("filter")
            command["filter"] = f"({previous}) AND ({sql})" if previous else sql
        if columns is not None:
            command["columns"] = list(columns)
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, not {limit}")
            command["limit"] = min(limit, command.get("limit", limit))
        return command

    def filter(self, filter: Any) -> Dataset:
        """A dataset with `filter` applied on the server too (combined with AND)."""
        return Dataset(self._client, self._selection(filter))

    def select(self, columns: Sequence[str]) -> Dataset:
        """A dataset of these columns only, in this order."""
        return Dataset(self._client, self._selection(columns=columns))

    def to_table(self, filter: Any = None, columns: Sequence[str] | None = None,
                 limit: int | None = None) -> pa.Table:
        """The selected rows as one Arrow table, endpoints fetched in parallel, in order."""
        info = self._client.flight_info(self._selection(filter, columns, limit))
        return self._client.read(info)

    def head(self, n: int = 5, columns: Sequence[str] | None = None) -> pa.Table:
        """The first `n` rows."""
        return self.to_table(columns=columns, limit=n)

    def to_pandas(self, filter: Any = None, columns: Sequence[str] | None = None,
                  limit: int | None = None, **kwargs: Any) -> pd.DataFrame:
        """`to_table(...)` as pandas; a pandas index stored with the data is restored."""
        return self.to_table(filter, columns, limit).to_pandas(**kwargs)

    def count_rows(self, filter: Any = None) -> int:
        """The number of rows (matching `filter`): from the catalog when known without a scan,
        else counted on the server's scan of one column."""
        if filter is None and "filter" not in self.command:
            info = self._client.flight_info(self.command)
            if info.total_records >= 0:
                return info.total_records
        first = self.schema.names[:1]
        table = self.to_table(filter, columns=first)
        return table.num_rows

    def to_batches(self, filter: Any = None, columns: Sequence[str] | None = None,
                   limit: int | None = None, batch_size: int | None = None,
                   shuffle: int | None = None, in_flight: int = 2) -> Iterator[pa.RecordBatch]:
        """The selected rows as a stream of record batches, with bounded memory.

        Endpoints (shards, collection members, row ranges) are fetched `in_flight` at a time, in
        parallel, and yielded in endpoint order. `shuffle=seed` shuffles that order (for a
        training epoch: pass the epoch number in the seed); rows within an endpoint keep their
        order. `batch_size` re-cuts the batches to that many rows (the last may be shorter).
        """
        if in_flight < 1:
            raise ValueError(f"in_flight must be >= 1, not {in_flight}")
        info = self._client.flight_info(self._selection(filter, columns, limit))
        endpoints = list(info.endpoints)
        if shuffle is not None:
            random.Random(shuffle).shuffle(endpoints)
        batches = _fetch_ahead(self._client, endpoints, in_flight)
        yield from (_rebatch(batches, batch_size) if batch_size else batches)

    def to_polars(self) -> Any:
        """A `polars.LazyFrame` whose filter, select and head reach the server."""
        from ._polars import lazy_frame

        return lazy_frame(self)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        return self.to_batches()


def _fetch_ahead(client: Client, endpoints: list, in_flight: int) -> Iterator[pa.RecordBatch]:
    """Each endpoint's batches, in order, with up to `in_flight` endpoints being fetched.

    An endpoint is read whole by a worker while the consumer takes the ones before it, so the
    memory held is about `in_flight` endpoints. A consumer that stops early cancels what has
    not started.
    """
    if not endpoints:
        return
    pool = ThreadPoolExecutor(min(in_flight, len(endpoints)))
    pending: deque[Future] = deque()
    remaining = iter(endpoints)
    try:
        for endpoint in remaining:
            pending.append(pool.submit(lambda e=endpoint: list(client.stream(e))))
            if len(pending) >= in_flight:
                break
        while pending:
            batches = pending.popleft().result()
            following = next(remaining, None)
            if following is not None:
                pending.append(pool.submit(lambda e=following: list(client.stream(e))))
            yield from batches
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Batches of exactly `size` rows (the last one shorter), cut without copying where they fit."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, not {size}")
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - count, batch.num_rows)
            held.append(batch.slice(0, take))
            batch = batch.slice(take)
            count += take
            if count == size:
                yield _concat(held)
                held, count = [], 0
    if count:
        yield _concat(held)


def _concat(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
