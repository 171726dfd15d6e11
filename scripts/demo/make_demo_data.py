"""Makes the demo data committed under demo/ from real data that a PyPI package ships.

scanpy bundles 10x_pbmc68k_reduced.h5ad (700 PBMCs). Its obs table, with the renames lamindb's
pbmc68k fixture applies, is written as a hive-partitioned parquet folder like lamindb's
`sharded_parquet` (one shard per louvain cluster). The AnnData itself, with lamindb's recipe
(renames, fewer columns, `sc.pp.subsample(fraction=0.1, random_state=123)`: 70 x 765), is written
as `pbmc68k.h5ad` and as `pbmc68k.zarr` by current anndata. spatialdata's `blobs` sample, its\ntable given a `clone` column, is written as `blobs.zarr`.

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
    write_anndata()


def write_anndata() -> None:
    """lamindb's `anndata_pbmc68k_reduced` fixture, made from scanpy's bundled file."""
    adata = sc.datasets.pbmc68k_reduced()
    adata.obs = adata.obs.rename(columns={"bulk_labels": "cell_type"})
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories(
        {"Dendritic": "Dendritic cells", "CD14+ Monocyte": "CD14+ Monocytes"}
    )
    adata.obs = adata.obs[["cell_type", "n_genes", "percent_mito", "louvain"]]
    adata.var = adata.var[["n_counts", "highly_variable"]]
    for key in ["rank_genes_groups", "bulk_labels_colors"]:
        adata.uns.pop(key, None)
    sc.pp.subsample(adata, fraction=0.1, random_state=123)
    h5ad = ROOT / "pbmc68k.h5ad"
    zarr = ROOT / "pbmc68k.zarr"
    h5ad.unlink(missing_ok=True)
    shutil.rmtree(zarr, ignore_errors=True)
    adata.write_h5ad(h5ad)
    adata.write_zarr(zarr)
    print(f"wrote {adata.n_obs} x {adata.n_vars} AnnData to {h5ad} and {zarr}")
    write_spatialdata()


def write_spatialdata() -> None:
    """spatialdata's small `blobs` dataset, its table given a `clone` column to filter on."""
    import numpy as np
    import pandas as pd
    from spatialdata.datasets import blobs

    sdata = blobs(length=64, n_channels=1)
    table = sdata.tables["table"]
    rng = np.random.default_rng(123)
    table.obs["clone"] = pd.Categorical(rng.choice(["diploid", "aneuploid"], table.n_obs))
    target = ROOT / "blobs.zarr"
    shutil.rmtree(target, ignore_errors=True)
    sdata.write(target)
    print(f"wrote SpatialData with a {table.n_obs}-row table to {target}")


if __name__ == "__main__":
    main()
