"""The freshness policy over several hook points: every hook point's shuffled store must pin the
cached activations, and an SAE of a later hook point is judged against its own store's plan."""

import pytest

from sae_platform import catalog
from sae_platform import shuffle as sh
from sae_platform.activations import CacheSettings, cache_text_file
from sae_platform.corpus import list_source
from sae_platform.freshness import FeatureState, stale_reasons
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


def test_the_browser_warns_while_a_cached_batch_is_not_in_it(tmp_path, tiny_model_dir, text_dir, monkeypatch, capsys):
    """After a full build, one more cached batch turns feature_browser's describes_every_cached_batch
    into a warning naming it (reported by the freshness sensor without a run, and by the browser's own
    skipped build), and `status` says the chain is behind; a rebuild makes both current again."""
    from dagster import AssetCheckKey, AssetCheckSeverity, AssetKey, build_sensor_context
    from test_stage import _deployment, _op_path

    from jobs.cli import main

    defs, instance, store = _deployment(tmp_path, "op", tiny_model_dir, text_dir)
    monkeypatch.setenv("SAE_PLATFORM_ROOT", store.root_url)
    monkeypatch.setenv("SAE_PLATFORM_INBOX", str(tmp_path / "none" / "*"))
    check = AssetCheckKey(AssetKey("feature_browser"), "describes_every_cached_batch")
    sensor = defs.get_sensor_def("downstream_freshness_sensor")
    resources = dict(defs.resources)

    def tick(cursor):
        with build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
            return sensor.evaluate_tick(context)

    def latest():
        return instance.get_latest_asset_check_evaluation_record(check)

    def status() -> str:
        capsys.readouterr()
        main(["status"])
        return capsys.readouterr().out

    _op_path(defs, instance)
    assert latest().evaluation.passed, "a full build describes every cached batch"
    cursor = tick(None).cursor
    out = status()
    assert "topk-4k-k32 downstream of the cached activations: current" in out
    assert "feature tables of topk-4k-k32: 4 of 4" in out and out.count(": current") == 3, out

    (tmp_path / "op" / "inbox" / "delta.txt").write_text((text_dir / "gamma.txt").read_text() * 2)
    instance.add_dynamic_partitions("activation_batches", ["delta"])
    defs.resolve_job_def("cache_activations").execute_in_process(instance=instance, partition_key="delta")
    result = tick(cursor)
    assert len(result.run_requests) == 1, "the sensor still launches the refresh"
    warned = latest()
    assert not warned.evaluation.passed and warned.evaluation.severity == AssetCheckSeverity.WARN
    assert "new: delta" in warned.evaluation.metadata["behind"].value, warned.evaluation.metadata
    assert warned.evaluation.target_materialization_data is not None, "shown as the check of the latest browser"
    assert tick(result.cursor).cursor == result.cursor and latest().id == warned.id, "reported once per change"

    out = status()
    lines = {line.split(":", 1)[0].strip(): line for line in out.splitlines() if "topk-4k-k32" in line}
    tables, browser = lines["feature tables of topk-4k-k32"], lines["feature browser of topk-4k-k32"]
    # no line says current while the check warns: each names the batch the chain has not taken in
    assert "4 of 4 feature shard(s) built" in tables and ": current" not in out, out
    for line in (tables, browser, lines["topk-4k-k32 downstream of the cached activations"]):
        assert "behind: the shuffled store 'main' is older than the cached activations (new: delta)" in line, out
    assert "feature browser of topk-4k-k32: shows checkpoint" in browser

    # Building the browser alone skips (it describes the current checkpoint) and re-checks: still a warning.
    built = defs.resolve_job_def("build_browser").execute_in_process(instance=instance)
    assert built.success
    (evaluation,) = built.get_asset_check_evaluations()
    assert not evaluation.passed and "new: delta" in evaluation.metadata["behind"].value

    _op_path(defs, instance)  # the refresh
    assert latest().evaluation.passed
    assert "topk-4k-k32 downstream of the cached activations: current" in status()
    assert latest().evaluation.passed and tick(result.cursor).skip_message

    # The SAE evaluated again after the site was built: its overview shows older figures. status says so
    # on the browser's line (the rule the browser rebuilds on), though every cached batch is described.
    _evaluated_again(store, "topk-4k-k32")
    out = status()
    browser = next(line for line in out.splitlines() if "feature browser of topk-4k-k32" in line)
    assert "behind: the feature browser of 'topk-4k-k32' shows figures older than the committed ones" in browser
    assert "topk-4k-k32 downstream of the cached activations: current" in out
    assert defs.resolve_job_def("build_browser").execute_in_process(instance=instance).success  # rebuilt
    assert status().count(": current") == 3


def _evaluated_again(store, sae_name: str) -> None:
    """Commit the evaluation of ``sae_name`` again (the same files, a new version): a newer figure."""
    name = catalog.eval_name(sae_name)
    old = store.resolve(name)
    with store.writing(name, **catalog.checkpoint_pin(catalog.checkpoint_version(store, sae_name))) as version:
        for path in store.fs.ls(old, detail=False):
            file = path.rstrip("/").rsplit("/", 1)[-1]
            if file != catalog.CHECKSUMS and store.fs.isfile(path):
                store.fs.pipe_file(f"{version}/{file}", store.fs.cat_file(path))


def test_the_browser_is_behind_on_figures_committed_after_it_was_built(store):
    """The rule `status` and feature_browser share: a site pins the figures its overview shows."""
    from sae_platform.browser.generate import SITE_POINTER
    from sae_platform.compare import figures_version
    from sae_platform.freshness import browser_figures_behind

    assert browser_figures_behind(store, "sae") == []  # no site: the chain's own reason says so
    with store.writing(catalog.eval_name("sae")) as version:
        store.write_json(f"{version}/{catalog.EVAL_REPORT}", {"fvu": 0.1})
    store.write_json(f"{catalog.browser_dir(store, 'sae')}/{SITE_POINTER}",
                     {"version": "v", "figures_version": figures_version(store, ["sae"])})
    assert browser_figures_behind(store, "sae") == []
    with store.writing(catalog.eval_name("sae")) as version:  # measured again
        store.write_json(f"{version}/{catalog.EVAL_REPORT}", {"fvu": 0.1})
    assert browser_figures_behind(store, "sae") == [
        "the feature browser of 'sae' shows figures older than the committed ones (an evaluation, sparse probing "
        "or absorption measured since it was built)"]

def test_tables_of_another_feature_shard_layout_are_behind_never_mixed():
    """A changed memory budget that changes the shard count makes every table of the old layout stale
    (its shards cover other latents); a record from before layouts were recorded counts as the fixed
    one-shard-per-group layout it was built in."""
    mixed = FeatureState("run", "v1", ("v1",) * 8, "v1", shard_layouts=(4,) * 4 + (8,) * 4)
    assert mixed.tables_behind() == [
        f"feature tables f{i} of 'run' were built as one of 4 feature shards, not of the 8 planned now "
        "(resources.features.config.memory_budget_bytes)" for i in range(4)]
    rebuilt = FeatureState("run", "v1", ("v1",) * 8, "v1", shard_layouts=(8,) * 8)
    assert rebuilt.tables_behind() == []
    # the browser still shows the 4-shard layout: behind, so every feature stage runs until it is rebuilt
    assert rebuilt.browser_behind() == ["the feature browser of 'run' shows 4 feature shards, not the 8 planned now "
                                        "(resources.features.config.memory_budget_bytes)"]
    assert FeatureState("run", "v1", ("v1",) * 8, "v1", shard_layouts=(8,) * 8, browser_shards=8).behind() == []
    assert FeatureState("run", "v1", ("v1",) * 4, "v1", shard_layouts=(None,) * 4).tables_behind() == []
    assert FeatureState("run", "v1", ("v1",) * 8, "v1", shard_layouts=(None,) * 8).shard_behind(7).startswith(
        "feature tables f7 of 'run' were built as one of 4 feature shards")
