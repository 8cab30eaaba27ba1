"""The shuffle through Dagster: a ranged run of the shuffle job, its blocking and uniformity checks."""

import numpy as np
import pytest
from dagster import DagsterInstance, Definitions

from assets import ASSETS
from assets.shuffle import uniformity_problems
from jobs.definitions import ASSET_JOBS, build_resources
from jobs.settings import Settings
from resources import stage_resource
from sae_platform import shuffle as sh
from sae_platform.activations import CacheSettings, cache_text_file, open_partition
from sae_platform.catalog import list_partitions
from sae_platform.corpus import list_source
from sae_platform.shuffle_checks import uniformity_from_ids
from sae_platform.shuffled import iter_shuffled

ALL_WORKERS = {"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "3"}


@pytest.fixture
def cached(store, tiny_hooked, text_dir):
    for name in ("delta", "epsilon", "zeta"):  # six batches: more rows than one job may hold
        (text_dir / f"{name}.txt").write_text((text_dir / "gamma.txt").read_text())
    for text_file in list_source(str(text_dir / "*")):
        cache_text_file(store, text_file, tiny_hooked, "tiny", CacheSettings(ctx_len=16, batch_size=4, dtype="float32"))
    return store


def _run_shuffle(store, text_dir, budget):
    resources = build_resources(Settings(root_url=store.root_url, data_dir=str(text_dir),
                                         inbox=str(text_dir / "*"), s3_endpoint_url=None))
    resources["shuffle"] = stage_resource("shuffle", {"n_buckets": 4, "memory_budget_bytes": budget, "seed": 7})
    defs = Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources)
    return defs.resolve_job_def("shuffle_activations").execute_in_process(
        instance=DagsterInstance.ephemeral(), tags=ALL_WORKERS, raise_on_error=False)


def test_shuffle_job_runs_every_pass_and_its_checks_pass(cached, text_dir):
    n_rows = sum(open_partition(cached, k).n_rows for k in list_partitions(cached))
    result = _run_shuffle(cached, text_dir, budget=460_000)
    assert result.success
    plan = {k: v.value for k, v in result.asset_materializations_for_node("shuffle_plan")[0].metadata.items()}
    assert plan["n_rows"] == n_rows and plan["n_passes"] >= 2, plan
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["shuffle_is_a_permutation"].passed
    assert checks["shuffle_is_uniform"].passed, checks["shuffle_is_uniform"].metadata
    ids = np.concatenate([i for i, _ in iter_shuffled(cached, "main", batch_rows=100)])
    assert sorted(ids.tolist()) == list(range(n_rows)) and not (np.diff(ids) == 1).all()
    assert not cached.fs.exists(cached.path("shuffle/main", sh.load_run(cached, "main").plan_id))


def test_uniformity_problems_flags_an_unshuffled_order():
    n = 10_000
    in_order = uniformity_from_ids([np.arange(n)], n)
    assert uniformity_problems(in_order)
    shuffled = uniformity_from_ids([np.random.default_rng(0).permutation(n)], n)
    assert uniformity_problems(shuffled) == []
