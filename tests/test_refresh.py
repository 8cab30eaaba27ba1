"""Issue 30.3: new data costs what it adds. After a full build, a batch adding less than
retrain_above_fraction of the SAE's training tokens keeps the checkpoint (stale, with the reason),
encodes pass 1 for that batch only, and the tables equal a from-scratch build with the same
checkpoint; a larger batch retrains. Real `dagster job execute -j full_pipeline` runs, tiny model."""

import re
import shutil
import time
from pathlib import Path

import polars as pl
import pytest
from conftest import TINY_SAE, deployment
from test_full_pipeline import BATCHES as OLD  # the first build's batches
from test_full_pipeline import assert_tables_match_brute_force, execute_full_pipeline
from transformers import AutoTokenizer

from assets.features import shown_examples
from sae_platform import contexts
from sae_platform import feature_codes as fc
from sae_platform import features as ft
from sae_platform.catalog import (
    checkpoint_name,
    contexts_partial_name,
    lineage_record_path,
    shuffled_input_group,
    stage_record_path,
)
from sae_platform.feature_intervals import add_interval_examples
from sae_platform.feature_merge import merge_partials, read_tables
from sae_platform.freshness import refresh_plan, stale_reasons
from sae_platform.refresh import Unseen, unseen_since
from sae_platform.settings import SettingsError
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import TrainSettings, load_sae

SMALL_TEXT = "The quick brown fox jumps over the lazy dog. " * 2


def _built_by(store: ArtifactStore, asset: str, partition: str) -> str:
    return store.read_json(stage_record_path(store, asset, partition))["built_by_run"]


def _run(env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    run = execute_full_pipeline(env, Path(env["SAE_PLATFORM_RUN_CONFIG"]))
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    return time.perf_counter() - started, run.stderr


def _from_scratch(store: ArtifactStore, keys: list[str]) -> list:
    """Pass 1 in memory over every batch with the current checkpoint, merged, with the interval
    examples pass 2 samples: what a full rebuild writes."""
    settings = ft.FeatureSettings(sae_name=TINY_SAE, top_k=5, reservoir_factor=2, random_examples=4)
    sae, _ = load_sae(store, TINY_SAE)
    shards = ft.feature_shards(sae.n_latents, 4)
    group = shuffled_input_group(store, "main")
    partials = [ft.compute_partials(store, sae, key, shards, settings, group=group) for key in keys]
    return [add_interval_examples(store, sae, TINY_SAE, merge_partials([p[i] for p in partials], settings))
            for i in range(4)]


def _pass_3(log: str, batch: str) -> tuple[int, int]:
    """(windows reused, windows computed) that pass 3 of ``batch`` logged in a run."""
    found = re.findall(rf"pass 3 \[{batch}\]: ([\d,]+) windows reused, ([\d,]+) computed", log)
    assert found and len(set(found)) == 1, log[-3000:]  # the Dagster log, and the core's where it shows
    return tuple(int(n.replace(",", "")) for n in found[0])


def _windows_match_a_build_from_scratch(store: ArtifactStore, batch: str, model_dir: Path) -> None:
    """The committed windows of ``batch`` equal pass 3 run from scratch on the current tables."""
    settings = ft.FeatureSettings(sae_name=TINY_SAE, random_examples=4)  # the deployment's, as _from_scratch
    sae, _ = load_sae(store, TINY_SAE)
    shown = pl.concat([shown_examples(read_tables(store, TINY_SAE, i).examples, settings.random_examples)
                       for i in range(4)])
    scratch = contexts.context_windows(store, sae, batch, contexts.requests_for_partition(shown, batch),
                                       AutoTokenizer.from_pretrained(str(model_dir)), before=settings.before,
                                       after=settings.after, codes=fc.read_codes(store, TINY_SAE, batch, sae),
                                       group=shuffled_input_group(store, "main"))
    assert contexts.regroup_by_feature(store, TINY_SAE, [batch], 0, sae.n_latents).equals(scratch)


def test_small_batch_keeps_the_sae_and_updates_the_tables_incrementally(tmp_path, tiny_model_dir, text_dir):
    env = deployment(tmp_path, tiny_model_dir, text_dir)
    inbox = Path(env["SAE_PLATFORM_INBOX"]).parent
    for name in OLD:
        shutil.copy(text_dir / f"{name}.txt", inbox / f"{name}.txt")
    first_s, _ = _run(env)
    store = ArtifactStore(env["SAE_PLATFORM_ROOT"])
    kept = store.pointer(checkpoint_name(TINY_SAE))
    first_run = _built_by(store, "feature_codes", "alpha")

    (inbox / "delta.txt").write_text(SMALL_TEXT)  # a few dozen tokens: < 10% of the 1,536 trained on
    small_s, log = _run(env)
    assert store.pointer(checkpoint_name(TINY_SAE))["version"] == kept["version"]  # not retrained
    assert "kept by the refresh policy (stale: trained on 1,536 tokens," in log, log[-3000:]
    assert "new tokens not seen (" in log and "batches delta" in log
    # pass 1 encoded the new batch only; the old batches' partials were reused
    assert _built_by(store, "feature_codes", "delta") != first_run
    assert {_built_by(store, "feature_codes", k) for k in OLD} == {first_run}
    assert {_built_by(store, "feature_stats_partial", f"{k}|f{g}") for k in OLD
            for g in range(4)} == {first_run}  # every (batch, shard group) job of the old batches: kept
    assert _built_by(store, "feature_stats_partial", "delta|f3") != first_run
    assert stale_reasons(store, shuffle_name="main", sae_name=TINY_SAE, n_feature_shards=4) == []
    # the tables describe every batch, the new one included, exactly as a from-scratch build would
    tables = [read_tables(store, TINY_SAE, i) for i in range(4)]
    assert sorted(p["key"] for p in tables[0].meta["partitions"]) == sorted([*OLD, "delta"])
    assert "delta" in set(pl.concat([t.examples for t in tables])["partition"].to_list())
    assert_tables_match_brute_force(store, TINY_SAE, shuffled_input_group(store, "main"))
    for stored, scratch in zip(tables, _from_scratch(store, sorted([*OLD, "delta"])), strict=True):
        assert stored.stats.equals(scratch.stats) and stored.examples.equals(scratch.examples)
    site = store.read_json(f"{store.path('browser', TINY_SAE)}/site.json")
    assert sorted(site["batches"]) == sorted([*OLD, "delta"])
    # pass 3 of an old batch reused the windows still shown and computed the new examples' only
    reused, computed = _pass_3(log, "alpha")
    assert reused > computed, (reused, computed)
    print(f"\npass 3 of alpha after the small batch: {reused} windows reused, {computed} computed")
    assert _pass_3(log, "delta") == (0, store.pointer(contexts_partial_name(TINY_SAE, "delta"))["n_windows"])
    assert store.pointer(contexts_partial_name(TINY_SAE, "alpha"))[contexts.BUILT_FROM]["checkpoint"] == \
        kept["version"]
    _windows_match_a_build_from_scratch(store, "alpha", tiny_model_dir)

    (inbox / "epsilon.txt").write_text((text_dir / "gamma.txt").read_text() + " another batch")  # ~775 tokens
    large_s, log = _run(env)
    resumed = store.pointer(checkpoint_name(TINY_SAE))
    assert resumed["version"] != kept["version"]  # retrained: above the threshold, resumed from the kept one
    assert resumed["step"] > kept["step"] and f"resume from step {kept['step']:,} for " in log, log[-3000:]
    assert "epsilon" in {b["key"] for b in store.pointer(checkpoint_name(TINY_SAE))["trained_batches"]}
    assert stale_reasons(store, shuffle_name="main", sae_name=TINY_SAE, n_feature_shards=4) == []
    assert _pass_3(log, "alpha")[0] == 0 and "(rebuilt: built from another checkpoint)" in log  # a new SAE
    _windows_match_a_build_from_scratch(store, "alpha", tiny_model_dir)
    plan = refresh_plan(store, shuffle_name="main", sae_name=TINY_SAE, n_feature_shards=4)
    batches = len(OLD) + 2  # and delta, epsilon
    assert plan.startswith(f"refresh will keep {TINY_SAE} (current); feature pass 1 for 0 of {batches} batch(es)"), plan
    assert ": ~" in plan and "never timed" not in plan, plan  # every stage recorded its seconds
    assert "the exports (sae_comparison, circuit_tracer_export, neuronpedia_export)" in plan, plan
    print(plan)
    print(f"\ndrop -> browser on the tiny setup: first build {first_s:.0f} s, small batch (SAE kept) "
          f"{small_s:.0f} s, large batch (retrained) {large_s:.0f} s")


def _record(store: ArtifactStore, asset: str, partition: str, seconds: float) -> None:
    store.write_json(stage_record_path(store, asset, partition), {"version": "v", "seconds": seconds})


def test_the_plan_estimates_every_stage_it_runs_and_says_resume_or_from_scratch(store):
    """The refresh plan names and times every stage full_pipeline will run, explanations and the
    exports included (from their stage records; a stage never timed is named as unknown, not
    silently left out), and says "resume" above the threshold when the settings allow it, "from
    scratch" with the changed setting when they do not."""
    from test_trainer import SETTINGS, make_shuffled

    from sae_platform.trainer import identity, train_sae

    settings = TrainSettings(**{**SETTINGS.__dict__, "token_budget": 256 * 4})
    make_shuffled(store)
    train_sae(store, "main", "run", settings, log=lambda m: None)
    make_shuffled(store, n_partitions=1, first=3)  # 1,500 new rows: 146% of the 1,024 trained tokens
    chain = {"shuffle_name": "main", "sae_name": "run", "n_feature_shards": 2}
    plan = refresh_plan(store, **chain, training=identity(settings))
    assert "resume from step 4 for 5 more step(s), the budget raised by 1,500 new tokens (batches p3) of run" in plan
    assert "pass 2, contexts and explanations for 2 shard(s)" in plan, plan
    assert "the exports (sae_comparison, circuit_tracer_export, neuronpedia_export)" in plan, plan
    assert "unknown for " in plan and "feature_explanations" in plan.split("unknown for ")[1], plan
    assert "neuronpedia_export" in plan.split("unknown for ")[1], plan

    seconds = {"feature_codes": 1.0, "feature_stats_partial": 2.0, "feature_topk": 3.0, "feature_contexts": 5.0,
               "feature_explanations": 7.0, "feature_context_windows": 11.0}
    for asset, each in seconds.items():
        for partition in ("a", "b"):
            _record(store, asset, partition, each)
    for asset, total in (("sae_eval", 13.0), ("feature_browser", 17.0), ("sae_comparison", 19.0),
                         ("circuit_tracer_export", 23.0), ("neuronpedia_export", 29.0), ("sae_checkpoint", 31.0),
                         *((stage, 1.0) for stage in ("shuffle_plan", "shuffle_pass_1", "shuffle_pass_2",
                                                      "shuffle_final", "shuffled_activations"))):
        _record(store, asset, "all", total)
    retrain = refresh_plan(store, **chain, training=identity(TrainSettings(**{**settings.__dict__, "n_latents": 96})))
    assert "train run from scratch (the settings changed since the checkpoint was trained (n_latents 64 → 96)" \
        in retrain, retrain
    # 5 shuffle stages + training 31 + eval 13, the encode of 4 batches, pass 1 for 4 batches x 2 shard groups,
    # 3 table stages x 2 shards, pass 3 x 4, the browser and the three exports
    expected = 5 + 31 + 13 + 1 * 4 + 2 * 4 * 2 + (3 + 5 + 7) * 2 + 11 * 4 + 17 + 19 + 23 + 29
    assert retrain.endswith(f": ~{expected / 60:.0f} min by the last recorded stage timings"), (retrain, expected)


def test_the_plan_counts_every_shard_of_the_planned_layout(store):
    """A table stage's record times one shard-group job, which ran the shards per group of the layout
    the tables were last built in: the plan scales that to every shard of the layout planned now (16
    shards in 4 group jobs of 4 after timings of 1 shard per group: 4x the table work, not 1x)."""
    from test_trainer import SETTINGS, make_shuffled

    from sae_platform.trainer import identity, train_sae

    settings = TrainSettings(**{**SETTINGS.__dict__, "token_budget": 256 * 4})
    make_shuffled(store)
    train_sae(store, "main", "run", settings, log=lambda m: None)
    for asset in ("feature_topk", "feature_contexts", "feature_explanations"):  # 20 s a group job: 80 s a stage
        for group in ("f0", "f1", "f2", "f3"):
            _record(store, asset, group, 20.0)

    def table_seconds(n_feature_shards: int) -> float:
        plan = refresh_plan(store, shuffle_name="main", sae_name="run", n_feature_shards=n_feature_shards,
                            training=identity(settings))
        assert f"for {n_feature_shards} shard(s) in 4 group job(s)" in plan, plan
        amount, unit = re.search(r": ~(\d+) (s|min)\b", plan).groups()  # then "+ unknown for" the stages never timed
        return float(amount) * (60 if unit == "min" else 1)

    assert table_seconds(4) == 3 * 80       # timed in the 4-shard layout (no layout recorded: the fixed 4)
    assert table_seconds(16) == 3 * 320     # 16 shards: 4 a group job, each as long as a whole job was
    store.write_json(lineage_record_path(store, "run", 0), {"feature_layout": {"n_shards": 16}})
    assert table_seconds(16) == 3 * 80      # timed in that layout: as recorded
    assert table_seconds(4) == 3 * 20       # back to 1 shard a job: a quarter


def test_the_policy_keeps_only_added_batches_below_the_fraction():
    index = {"name": "main", "d_model": 32, "plan_id": "new",
             "inputs": [{"key": "a", "version": "1", "n_rows": 900}, {"key": "b", "version": "1", "n_rows": 100},
                        {"key": "c", "version": "1", "n_rows": 50}]}
    pointer = {"final": True, "tokens": 1000, "data": {"shuffle": "main", "d_model": 32, "plan_id": "old"},
               "trained_batches": [{"key": "a", "version": "1", "n_rows": 900},
                                   {"key": "b", "version": "1", "n_rows": 100}], "heldout_rows": 64}
    unseen = unseen_since(pointer, index)
    assert unseen == Unseen(1000, ("c",), 50) and unseen.within(0.1) and not unseen.within(0.05)
    assert unseen.describe() == "stale: trained on 1,000 tokens, 50 new tokens not seen (5.0%, batches c)"
    recached = {**index, "inputs": [{**index["inputs"][0], "version": "2"}, *index["inputs"][1:]]}
    assert unseen_since(pointer, recached) is None  # a batch replaced: the SAE's data changed, not grew
    assert unseen_since({**pointer, "trained_batches": None}, index) is None  # nothing recorded: retrain
    # no held-out rows recorded: which rows of the rebuilt store it never saw is unknown, so retrain
    assert unseen_since({k: v for k, v in pointer.items() if k != "heldout_rows"}, index) is None
    assert unseen_since({k: v for k, v in pointer.items() if k != "heldout_rows"}, {**index, "plan_id": "old"}) \
        == Unseen(1000)  # its own store: its held-out rows are the store's last rows
    assert unseen_since(pointer, {**index, "plan_id": "old"}) == Unseen(1000)
    assert TrainSettings().retrain_above_fraction == 0.1
    with pytest.raises(SettingsError, match="retrain_above_fraction"):
        TrainSettings(retrain_above_fraction=1.5)
