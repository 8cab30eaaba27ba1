"""A user-supplied direction as a one-latent dictionary: `sae-platform vector add` validates and commits it,
the feature stages (real Dagster runs) describe it like any latent, and its browser page shows its top and
interval examples and histogram; bad files are refused with messages naming the file and the fix."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from dagster import DagsterInstance, Definitions
from safetensors.numpy import save_file

from assets import ASSETS
from assets.partitions import ACTIVATION_BATCHES, N_FEATURE_SHARDS
from jobs.cli import build_features
from jobs.definitions import ASSET_JOBS, build_resources
from jobs.settings import Settings
from resources import BaseModelResource, stage_resource
from sae_platform import catalog
from sae_platform import shuffle as sh
from sae_platform.activations import CacheSettings, cache_text_file, open_partition
from sae_platform.corpus import list_source
from sae_platform.feature_merge import read_tables
from sae_platform.shuffled import open_shuffled
from sae_platform.trainer import load_sae
from sae_platform.vectors import VectorError, add_vector, read_direction

NAME = "probe-a"
TOP_K = 5


@pytest.fixture
def cached(store, tiny_model_dir, tiny_hooked, text_dir):
    """Three cached batches of the tiny model, shuffled into ``main`` (no SAE trained)."""
    for text_file in list_source(str(text_dir / "*")):
        cache_text_file(store, text_file, tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=32, batch_size=4))
    sh.run_shuffle(store, "main", n_buckets=4, memory_budget_bytes=1 << 20, n_jobs=2, seed=0)
    return open_shuffled(store, "main").d_model


def _defs(store, tiny_model_dir, text_dir, tmp_path):
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    (holdout / "held.txt").write_text((text_dir / "beta.txt").read_text())
    resources = build_resources(Settings(root_url=store.root_url, data_dir=str(tmp_path), inbox=str(text_dir / "*"),
                                         s3_endpoint_url=None, holdout=str(holdout / "*")))
    resources["language_model"] = BaseModelResource(source=str(tiny_model_dir), layer=1, device="cpu")
    resources["features"] = stage_resource("features", {"sae_name": NAME, "top_k": TOP_K, "reservoir_factor": 4,
                                                        "device": "cpu"})
    return Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources)


def test_a_vector_gets_feature_tables_and_a_browser_page(cached, store, tiny_model_dir, text_dir, tmp_path):
    d_model = cached
    direction = np.random.default_rng(0).standard_normal(d_model).astype(np.float32) * 3
    path = tmp_path / "probe.npy"
    np.save(path, direction)
    added = add_vector(store, NAME, path, "main")
    assert added["committed"] and added["d_model"] == d_model
    assert not add_vector(store, NAME, path, "main")["committed"]  # the same vector again: nothing new
    sae, cfg = load_sae(store, NAME)
    assert cfg["sae"]["variant"] == "vector" and sae.n_latents == 1

    defs = _defs(store, tiny_model_dir, text_dir, tmp_path)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, [f.key for f in list_source(str(text_dir / "*"))])
    assert build_features(instance, defs, NAME)

    # the top examples: a brute-force ranking of ReLU(x . d/|d|) over every cached row
    unit = torch.from_numpy(direction).double() / float(np.linalg.norm(direction.astype(np.float64)))
    brute = []
    for key in sh.pinned_keys(store, "main"):
        acts = torch.from_numpy(np.asarray(open_partition(store, key).group["acts"][:])).double()
        brute += [(float(a), key, row) for row, a in enumerate((acts @ unit).tolist()) if a > 0]
    brute.sort(key=lambda t: (-t[0], t[1], t[2]))
    tables = [read_tables(store, NAME, i) for i in range(N_FEATURE_SHARDS)]
    examples = pl.concat([t.examples for t in tables])
    top = examples.filter(pl.col("kind") == "top").sort("rank")
    assert [(p, r) for p, r in zip(top["partition"], top["row"], strict=True)] == [(k, r) for _, k, r in
                                                                                     brute[:TOP_K]]
    assert np.allclose(top["activation"].to_numpy(), [a for a, _, _ in brute[:TOP_K]], rtol=1e-4)
    stats = pl.concat([t.stats for t in tables])
    assert stats.height == 1 and stats["count"][0] == len(brute)
    assert examples.filter(pl.col("kind") == "interval").height > 0

    # its browser page: the one feature, with top and interval examples and the histogram
    site = store.path("browser", NAME)
    index = json.loads(open(f"{site}/site.json").read())
    print(index)
