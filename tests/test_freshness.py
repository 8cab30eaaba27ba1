"""The freshness policy over several hook points: every hook point's shuffled store must pin the
cached activations, and an SAE of a later hook point is judged against its own store's plan."""

import pytest

from sae_platform import catalog
from sae_platform import shuffle as sh
from sae_platform.activations import CacheSettings, cache_text_file
from sae_platform.corpus import list_source
from sae_platform.freshness import stale_reasons
from sae_platform.trainer import TrainSettings, train_sae

HOOKS = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]


def _cache(store, model, text_dir, key):
    text_file = next(f for f in list_source(str(text_dir / "*")) if f.key == key)
    cache_text_file(store, text_file, model, "tiny", CacheSettings(ctx_len=16, batch_size=4, hook_points=HOOKS))


def _shuffle(store, name):
    index = catalog.hook_shuffle_names(store, "main").index(name)  # the hook-point entry it holds
    sh.run_shuffle(store, name, n_buckets=2, memory_budget_bytes=1 << 20, n_jobs=1, seed=0, store_index=index)


def _reasons(store, sae_name="mlp1"):
    return stale_reasons(store, shuffle_name="main", sae_name=sae_name, n_feature_shards=1)


@pytest.fixture
def cached(store, tiny_hooked, text_dir):
    for key in ("alpha", "beta"):
        _cache(store, tiny_hooked, text_dir, key)
    return store


def test_every_hook_points_shuffled_store_must_pin_the_cached_activations(cached, tiny_hooked, text_dir):
    store = cached
    assert catalog.hook_shuffle_names(store, "main") == ["main", "main.h1"]
    _shuffle(store, "main")
    assert _reasons(store) == ["no shuffled store 'main.h1' (blocks.1.hook_mlp_out) yet (2 cached partition(s))"]
    _shuffle(store, "main.h1")
    assert _reasons(store) == ["SAE 'mlp1' was never trained"]

    # an SAE of the second hook point: judged against main.h1's plan, not main's
    train_sae(store, "main.h1", "mlp1", TrainSettings(variant="topk", n_latents=64, k=4, batch_size=64,
                                                      token_budget=256, holdout_rows=64, hook_point=HOOKS[1]),
              log=lambda m: None)
    assert _reasons(store) == ["feature tables f0 of 'mlp1' were never built"]

    # a new batch, re-shuffled for the first hook point only: the second one's store is behind
    _cache(store, tiny_hooked, text_dir, "gamma")
    _shuffle(store, "main")
    assert _reasons(store) == ["the shuffled store 'main.h1' (blocks.1.hook_mlp_out) is older than the cached "
                               "activations (new: gamma)"]
    _shuffle(store, "main.h1")
    plan = sh.committed_plan_id(store, "main.h1")
    assert plan != sh.committed_plan_id(store, "main")
    assert _reasons(store) == [f"SAE 'mlp1' is not a finished training on shuffle plan {plan} "
                               "(shuffled store 'main.h1'), nor one the refresh policy keeps (only new batches "
                               "holding less than 10% of its training tokens)"]  # gamma holds more


def test_both_stores_behind_give_one_reason_each(cached, tiny_hooked, text_dir):
    store = cached
    for name in ("main", "main.h1"):
        _shuffle(store, name)
    _cache(store, tiny_hooked, text_dir, "gamma")
    assert _reasons(store) == [
        "the shuffled store 'main' (blocks.1.hook_resid_post) is older than the cached activations (new: gamma)",
        "the shuffled store 'main.h1' (blocks.1.hook_mlp_out) is older than the cached activations (new: gamma)"]
