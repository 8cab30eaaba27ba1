"""Each stage means the same whichever job runs it: built once by ``full_pipeline`` (the op job) and
once by the asset jobs (what *Materialize* in the UI runs), the artifacts are equal, the same assets
and partitions are materialized with the same metadata, both skip what is up to date without
changing a data version, and a failed blocking check has the same consequence. Dagster's staleness
(data versions) then marks what a new batch makes stale."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SAE, tiny_run_config
from dagster import AssetKey, DagsterEventType, DagsterInstance, job

from assets.partitions import pass_1_job_key
from jobs.definitions import build_definitions
from jobs.settings import Settings
from sae_platform.activations import open_partition
from sae_platform.catalog import EVAL_REPORT, eval_name
from sae_platform.feature_merge import read_tables
from sae_platform.shuffled import iter_shuffled
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import load_sae

# Two batches, the smallest and the largest file: enough for every multi-batch path (two inputs to the
# shuffle, two encodes, 2 x 4 pass-1 jobs) at 7 Dagster steps per batch fewer than three; tests/test_ui.py,
# test_celery.py and test_freshness.py run their pipelines on these too.
BATCHES = ["alpha", "gamma"]
SHARDS = [f"f{i}" for i in range(4)]
ALL_WORKERS = {"dagster/asset_partition_range_start": "0", "dagster/asset_partition_range_end": "3"}


def _deployment(tmp_path: Path, name: str, tiny_model_dir: Path, text_dir: Path):
    root = tmp_path / name
    (root / "inbox").mkdir(parents=True)
    (root / "holdout").mkdir()
    for batch in BATCHES:
        shutil.copy(text_dir / f"{batch}.txt", root / "inbox" / f"{batch}.txt")
    shutil.copy(text_dir / "beta.txt", root / "holdout" / "held.txt")
    run_config = root / "run.yaml"
    run_config.write_text(tiny_run_config(tiny_model_dir))
    settings = Settings(root_url=str(root / "artifacts"), data_dir=str(root), inbox=str(root / "inbox" / "*"),
                        s3_endpoint_url=None, holdout=str(root / "holdout" / "*"), run_config=str(run_config))
    return build_definitions(settings), DagsterInstance.ephemeral(), ArtifactStore(str(root / "artifacts"))


def _op_path(defs, instance) -> None:
    result = defs.resolve_job_def("full_pipeline").execute_in_process(instance=instance, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]


def _asset_path(defs, instance) -> None:
    """The stages one run per partition, as Materialize / a backfill of one group would launch them."""
    instance.add_dynamic_partitions("activation_batches", BATCHES)

    def run(job_name, **kwargs):
        result = defs.resolve_job_def(job_name).execute_in_process(instance=instance, raise_on_error=False, **kwargs)
        assert result.success, (job_name, kwargs, [e.message for e in result.all_events if e.is_failure])

    run("prepare_base_model")
    for batch in BATCHES:
        run("cache_activations", partition_key=batch)
    run("shuffle_activations", tags=ALL_WORKERS)
    run("train_saes", partition_key=TINY_SAE)
    run("absorption_eval", partition_key=TINY_SAE)
    run("compare_sweep")
    run("export_transcoder_sets")   # no transcoder set in this sweep: it reports so both ways
    for batch in BATCHES:
        run("feature_encode", partition_key=batch)
    for batch in BATCHES:
        for shard_group in SHARDS:
            run("feature_pass_1", partition_key=pass_1_job_key(batch, shard_group))
    for shard in SHARDS:
        run("feature_pass_2", partition_key=shard)
    for batch in BATCHES:
        run("feature_pass_3", partition_key=batch)
    for shard in SHARDS:
        run("feature_regroup", partition_key=shard)
    for shard in SHARDS:
        run("explain_features", partition_key=shard)
        run("explain_with_llm", partition_key=shard)   # off by default: skipped both ways
    run("build_browser")
    run("export_neuronpedia")


def _materializations(instance) -> dict:
    """(asset, partition) -> the newest materialization's metadata keys and data version."""
    out = {}
    for key in instance.get_asset_keys():
        for record in reversed(instance.fetch_materializations(key, limit=1000).records):  # oldest first
            event = record.asset_materialization
            out[(key.to_user_string(), record.partition_key)] = {
                "metadata": sorted(event.metadata), "data_version": event.tags.get("dagster/data_version"),
                "up_to_date": "up_to_date" in event.metadata}
    return out


def _same_artifacts(a: ArtifactStore, b: ArtifactStore) -> None:
    for batch in BATCHES:
        pa, pb = open_partition(a, batch), open_partition(b, batch)
        assert np.array_equal(pa.group["token_id"][:], pb.group["token_id"][:])
        assert np.array_equal(pa.acts[:], pb.acts[:])
    ids = [np.concatenate([i for i, _ in iter_shuffled(s, "main", batch_rows=512)]) for s in (a, b)]
    assert np.array_equal(*ids), "the same permutation (same seed, same inputs)"
    (sae_a, cfg_a), (sae_b, cfg_b) = load_sae(a, TINY_SAE), load_sae(b, TINY_SAE)
    assert cfg_a["step"] == cfg_b["step"] and cfg_a["final"] and cfg_b["final"]
    for name, tensor in sae_a.state_dict().items():
        assert torch.equal(tensor, sae_b.state_dict()[name]), name
    reports = [s.read_json(f"{s.resolve(f'eval/{TINY_SAE}')}/report.json") for s in (a, b)]
    for figure in ("fvu", "nmse", "l0", "dead_fraction", "dead_window_tokens", "ce_clean", "ce_sae"):
        assert reports[0][figure] == pytest.approx(reports[1][figure], rel=1e-6), figure
    for index in range(len(SHARDS)):
        ta, tb = read_tables(a, TINY_SAE, index), read_tables(b, TINY_SAE, index)
        assert ta.stats.drop("sum", "mean").equals(tb.stats.drop("sum", "mean"))
        assert ta.examples.equals(tb.examples)
    indexes = []
    rows = []
    for s in (a, b):  # through the store's filesystem: either may be on S3 (tests/test_celery.py)
        site = s.path("browser", TINY_SAE)
        data = json.loads(s.fs.cat_file(f"{site}/site.json"))["data"]
        index = json.loads(s.fs.cat_file(f"{site}/{data}/index.json"))
        indexes.append(index)
        rows.append(_list_rows(s, site, index))
    assert indexes[0]["n_features"] == indexes[1]["n_features"] == 4096
    assert rows[0] == rows[1] and len(rows[0]["feature"]) == 4096  # what the list shows and sorts


def _list_rows(store: ArtifactStore, site: str, index: dict) -> dict[str, list]:
    """The browser list's rows of every feature shard, gathered (the page fetches them a chunk at a time)."""
    columns: dict[str, list] = {}
    for shard in index["shards"]:
        for k in range(-(-(shard["stop"] - shard["start"]) // index["row_chunk"])):
            for key, values in json.loads(store.fs.cat_file(f"{site}/{shard['path']}/rows/{k}.json")).items():
                columns.setdefault(key, []).extend(values)
    return columns


def test_both_paths_build_the_same_artifacts_and_events_and_skip_alike(tmp_path, tiny_model_dir, text_dir):
    op_defs, op_instance, op_store = _deployment(tmp_path, "op", tiny_model_dir, text_dir)
    asset_defs, asset_instance, asset_store = _deployment(tmp_path, "asset", tiny_model_dir, text_dir)
    _op_path(op_defs, op_instance)
    _asset_path(asset_defs, asset_instance)

    _same_artifacts(op_store, asset_store)
    by_op, by_asset = _materializations(op_instance), _materializations(asset_instance)
    assert set(by_op) == set(by_asset), set(by_op) ^ set(by_asset)
    for key in by_op:
        assert by_op[key]["metadata"] == by_asset[key]["metadata"], key
        if key[0] == "feature_llm_explanations":   # optional, off: skipped alike both ways
            assert by_op[key]["up_to_date"] and by_asset[key]["up_to_date"], key
            continue
        assert not by_op[key]["up_to_date"] and not by_asset[key]["up_to_date"], key

    # Re-run both ways: every stage is up to date, keeps its data version and shows again what its
    # build showed (the asset's page keeps its content), naming the build.
    _op_path(op_defs, op_instance)
    _asset_path(asset_defs, asset_instance)
    for instance, before in ((op_instance, by_op), (asset_instance, by_asset)):
        after = _materializations(instance)
        for key, event in after.items():
            assert event["data_version"] == before[key]["data_version"], key
            if key[0] in ("sae_comparison", "scaling_laws", "circuit_tracer_export"):
                continue  # no skip rule: each only reads what is committed (a second or two)
            assert event["up_to_date"], key
            if key[0] == "feature_llm_explanations":
                continue  # never built (off): nothing to show again
            shown = set(event["metadata"]) - {"up_to_date", "built_by_run", "built_at"}
            assert shown == set(before[key]["metadata"]), (key, shown ^ set(before[key]["metadata"]))
            assert {"built_by_run", "built_at"} <= set(event["metadata"]), key
    _same_artifacts(op_store, asset_store)

    # A figure the browser's overview shows, measured again (a newer committed evaluation), makes the
    # browser stale although its tables still describe the checkpoint: the next build shows it.
    report = op_store.read_json(f"{op_store.resolve(eval_name(TINY_SAE))}/{EVAL_REPORT}")
    with op_store.writing(eval_name(TINY_SAE)) as version:
        op_store.write_json(f"{version}/{EVAL_REPORT}", {**report, "fvu": 0.123456})
    assert op_defs.resolve_job_def("build_browser").execute_in_process(instance=op_instance).success
    rebuilt = _materializations(op_instance)[("feature_browser", None)]
    assert not rebuilt["up_to_date"] and rebuilt["data_version"] != by_op[("feature_browser", None)]["data_version"]
    site = Path(op_store.root_url) / "browser" / TINY_SAE
    data = json.loads((site / "site.json").read_text())["data"]
    assert json.loads((site / data / "index.json").read_text())["evaluation"]["fvu"] == 0.1235


def _corrupt_a_final_piece(store: ArtifactStore) -> None:
    """Flip bytes of activation data in a finalized bucket: the store is no longer a permutation."""
    pieces = [p for p in Path(store.root_url, "shuffled", "main").rglob("*") if p.is_file() and "acts" in p.parts
              and p.name != "zarr.json" and p.stat().st_size > 64]  # a chunk of activations
    data = bytearray(pieces[0].read_bytes())
    data[32:48] = bytes(255 - b for b in data[32:48])
    pieces[0].write_bytes(bytes(data))


def _stage_before_commit(defs, instance, store) -> None:
    instance.add_dynamic_partitions("activation_batches", BATCHES)
    for batch in BATCHES:
        defs.resolve_job_def("cache_activations").execute_in_process(instance=instance, partition_key=batch)
    result = defs.resolve_job_def("shuffle_activations").get_subset(
        asset_selection={AssetKey(a) for a in ("shuffle_plan", "shuffle_pass_1", "shuffle_pass_2", "shuffle_final")}
    ).execute_in_process(instance=instance, tags=ALL_WORKERS)
    assert result.success
    _corrupt_a_final_piece(store)


def test_a_store_failing_its_permutation_check_is_uncommitted_whichever_job_ran_it(tmp_path, tiny_model_dir,
                                                                                  text_dir):
    from jobs.full_pipeline import STEPS

    # As an asset (Materialize on shuffled_activations):
    defs, instance, store = _deployment(tmp_path, "asset", tiny_model_dir, text_dir)
    _stage_before_commit(defs, instance, store)
    result = defs.resolve_job_def("shuffle_activations").get_subset(
        asset_selection={AssetKey("shuffled_activations")}).execute_in_process(instance=instance, raise_on_error=False)
    (verdict,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "shuffle_is_a_permutation"]
    assert not verdict.passed and "uncommitted" in verdict.metadata["consequence"].value
    assert store.resolve("shuffled/main") is None, "nothing may train on a store that is not a permutation"

    # As the full_pipeline step (the same op, alone in a job):
    defs, instance, store = _deployment(tmp_path, "op", tiny_model_dir, text_dir)
    _stage_before_commit(defs, instance, store)

    @job(resource_defs=defs.resources)
    def commit_only():
        STEPS["shuffled_activations"]()

    result = commit_only.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    logged = [entry.dagster_event.event_specific_data for entry in instance.all_logs(
        result.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)]
    (verdict,) = [c for c in logged if c.check_name == "shuffle_is_a_permutation"]
    assert not verdict.passed and "uncommitted" in verdict.metadata["consequence"].value
    assert store.resolve("shuffled/main") is None


def test_a_new_batch_makes_the_shuffle_stale_in_dagster_and_nothing_else(tmp_path, tiny_model_dir, text_dir):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.loader import LoadingContextForTest

    defs, instance, store = _deployment(tmp_path, "op", tiny_model_dir, text_dir)
    _op_path(defs, instance)
    graph = defs.resolve_asset_graph()

    def stale() -> set[str]:
        resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
        found = set()
        for key in graph.get_all_asset_keys():
            node = graph.get(key)
            partitions = node.partitions_def.get_partition_keys(dynamic_partitions_store=instance) \
                if node.partitions_def else [None]
            for partition in partitions:
                if resolver.get_status(key, partition) == StaleStatus.STALE:
                    found.add(key.to_user_string())
        return found

    assert stale() == set(), "a fresh full_pipeline run leaves nothing stale"
    (Path(store.root_url).parent / "inbox" / "delta.txt").write_text((text_dir / "gamma.txt").read_text() * 2)
    instance.add_dynamic_partitions("activation_batches", ["delta"])
    defs.resolve_job_def("cache_activations").execute_in_process(instance=instance, partition_key="delta")
    assert stale() == {"shuffle_plan"}, "the plan no longer pins every cached batch; downstream follows it"
    _op_path(defs, instance)
    assert stale() == set()


def _toy_stage(calls: list, store: ArtifactStore):
    """A stage whose body commits one artifact and shows a figure; up to date once it exists."""
    from dagster import MetadataValue

    from assets.stage import Stage, pointer_version

    def build_toy(run):
        calls.append(run.run_id)
        with run.store.writing("toy/t") as version:
            run.store.write_json(f"{version}/x.json", {"x": 1})
        return {"figure": 0.5, "path": MetadataValue.path(store.url(store.resolve("toy/t")))}

    return Stage(asset="toy", description="", group="g", body=build_toy,
                 version=pointer_version(lambda run: "toy/t"),
                 up_to_date=lambda run: "built" if run.store.resolve("toy/t") else None)


def test_a_skip_shows_the_builds_metadata_and_a_damaged_record_only_costs_the_metadata(tmp_path):
    import logging
    from types import SimpleNamespace

    from assets.stage import StageRun, execute

    store = ArtifactStore(str(tmp_path / "artifacts"))
    resources = SimpleNamespace(storage=SimpleNamespace(store=lambda: store))
    calls = []
    stage = _toy_stage(calls, store)
    built = execute(stage, StageRun(logging.getLogger("t"), resources, [], "run-1"))
    skipped = execute(stage, StageRun(logging.getLogger("t"), resources, [], "run-2"))
    assert calls == ["run-1"] and skipped.data_version == built.data_version
    assert skipped.metadata["figure"].value == 0.5 and skipped.metadata["built_by_run"] == "run-1"
    assert set(skipped.metadata) == {"figure", "path", "up_to_date", "built_by_run", "built_at"}
    record = Path(store.root) / "stages" / "toy" / "all.json"
    record.write_text(record.read_text()[:20])  # truncated (a full disk, a kill)
    again = execute(stage, StageRun(logging.getLogger("t"), resources, [], "run-3"))
    assert calls == ["run-1"] and set(again.metadata) == {"up_to_date"}  # still skipped, nothing raised
