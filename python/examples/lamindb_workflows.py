"""The two workflows of lamindb's guides, against an artiflight server (`artiflight serve --demo`).

    ARTIFLIGHT_SERVER=grpc://127.0.0.1:8815 python python/examples/lamindb_workflows.py

Each step names the lamindb call it stands for. CI runs this script (tests/python/test_package.py).
"""

import artiflight

client = artiflight.connect()  # ARTIFLIGHT_SERVER, else grpc://127.0.0.1:8815

# --- Stream datasets from storage: a sharded parquet folder, and a collection ---------------------

# ln.Artifact.get(key="sharded_parquet"); artifact.path.view_tree()
artifact = client.artifact("sharded_parquet")
artifact.describe()

# backed = artifact.open(); backed.head(5).to_pandas()
backed = artifact.open()
print(backed.head(5).to_pandas())

# ln.Collection.get(key="sharded_parquet_collection").open().to_table().to_pandas()
collection = client.collection("sharded_parquet_collection")
print(collection.open().to_table().to_pandas().head())

# pushdown: only the matching rows and the named columns travel
print(backed.to_table(filter="louvain = 3 AND n_genes > 1000", columns=["cell_type", "n_genes"]))

# artifact.open(engine="polars")
try:
    import polars as pl

    lazy = artifact.open(engine="polars")
    print(lazy.filter(pl.col("percent_mito") <= 0.02).select(["cell_type", "percent_mito"]).collect())
except ImportError:
    print("(polars is not installed: skipping the polars engine)")

# --- Slice arrays: an AnnData, subset by an obs predicate ------------------------------------------

# adata = ln.Artifact.get(key="pbmc68k.h5ad").open()
adata = client.artifact("pbmc68k.h5ad").open()
print(adata)

obs_idx = adata.obs.cell_type.isin(["Dendritic cells", "CD14+ Monocytes"]) & (
    adata.obs.percent_mito <= 0.05
)
adata_subset = adata[obs_idx]
print(adata_subset)

# Subsets load arrays into memory upon direct access
print(adata_subset.X)

# adata_subset.to_memory()
print(adata_subset.to_memory())
