"""A dataset as a `polars.LazyFrame`, through polars' IO plugin interface.

polars hands the plugin what its optimiser pushed down: the columns, the predicate and the row
count. Columns and row count go to the server as `columns` and `limit`; the predicate goes as
`filter` when it translates to SQL, and is applied here otherwise (then the limit is applied
here too, after the filter).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from ._filters import Untranslatable, polars_to_sql

if TYPE_CHECKING:
    import polars as pl

    from ._dataset import Dataset


def lazy_frame(dataset: Dataset) -> pl.LazyFrame:
    import polars as pl
    from polars.io.plugins import register_io_source

    schema = pl.from_arrow(dataset.schema.empty_table()).schema

    def source(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
               batch_size: int | None) -> Iterator[pl.DataFrame]:
        sql = None
        if predicate is not None:
            try:
                sql = polars_to_sql(predicate)
            except Untranslatable:
                sql = None
        local = predicate is not None and sql is None
        # A predicate applied here needs its columns, even those the query does not return.
        columns = with_columns
        if local and with_columns is not None:
            needed = set(predicate.meta.root_names())
            columns = list(with_columns) + [c for c in schema.names() if c in needed and c not in with_columns]
        limit = None if local else n_rows
        left = n_rows
        for batch in dataset.to_batches(filter=sql, columns=columns, limit=limit, batch_size=batch_size):
            frame = pl.from_arrow(pa.Table.from_batches([batch]))
            if local:
                frame = frame.filter(predicate)
                if with_columns is not None:
                    frame = frame.select(with_columns)
            if left is not None:
                frame = frame.head(left)
                left -= frame.height
            yield frame
            if left is not None and left <= 0:
                return

    return register_io_source(source, schema=schema, is_pure=True,
                              explain_name="artiflight", explain_detail=repr(dataset))
