"""Feature tables through Dagster on a tiny model: passes 1-3, the exactness check, lineage and the browser."""

import dataclasses
import gc
import inspect
import json
import re
import weakref
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import cache_and_shuffle, load_tiny_hooked, tiny_definitions, write_text_inbox
from dagster import AssetKey, DagsterInstance, Definitions

from assets import ASSETS, STAGES
from assets import features as features_assets
from assets.partitions import ACTIVATION_BATCHES, FEATURE_SHARDS, N_FEATURE_SHARDS, pass_1_job_key
from jobs.cli import build_features, run_failure
from jobs.cli.status import _print_features
from jobs.definitions import ASSET_JOBS
from resources import LLMExplainerResource, stage_resource
from sae_platform import contexts as ctx
from sae_platform import trainer
from sae_platform.catalog import codes_name, logits_name, neuronpedia_name, partial_name
from sae_platform.corpus import list_source
from sae_platform.feature_layout import planned_layout, planned_shards
from sae_platform.feature_merge import build_feature_tables, read_tables
from sae_platform.features import FeatureSettings
from sae_platform.freshness import feature_state, stale_reasons
from sae_platform.lineage import feature_table_lineage, format_lineage, recorded_layout_shards, recorded_shard_count
from sae_platform.llm_explain import serve_chat
from sae_platform.metrics import explanations_current, read_explanations
from sae_platform.neuronpedia import check_record, export_current, read_export
from sae_platform.partial_store import read_partial
from sae_platform.shuffle import pinned_keys
from sae_platform.shuffled import open_shuffled
from sae_platform.storage import POINTER, ArtifactStore
from sae_platform.tables import (
    EXAMPLE_SCHEMA,
    EXPLANATION_SCHEMA,
    LLM_EXPLANATION_SCHEMA,
    LOGIT_SCHEMA,
    STATS_SCHEMA,
    WINDOW_SCHEMA,
)
from sae_platform.trainer import TrainSettings, train_sae
from tests.test_features import all_tables
from tests.test_llm_explain import KEY, RuleModel

SAE = "topk-4k-k32"


def _trained(store, tiny_model_dir, tiny_hooked, text_dir, tmp_path):
    """Two cached batches (beta, markup: every path over several batches, at 6 Dagster runs a batch
    fewer per build than the inbox's four; each batch is an encode, 4 pass-1 jobs and a pass 3),
    shuffled, a 256-latent TopK SAE trained on them, and the deployment's Definitions and an instance
    knowing the batches: (defs, instance)."""
    for name in ("alpha", "gamma"):
        (text_dir / f"{name}.txt").unlink()
    (text_dir / "markup.txt").write_text("Beware <script>window.__xss=1</script> and <img src=x> " * 40)
    cache_and_shuffle(store, tiny_model_dir, tiny_hooked, text_dir)
    train_sae(store, "main", SAE, TrainSettings(variant="topk", n_latents=256, k=8, batch_size=256,
                                               token_budget=256 * 8, holdout_rows=256), log=lambda m: None)
    defs = tiny_definitions(store, tiny_model_dir, text_dir, tmp_path,
                            features={"sae_name": SAE, "top_k": 5, "reservoir_factor": 4, "device": "cpu"})
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, [f.key for f in list_source(str(text_dir / "*"))])
    return defs, instance


@pytest.fixture
def pipeline(store, tiny_model_dir, tiny_hooked, text_dir, tmp_path):
    """A trained SAE whose features are not built yet (``_trained``), for a test of its own."""
    return _trained(store, tiny_model_dir, tiny_hooked, text_dir, tmp_path)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """``_trained``'s setup with its features built once (``build_features``), shared by the tests that
    only read that build; each test that rebuilds, breaks or re-lays-out the tables has its own
    (``pipeline``). (defs, instance, store, the stack's function names at each whole-SAE load)."""
    tmp_path = tmp_path_factory.mktemp("built")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    defs, instance = _trained(store, tiny_model_dir, load_tiny_hooked(tiny_model_dir),
                              write_text_inbox(tmp_path / "inbox"), tmp_path)
    loaded_by = []
    load_sae = features_assets.load_sae
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("SAE_PLATFORM_RUN_CONFIG", raising=False)  # as conftest's autouse fixture, not yet run
        patch.setattr(features_assets, "load_sae", lambda *a, **k: loaded_by.append(
            {frame.function for frame in inspect.stack(context=0)}) or load_sae(*a, **k))
        assert build_features(instance, defs, SAE)
    return defs, instance, store, loaded_by


def test_feature_pipeline_through_dagster(built, monkeypatch):
    defs, instance, store, loaded_by = built
    # the functions on the stack of each whole-SAE load: pass 2 (merge_shard), the exactness check and
    # pass 3 of this TopK SAE (window activations from pass 1's codes) are never one: they read its
    # config and fingerprint only (assets.features._stored)
    steps = {frame for stack in loaded_by for frame in stack} & {"encode_batch", "merge_shard", "check_brute_force",
                                                                 "context_windows", "explain_shard"}
    assert steps == {"encode_batch", "explain_shard"}, steps
    for stage in STAGES.values():  # every feature stage ran (the LLM explanations: skipped, they are off)
        if stage.group == "features":
            assert instance.fetch_materializations(AssetKey(stage.asset), limit=1).records, stage.asset
    checks = [e for e in instance.fetch_materializations(AssetKey("feature_topk"), limit=10).records]
    assert len(checks) == N_FEATURE_SHARDS
    total = 0
    for index in range(N_FEATURE_SHARDS):
        tables = read_tables(store, SAE, index)
        contexts = ctx.read_feature_contexts(store, SAE, index)
        total += tables.stats.height
        assert set(contexts["feature"].to_list()) <= set(tables.stats["feature"].to_list())
        top = tables.examples.filter(tables.examples["kind"] == "top")
        assert contexts.filter(contexts["kind"] == "top").height == top.height
    assert total == 256
    site = store.path("browser", SAE)
    index = json.loads(open(f"{site}/site.json").read())
    assert json.loads(open(f"{site}/{index['data']}/index.json").read())["n_features"] == 256
    # explanations: one row per feature of each shard, pinned to the checkpoint, scores in [0, 1]
    explained = pl.concat([read_explanations(store, SAE, i) for i in range(N_FEATURE_SHARDS)])
    assert explained["feature"].to_list() == list(range(256))
    scored = explained.filter(pl.col("recall").is_not_null())
    assert scored.height > 0 and scored["recall"].is_between(0, 1).all()
    assert (explained["neighbors"].list.len() == 10).all()
    meta = instance.fetch_materializations(AssetKey("feature_explanations"), limit=10).records
    assert len(meta) == N_FEATURE_SHARDS
    assert all(explanations_current(store, SAE, i) for i in range(N_FEATURE_SHARDS))
    # the Neuronpedia export: every feature and every window, each record as Neuronpedia defines it
    records = read_export(store, SAE)
    assert [int(f["index"]) for f in records["features"]] == list(range(256))
    n_windows = sum(ctx.read_feature_contexts(store, SAE, i).height for i in range(N_FEATURE_SHARDS))
    assert len(records["activations"]) == n_windows > 0
    for kind, name in (("feature", "features"), ("activation", "activations"), ("explanation", "explanations"),
                       ("source", "source"), ("model", "model"), ("sourceset", "sourceset"), ("release", "release")):
        for record in records[name]:
            check_record(kind, record)
    first = records["features"][0]
    assert {(len(f["vector"]), f["hookName"]) for f in records["features"]} == {(32, first["hookName"])}, first
    assert first["hookName"].endswith(".hook_resid_post") and first["hookName"] in records["source"][0]["notes"]
    assert export_current(store, SAE, N_FEATURE_SHARDS)
    (exported,) = instance.fetch_materializations(AssetKey("neuronpedia_export"), limit=1).records
    shown = {k: v.value for k, v in exported.asset_materialization.metadata.items()}
    written = Path(store.resolve(neuronpedia_name(SAE))) / shown["source"]
    assert shown["bytes"] == sum(p.stat().st_size for p in written.rglob("*") if p.is_file()) and shown["seconds"] >= 0

    # optional LLM explanations, through a real local OpenAI-compatible server
    server, url = serve_chat(RuleModel(), api_key=KEY)
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    try:
        resources = {**defs.resources, "llm_explainer": LLMExplainerResource(enabled=True, base_url=url, model="rules",
                                                                            api_key_env="TEST_LLM_KEY",
                                                                            features_per_shard=3, examples=2)}
        defs = Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources)
        result = defs.resolve_job_def("explain_with_llm").execute_in_process(instance=instance, partition_key="f0")
    finally:
        server.shutdown()
        server.server_close()
    assert result.success
    (event,) = [e for e in result.get_asset_materialization_events()]
    meta = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    assert meta["explainer"] == f"rules at {url}" and KEY not in str(meta)
    assert 1 <= meta["n_explained"] <= 3 and 0 <= meta["balanced_accuracy"] <= 1 and meta["n_failed"] == 0
    frame = pl.read_parquet(f"{store.resolve(f'features/{SAE}/llm_explanations/f0')}/llm_explanations.parquet")
    assert frame.height == meta["n_explained"] and (frame["n_positive"] == 2).all()

    # every table as the pipeline wrote it: the columns, order and dtypes sae_platform.tables declares
    for name, file, schema in (("tables/f0", "stats.parquet", STATS_SCHEMA),
                               ("tables/f0", "examples.parquet", EXAMPLE_SCHEMA),
                               ("logits/f0", "logit_effects.parquet", LOGIT_SCHEMA),
                               ("contexts/f0", "contexts.parquet", WINDOW_SCHEMA),
                               ("explanations/f0", "explanations.parquet", EXPLANATION_SCHEMA),
                               ("llm_explanations/f0", "llm_explanations.parquet", LLM_EXPLANATION_SCHEMA)):
        written = pl.read_parquet_schema(f"{store.resolve(f'features/{SAE}/{name}')}/{file}")
        assert list(written.items()) == list(schema.items()), file


def test_the_blocking_check_reads_no_weights_and_fails_once_the_checkpoint_changed(pipeline, store, monkeypatch):
    """``matches_brute_force`` (feature_topk's blocking check) as the pipeline evaluates it, with no
    whole-SAE load possible: it passes on the built tables, reading the committed checkpoint's config and
    fingerprint only; once a new checkpoint version with one weight changed is committed, the same check
    fails on the fingerprint of every shard, as it did when it loaded the SAE."""
    import logging
    from types import SimpleNamespace

    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save as save_safetensors

    from assets.stage import StageRun
    from sae_platform.catalog import CHECKSUMS, checkpoint_name
    from sae_platform.sharded_checkpoint import UNSHARDED_WEIGHTS
    from sae_platform.storage import CHECKSUMS_FIELD

    defs, instance = pipeline
    assert build_features(instance, defs, SAE)
    before = store.pointer(checkpoint_name(SAE))

    def no_whole_sae(*args, **kwargs):
        raise AssertionError("the exactness check loaded the whole SAE")

    monkeypatch.setattr(features_assets, "load_sae", no_whole_sae)
    run = StageRun(logging.getLogger("check"), SimpleNamespace(**defs.resources), ["f1"])
    passed = features_assets.check_brute_force(run)
    assert passed["passed"] and passed["metadata"]["mode"] == "witness", passed

    name, old = checkpoint_name(SAE), store.resolve(checkpoint_name(SAE))
    fields = {k: v for k, v in before.items() if k not in ("version", "committed_at", CHECKSUMS_FIELD)}
    with store.writing(name, **fields) as version:  # the same run, one decoder weight changed
        for path in store.fs.find(old):
            rel = path[len(old.rstrip("/")) + 1:]
            data = store.fs.cat_file(path)
            if rel == UNSHARDED_WEIGHTS:
                weights = load_safetensors(data)
                weights["W_dec"][0, 0] += 1.0
                data = save_safetensors(weights)
            if rel != CHECKSUMS and not rel.startswith("."):  # the writer records its own
                store.fs.pipe_file(f"{version}/{rel}", data)
    assert store.pointer(name)["version"] != before["version"]
    failed = features_assets.check_brute_force(run)
    assert not failed["passed"] and "sae_fingerprint" in failed["metadata"]["mismatches"], failed


def test_lineage_names_every_upstream_artifact(built):
    defs, instance, store, _ = built
    record = instance.fetch_materializations(AssetKey("feature_topk"), limit=10).records[0]
    lineage = feature_table_lineage(store, SAE, int(record.partition_key[1:]), run_id=record.run_id)
    assert lineage["sae_checkpoint"]["version"] == store.pointer(f"sae/{SAE}")["version"]
    assert lineage["shuffle"]["plan_id"] == open_shuffled(store, "main").index["plan_id"]
    keys = sorted(p["key"] for p in lineage["activation_partitions"])
    assert keys == sorted(k.split("/")[1] for k in store.committed_names("activations"))
    text = format_lineage(lineage)
    assert record.run_id in text and lineage["sae_checkpoint"]["version"] in text and "activations/markup" in text
    assert re.search(r"shard f\d+ latents \[\d+, \d+\)", text)      # the browser's interval notation
    stored = json.loads(store.fs.cat_file(store.path("features", SAE, "lineage", f"{record.partition_key}.json")))
    assert stored["feature_table"]["dagster_run_id"] == record.run_id
    site = store.path("browser", SAE)
    data = json.loads(open(f"{site}/site.json").read())["data"]
    index = json.loads(open(f"{site}/{data}/index.json").read())
    # each shard's own lineage (its table version and its feature_topk run), not shard f0's for all
    runs = {}
    for r in reversed(instance.fetch_materializations(AssetKey("feature_topk"), limit=20).records):
        runs[r.partition_key] = r.run_id                     # the newest run of each shard wins
    shards = {s["lineage"]["feature_table"]["shard"]: s for s in index["shard_lineage"]}
    assert sorted(shards) == list(range(N_FEATURE_SHARDS))
    for shard, entry in shards.items():
        table = entry["lineage"]["feature_table"]
        assert table["dagster_run_id"] == runs[f"f{shard}"]
        assert table["version"] == store.pointer(f"features/{SAE}/tables/f{shard}")["version"]
        assert table["features"] == [entry["start"], entry["stop"]]
    assert len({s["lineage"]["feature_table"]["version"] for s in shards.values()}) == N_FEATURE_SHARDS
    assert "feature_table" not in index["lineage"] and index["lineage"]["browser_dagster_run_id"]
    assert index["lineage"]["sae_checkpoint"]["version"] == store.pointer(f"sae/{SAE}")["version"]


class FirstExplanationSilent(RuleModel):
    """The rule model, but its first explanation is an empty answer (a malformed one for the client)."""

    def chat(self, messages):
        answer = super().chat(messages)
        if messages[-1]["content"].startswith("Excerpts:") and not getattr(self, "silenced", False):
            self.silenced = True
            return ""
        return answer


def test_a_failing_explainer_blocks_nothing_and_shows_no_secret(pipeline, store, monkeypatch, capsys):
    """Optional means optional: with the LLM explainer enabled and unreachable, `sae-platform features`
    reports the failed explain_with_llm runs and still writes the browser; an unusable answer fails
    its feature only. Nothing logged, raised or recorded shows the key or base_url's password."""
    defs, instance = pipeline
    monkeypatch.setenv("TEST_LLM_KEY", KEY)

    def with_explainer(base_url: str) -> Definitions:
        llm = LLMExplainerResource(enabled=True, base_url=base_url, model="rules", api_key_env="TEST_LLM_KEY",
                                   features_per_shard=4, examples=2, timeout_s=5)
        return Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources={**defs.resources, "llm_explainer": llm})

    assert not build_features(instance, with_explainer("http://alice:pa55word@127.0.0.1:9/v1"), SAE)
    site = store.path("browser", SAE)
    index = json.loads(open(f"{site}/site.json").read())
    assert json.loads(open(f"{site}/{index['data']}/index.json").read())["n_features"] == 256
    reported = capsys.readouterr().err
    assert reported.count("(optional: the other stages go on)") == N_FEATURE_SHARDS, reported
    assert "the chat endpoint http://127.0.0.1:9/v1 cannot be reached" in reported
    assert store.resolve(f"features/{SAE}/llm_explanations/f0") is None          # nothing half-written

    server, url = serve_chat(FirstExplanationSilent(), api_key=KEY)
    try:
        result = with_explainer(url).resolve_job_def("explain_with_llm").execute_in_process(
            instance=instance, partition_key="f0")
    finally:
        server.shutdown()
        server.server_close()
    (event,) = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    assert meta["n_failed"] == 1 and meta["n_explained"] >= 1
    frame = pl.read_parquet(f"{store.resolve(f'features/{SAE}/llm_explanations/f0')}/llm_explanations.parquet")
    failed = frame.filter(pl.col("error").is_not_null())
    assert failed["error"].to_list() == ["the chat endpoint " + url + " sent no text in choices[0].message.content "
                                         "(it sent an empty string)"]
    assert failed["balanced_accuracy"].is_null().all() and "None" not in frame["explanation"].to_list()
    logged = "\n".join(str(entry) for run in instance.get_runs() for entry in instance.all_logs(run.run_id))
    assert "cannot be reached" in logged and "no LLM explanation" in logged
    assert "pa55word" not in logged + reported and KEY not in logged + reported


# -- feature shards sized by the memory budget: 8 shards over the 4 shard groups ----------------------

def _tables_by_feature(store, n_shards: int) -> dict[str, pl.DataFrame]:
    """Every table of every shard, concatenated in shard (so latent) order."""
    shards = range(n_shards)
    logits = [store.read_parquet(f"{store.resolve(logits_name(SAE, i))}/logit_effects.parquet") for i in shards]
    return {"stats": pl.concat([read_tables(store, SAE, i).stats for i in shards]),
            "examples": pl.concat([read_tables(store, SAE, i).examples for i in shards]),
            "windows": pl.concat([ctx.read_feature_contexts(store, SAE, i) for i in shards]),
            "explanations": pl.concat([read_explanations(store, SAE, i) for i in shards]),
            "logits": pl.concat(logits)}


def _eight_shard_budget(store) -> int:
    """A job memory budget that plans 8 feature shards for the fixture's SAE: the planned job bytes
    of its 8-shard layout, which its 4-shard jobs exceed."""
    four = planned_layout(store, FeatureSettings(sae_name=SAE, top_k=5, reservoir_factor=4))
    assert four.n_shards == 4  # the default budget: one shard per group
    return dataclasses.replace(four, n_shards=8).job_bytes


def test_a_smaller_budget_runs_eight_shards_in_four_groups_with_the_same_tables(pipeline, store, capsys, monkeypatch,
                                                                              tiny_hooked):
    """Shards are sized by resources.features.config.memory_budget_bytes: with a budget for 8 shards
    each group runs two (f0: shards 0 and 4), every reader follows the recorded layout, and every
    table equals the 4-shard run's. Changing the budget makes the 4-shard tables stale."""
    defs, instance = pipeline
    assert build_features(instance, defs, SAE)
    four = _tables_by_feature(store, 4)
    budget = _eight_shard_budget(store)
    settings = FeatureSettings(sae_name=SAE, top_k=5, reservoir_factor=4, memory_budget_bytes=budget)
    assert planned_shards(store, settings) == 8
    behind = stale_reasons(store, shuffle_name="main", sae_name=SAE, n_feature_shards=8)
    assert "feature tables f0 of 'topk-4k-k32' were built as one of 4 feature shards, not of the 8" in behind[0]
    assert "feature tables f4 of 'topk-4k-k32' were never built" in behind

    resources = {**defs.resources, "features": stage_resource(
        "features", {"sae_name": SAE, "top_k": 5, "reservoir_factor": 4, "device": "cpu",
                     "memory_budget_bytes": budget})}
    assert build_features(instance, Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources), SAE)
    for index in range(8):
        assert tuple(read_tables(store, SAE, index).meta[k] for k in ("start", "stop")) == (32 * index,
                                                                                           32 * index + 32)
    eight = _tables_by_feature(store, 8)
    for name, frame in four.items():  # top-K, random and interval examples, windows, … bit for bit
        matmul = [c for c in ("top_scores", "bottom_scores", "neighbor_cosines") if c in frame.columns]
        assert frame.drop(matmul).equals(eight[name].drop(matmul)), name
        for column in matmul:  # decoder products: a matmul of another shape may round the last bit otherwise
            assert np.allclose(frame[column].explode().to_numpy(), eight[name][column].explode().to_numpy(),
                               rtol=1e-5, atol=1e-6), column
    pass_2 = instance.fetch_materializations(AssetKey("feature_topk"), limit=1).records[0]
    meta = {k: v.value for k, v in pass_2.asset_materialization.metadata.items()}
    assert (meta["feature_shards"], meta["shards_per_group"], meta["latents_per_shard"]) == (8, 2, 32)
    assert meta["planned_job_bytes"] <= budget and meta["features"].count("[") == 2

    # every reader sees the 8 shards: freshness and status, the browser, the Neuronpedia export
    assert recorded_shard_count(store, SAE) == 8
    assert stale_reasons(store, shuffle_name="main", sae_name=SAE, n_feature_shards=8) == []
    assert feature_state(store, SAE).tables_behind() == [] and len(feature_state(store, SAE).shards) == 8
    _print_features(store, SAE)
    assert "8 of 8 feature shard(s) built" in capsys.readouterr().out
    site = store.path("browser", SAE)
    data = json.loads(open(f"{site}/site.json").read())["data"]
    index = json.loads(open(f"{site}/{data}/index.json").read())
    assert index["n_features"] == 256 and len(index["shard_lineage"]) == 8
    assert [int(f["index"]) for f in read_export(store, SAE)["features"]] == list(range(256))

    # a group resumes at its next shard: shard 0 committed, shard 4's record lost (a crash) → only 4 again
    kept = store.pointer(f"features/{SAE}/tables/f0")["version"]
    store.fs.rm(store.path("features", SAE, "lineage", "f4.json"))
    redone = store.pointer(f"features/{SAE}/tables/f4")["version"]
    job = Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources).resolve_job_def("feature_pass_2")
    assert job.execute_in_process(instance=instance, partition_key="f0",
                                  run_config={"resources": {"features": {"config": {"sae_name": SAE}}}}).success
    assert store.pointer(f"features/{SAE}/tables/f0")["version"] == kept
    assert store.pointer(f"features/{SAE}/tables/f4")["version"] != redone
    assert recorded_layout_shards(json.loads(store.fs.cat_file(store.path("features", SAE, "lineage", "f4.json"))))\
        == 8

    _browser_reads_one_shard_at_a_time(monkeypatch, instance, resources)
    _llm_budget_is_per_feature_shard(monkeypatch, instance, resources, store, tiny_hooked)


def _browser_reads_one_shard_at_a_time(monkeypatch, instance, resources):
    """The browser stage (rebuilt) reads each shard's tables when the writer reaches that shard, and
    has dropped the shard before's windows by then: it holds one shard's tables, not all 8."""
    read, alive_at_read, windows = ctx.read_feature_contexts, [], []

    def tracked(*args, **kwargs):
        gc.collect()
        alive_at_read.append(sum(ref() is not None for ref in windows))
        frame = read(*args, **kwargs)
        windows.append(weakref.ref(frame))
        return frame

    monkeypatch.setattr(ctx, "read_feature_contexts", tracked)
    job = Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources).resolve_job_def("build_browser")
    result = job.execute_in_process(instance=instance, run_config={
        "resources": {"features": {"config": {"sae_name": SAE, "rebuild": True}}}})
    assert result.success and alive_at_read == [0] * 8, alive_at_read
    monkeypatch.setattr(ctx, "read_feature_contexts", read)


def _llm_budget_is_per_feature_shard(monkeypatch, instance, resources, store, hooked):
    """``features_per_shard`` is per feature shard: group f0 runs shards 0 and 4, so it explains 2 x
    features_per_shard features, as many from each shard, and says so (``n_requested``). With the
    held-out codes sae_eval stores for this checkpoint, the step reads no SAE weight (group f1)."""
    from sae_platform.catalog import checkpoint_pin, checkpoint_version, eval_name
    from sae_platform.metrics import HELDOUT_CODES_FILE, heldout_codes_bytes, sae_heldout_codes

    server, url = serve_chat(RuleModel(), api_key=KEY)
    monkeypatch.setenv("TEST_LLM_KEY", KEY)
    llm = LLMExplainerResource(enabled=True, base_url=url, model="rules", api_key_env="TEST_LLM_KEY",
                               features_per_shard=2, examples=2)
    job = Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources={**resources, "llm_explainer": llm}) \
        .resolve_job_def("explain_with_llm")
    try:
        result = job.execute_in_process(instance=instance, partition_key="f0")
        tokens = np.random.default_rng(0).integers(1, 250, size=(4, 16))
        tokens[:, 0] = hooked.start_token_id
        codes = sae_heldout_codes(hooked, trainer.load_sae(store, SAE)[0], store, SAE, tokens)
        with store.writing(eval_name(SAE), **checkpoint_pin(checkpoint_version(store, SAE))) as version:
            store.fs.pipe_file(f"{version}/{HELDOUT_CODES_FILE}", heldout_codes_bytes(codes))
        monkeypatch.setattr(features_assets, "load_sae", lambda *a, **k: pytest.fail("the LLM step loaded the SAE"))
        assert job.execute_in_process(instance=instance, partition_key="f1").success
    finally:
        server.shutdown()
        server.server_close()
    (event,) = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    assert (meta["features_per_shard"], meta["feature_shards"], meta["n_requested"]) == (2, 2, 4), meta
    explained = [pl.read_parquet(f"{store.resolve(f'features/{SAE}/llm_explanations/f{i}')}/llm_explanations.parquet")
                 for i in (0, 4)]
    assert [frame.height for frame in explained] == [2, 2] and meta["n_explained"] == 4
    assert explained[0]["feature"].is_between(0, 31).all() and explained[1]["feature"].is_between(128, 159).all()

# -- feature pass 1 per (activation batch, shard group), after one encode per batch -----------------

def _codes_files_read(monkeypatch, store) -> list[str]:
    """The name of every feature shard's codes file (``f<i>.npz``) read from now on through the
    stores' filesystem class (the stages open their own store, of the same class), in order."""
    read, original = [], type(store.fs).cat_file

    def cat_file(self, path, *args, **kwargs):
        if "/codes/" in str(path) and str(path).endswith(".npz"):
            read.append(str(path).rsplit("/", 1)[-1])
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(type(store.fs), "cat_file", cat_file)
    return read


def test_pass_1_runs_per_batch_and_shard_group_reading_only_its_shards_codes(pipeline, store, monkeypatch):
    """The encode runs once per batch (feature_encode); pass 1 then runs once per (batch, shard group)
    (feature_pass_1). With 8 shards in 4 groups, job (batch, f1) reads the codes of shards 1 and 5
    and nothing else, loads no SAE weights and commits one partial of 32 latents per shard, each on
    its own (a lost shard is recomputed alone, reading only its codes); a job whose batch is not
    encoded fails naming the step to run. The tables these jobs make equal today's single-job pass
    1 (every latent from one encode, one shard) bit for bit: counts, sums, top-K, random sample."""
    defs, instance = pipeline
    resources = {**defs.resources, "features": stage_resource(
        "features", {"sae_name": SAE, "top_k": 5, "reservoir_factor": 4, "device": "cpu",
                     "memory_budget_bytes": _eight_shard_budget(store)})}
    defs = Definitions(assets=ASSETS, jobs=ASSET_JOBS, resources=resources)
    batches = pinned_keys(store, "main")
    first = batches[0]

    def run(job: str, key: str):
        return defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=key,
                                                            raise_on_error=False)

    missing = run("feature_pass_1", pass_1_job_key(first, "f1"))
    assert not missing.success and f"materialize feature_codes[{first}]" in run_failure(missing)
    assert run("feature_encode", first).success
    loaded = []
    monkeypatch.setattr(features_assets, "load_sae", lambda *a, **k: loaded.append(a) or trainer.load_sae(*a, **k))
    read = _codes_files_read(monkeypatch, store)
    result = run("feature_pass_1", pass_1_job_key(first, "f1"))
    assert result.success and not loaded, loaded  # no SAE weights in a pass-1 job
    assert sorted(read) == ["f1.npz", "f5.npz"]  # its shards' codes, no other shard's
    (event,) = result.get_asset_materialization_events()
    materialization = event.event_specific_data.materialization
    meta = {k: v.value for k, v in materialization.metadata.items()}
    codes = store.resolve(codes_name(SAE, first))
    sizes = [store.fs.size(f"{codes}/f{i}.npz") for i in range(8)]
    assert materialization.partition == f"{first}|f1" and meta["codes_bytes_read"] == sizes[1] + sizes[5] < sum(sizes)
    assert [store.pointer(partial_name(SAE, first, i)) is not None for i in range(8)] == [i in (1, 5) for i in range(8)]
    for index in (1, 5):  # each partial holds its own shard's latents only
        partial = read_partial(store, SAE, first, index)
        assert (partial.start, partial.stop) == (32 * index, 32 * index + 32)
        assert partial.dense().top_act.shape == (32, 5) and len(partial.top_act) == len(partial.fired)  # fired ones
    kept = store.pointer(partial_name(SAE, first, 1))["version"]
    store.fs.rm(store.path(partial_name(SAE, first, 5), POINTER))  # a crash between the group's two commits
    read.clear()
    assert run("feature_pass_1", pass_1_job_key(first, "f1")).success
    assert store.pointer(partial_name(SAE, first, 1))["version"] == kept and read == ["f5.npz"]
    assert store.pointer(partial_name(SAE, first, 5)) is not None

    for batch in batches:  # the whole pass 1 as the jobs run it, then pass 2 per shard group
        assert run("feature_encode", batch).success
        for group in FEATURE_SHARDS.get_partition_keys():
            assert run("feature_pass_1", pass_1_job_key(batch, group)).success
    for group in FEATURE_SHARDS.get_partition_keys():
        assert run("feature_pass_2", group).success
    sae, _ = trainer.load_sae(store, SAE)
    build_feature_tables(store, sae, "today", FeatureSettings(top_k=5, reservoir_factor=4), partitions=batches)
    stats, examples = all_tables(store, SAE, 8)
    today_stats, today_examples = all_tables(store, "today", 1)
    assert stats.equals(today_stats) and examples.equals(today_examples)
    assert set(examples["kind"]) == {"top", "random", "interval"}
