"""The benchmark harness: every case, our figure next to the peer's measured in the same run.

    cargo build --release --bin artiflight
    .venv/bin/python benches/harness.py                 # the full run, about 10 minutes cold
    .venv/bin/python benches/harness.py --smoke         # tiny sizes, a check that every case runs

It generates its own data (fixed seeds) under `--data` and keeps it between runs. Cases (issue 6):

1. parquet full scan, all endpoints in parallel (peers: a pyarrow.flight server in Python, local
   pyarrow.dataset);
2. a 1 % filter on a sorted id, with the row groups pruned;
3. a projection of 3 of 10 columns, with the bytes read from storage;
4. AnnData 1 % subsets, dense and CSR, h5ad and zarr (peer: anndata backed mode), and the server's
   peak memory while streaming a whole X;
5. Flight SQL through ADBC (peer: DuckDB on the files);
6. 8 and 32 clients at once, half full scans, half filters;
7. start-up and ListFlights with 10,000 artifacts; registering a 1,000-shard folder.

Sizes are flags; `--only 1 5` runs some cases. Timing is never asserted: a missed target prints
MISSED in the summary.
"""

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import anndata_compare  # noqa: E402
import catalog_bench  # noqa: E402
import compare  # noqa: E402
import sql_compare  # noqa: E402
from common import DEFAULT_BINARY, DEFAULT_DATA, print_rows  # noqa: E402

SMOKE = {
    "rows": 200_000, "shards": 4, "clients": [2], "seconds": 1.0,
    "n_obs": 2_000, "n_vars": 100, "artifacts": 200, "folder_shards": 50, "repeat": 1,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_args(parser)
    anndata_compare.add_args(parser)
    catalog_bench.add_args(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--binary", default=DEFAULT_BINARY)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that every case runs")
    parser.add_argument("--only", type=int, nargs="*", help="case numbers to run (default: all)")
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    pathlib.Path(args.data).mkdir(parents=True, exist_ok=True)

    wanted = set(args.only or range(1, 8))
    suites = [
        ({1, 2, 3, 6}, compare.run),
        ({4}, anndata_compare.run),
        ({5}, sql_compare.run),
        ({7}, catalog_bench.run),
    ]
    rows = []
    start = time.perf_counter()
    for cases, run in suites:
        if cases & wanted:
            rows.extend(r for r in run(args) if int(r.case.split()[0]) in wanted)
    print(f"\nsummary ({time.perf_counter() - start:.0f} s, {'smoke sizes' if args.smoke else 'full sizes'},"
          f" best of {args.repeat}; ratio = ours / peer)")
    print_rows(rows)


if __name__ == "__main__":
    sys.exit(main())
