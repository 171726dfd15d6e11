"""Makes the demo data committed under demo/ from real data that a PyPI package ships.

scanpy bundles 10x_pbmc68k_reduced.h5ad (700 PBMCs). Its obs table, with the renames lamindb's
pbmc68k fixture applies, is written as a hive-partitioned parquet folder like lamindb's
`sharded_parquet` (one shard per louvain cluster).

    python -m venv /tmp/demo-venv && /tmp/demo-venv/bin/pip install -r scripts/demo/requirements.txt
    /tmp/demo-venv/bin/python scripts/demo/make_demo_data.py
"""

import pathlib
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import scanpy as sc

ROOT = pathlib.Path(__file__).resolve().parents[2] / "demo"


def main() -> None:
    adata = sc.datasets.pbmc68k_reduced()
    obs = adata.obs.rename(columns={"bulk_labels": "cell_type"})
    obs["cell_type"] = obs["cell_type"].cat.rename_categories(
        {"Dendritic": "Dendritic cells", "CD14+ Monocyte": "CD14+ Monocytes"}
    )
    obs["louvain"] = obs["louvain"].astype(str)
    obs = obs[["cell_type", "n_genes", "percent_mito", "n_counts", "phase", "louvain"]]

    target = ROOT / "sharded_parquet"
    shutil.rmtree(target, ignore_errors=True)
    table = pa.Table.from_pandas(obs)
    pq.write_to_dataset(
        table,
        target,
        partition_cols=["louvain"],
        basename_template="part-{i}.parquet",
    )
    files = sorted(target.rglob("*.parquet"))
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} shards, {size} bytes, {obs.shape[0]} rows to {target}")


if __name__ == "__main__":
    main()
