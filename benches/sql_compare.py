"""Flight SQL through ADBC next to DuckDB reading the same parquet files locally, in the same run.

The data is compare.py's: 10 M rows x 10 columns in 20 hive shards (fixed seed), `id` sorted.
Each query runs in both engines; the answers are compared before anything is timed. Our time is
the ADBC client's, from `execute` to an Arrow table in Python (planning, every endpoint and the
transfer included); DuckDB's is `duckdb.sql(...).to_arrow_table()` on the files, with its default
of one thread per core.

    cargo build --release --bin artiflight
    .venv/bin/python benches/sql_compare.py [--rows 10000000] [--shards 20] [--repeat 5]

Prints seconds for each engine and the ratio (ours / DuckDB's; the target is at most 1.0, issue
15's: as fast as DuckDB on the same files).
"""

import argparse
import pathlib
import sys
import time

import adbc_driver_flightsql.dbapi as flight_sql
import duckdb
import pyarrow as pa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import DEFAULT_BINARY, DEFAULT_DATA, Row, register, serve, stop  # noqa: E402
from compare import make_data  # noqa: E402

TARGET = 1.0


def queries(rows: int) -> dict[str, str]:
    lo = rows // 2
    hi = lo + rows // 100 - 1
    return {
        "group-by aggregate (400 groups)":
            "SELECT h, f, count(*) AS n, sum(a) AS sa, avg(c) AS mc FROM scan GROUP BY h, f",
        "selective filter (1 % by sorted id)":
            f"SELECT * FROM scan WHERE id BETWEEN {lo} AND {hi}",
    }


def canonical(table: pa.Table) -> pa.Table:
    """Sorted by every column, dictionaries decoded, so two engines' answers compare."""
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if pa.types.is_large_string(column.type) or pa.types.is_string_view(column.type):
            column = column.cast(pa.string())
        columns[name] = column
    table = pa.table(columns)
    return table.sort_by([(n, "ascending") for n in table.column_names])


def same(ours: pa.Table, theirs: pa.Table, name: str):
    ours, theirs = canonical(ours), canonical(theirs)
    assert ours.num_rows == theirs.num_rows, (name, ours.num_rows, theirs.num_rows)
    for column in ours.column_names:
        a, b = ours.column(column).to_pylist(), theirs.column(column).to_pylist()
        if pa.types.is_floating(ours.column(column).type):
            assert all(abs(x - y) <= 1e-9 * max(1.0, abs(y)) for x, y in zip(a, b)), (name, column)
        else:
            assert a == b, (name, column)


def timed(fn, repeat: int) -> tuple[float, pa.Table]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def run(args) -> list[Row]:
    folder = make_data(pathlib.Path(args.data), args.rows, args.shards)
    proc, url = serve(args.binary, pathlib.Path(args.data) / f"artiflight-data-sql-{folder.name}", folder)
    rows = []
    queries_run = {}
    try:
        # The data's own name as key and data dir: see compare.KEY. DuckDB's view takes the same name.
        register(url, folder, folder.name)
        for name, sql in queries(args.rows).items():
            queries_run[name] = sql.replace("FROM scan", f'FROM "{folder.name}"')
        duck = duckdb.connect()
        duck.execute(
            f'CREATE VIEW "{folder.name}" AS SELECT * FROM '
            f"read_parquet('{folder}/**/*.parquet', hive_partitioning = true)"
        )
        with flight_sql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
            def ours(sql):
                cursor.execute(sql)
                return cursor.fetch_arrow_table()

            for name, sql in queries_run.items():
                same(ours(sql), duck.sql(sql).to_arrow_table(), name)  # also warms both
                theirs_s, _ = timed(lambda: duck.sql(sql).to_arrow_table(), args.repeat)
                ours_s, table = timed(lambda: ours(sql), args.repeat)
                rows.append(Row("5 Flight SQL via ADBC", f"{name}, s", ours_s, theirs_s, "s",
                                f"<= {TARGET}", "DuckDB on the files", f"{table.num_rows} rows"))
        duck.close()
    finally:
        stop(proc)
    return rows


def add_args(parser: argparse.ArgumentParser):
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)


def main():
    parser = argparse.ArgumentParser()
    add_args(parser)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--binary", default=DEFAULT_BINARY)
    parser.add_argument("--data", default=DEFAULT_DATA)
    args = parser.parse_args()
    print(f"Flight SQL via ADBC vs DuckDB on the files: {args.rows:,} rows x 10 columns in "
          f"{args.shards} shards, best of {args.repeat}")
    print(f"{'query':<38} {'rows':>7} {'artiflight s':>12} {'DuckDB s':>9} {'ratio':>6} {'target':>7}")
    for r in run(args):
        print(f"{r.measure[:-3]:<38} {r.note.split()[0]:>7} {r.ours:>12.3f} {r.peer:>9.3f} "
              f"{r.ratio:>6.2f} {TARGET:>7}")


if __name__ == "__main__":
    sys.exit(main())
