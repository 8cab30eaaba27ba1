"""The Dagster layer: full definitions load, the activations asset materializes, the sensor sees new files."""

import shutil

import pytest
from dagster import (
    DagsterInstance,
    Definitions,
    RunRequest,
    SensorResult,
    SkipReason,
    build_sensor_context,
    materialize,
)

from assets import ASSET_BY_NAME, inbox_sensor
from assets.partitions import ACTIVATION_BATCHES
from jobs.definitions import build_definitions, build_resources
from jobs.settings import Settings
from resources import AutomationResource, BaseModelResource, StorageResource, TextSourceResource, stage_resource
from sae_platform.activations import CacheSettings, cache_text_file, open_partition
from sae_platform.freshness import changed_sources
from sae_platform.storage import ArtifactStore


@pytest.fixture
def settings(tmp_path, text_dir) -> Settings:
    return Settings(root_url=str(tmp_path / "artifacts"), data_dir=str(tmp_path), inbox=str(text_dir / "*"),
                    s3_endpoint_url=None)


@pytest.fixture
def resources(settings, tiny_model_dir) -> dict:
    resources = build_resources(settings)
    resources["language_model"] = BaseModelResource(source=str(tiny_model_dir), layer=1, device="cpu")
    return resources


base_model, activations = ASSET_BY_NAME["base_model"], ASSET_BY_NAME["activations"]


def test_full_definitions_load(settings):
    defs = build_definitions(settings)
    Definitions.validate_loadable(defs)  # what a code server checks: e.g. op names unique across jobs
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"base_model", "activations"} <= keys
    assert graph.get(activations.key).partitions_def == ACTIVATION_BATCHES
    assert base_model.key in graph.get(activations.key).parent_keys
    for job in ("full_pipeline", "cache_activations", "prepare_base_model"):
        assert defs.resolve_job_def(job) is not None
    for sensor in ("inbox_sensor", "downstream_freshness_sensor"):
        assert defs.resolve_sensor_def(sensor) is not None
    assert defs.resolve_schedule_def("nightly_refresh").cron_schedule == "0 3 * * *"


def test_activations_materialize_through_dagster(resources):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, ["alpha", "beta"])
    resources["caching"] = stage_resource("caching", {"ctx_len": 16, "batch_size": 4})
    result = materialize([base_model, activations], selection=[activations], partition_key="beta",
                         resources=resources, instance=instance)
    assert result.success
    (event,) = result.asset_materializations_for_node("activations")
    meta = {k: v.value for k, v in event.metadata.items()}
    part = open_partition(resources["storage"].store(), "beta")
    assert event.partition == "beta"
    assert meta["dagster/row_count"] == part.n_rows > 0 and meta["d_model"] == 32 and meta["dtype"] == "float16"
    assert meta["bytes"] > part.n_rows * 32 * 2 and meta["tokens_per_second"] > 0
    assert meta["norm_mean"] > 0


def test_bad_partition_fails_the_run_with_the_fix(resources):
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, ["nonexistent"])
    result = materialize([base_model, activations], selection=[activations], partition_key="nonexistent",
                         resources=resources, instance=instance, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("activations")
    assert "no file in text source" in failure.error.cause.message
    assert "How to fix" in failure.error.cause.message


def _sensor_tick(instance, source: TextSourceResource, store):
    resources = {"text_source": source, "storage": StorageResource(root_url=store.root_url),
                 "automation": AutomationResource()}
    return inbox_sensor(build_sensor_context(instance=instance, resources=resources))


def test_inbox_sensor_adds_partitions_and_requests_runs(text_dir, store):
    instance = DagsterInstance.ephemeral()
    source = TextSourceResource(pattern=str(text_dir / "*"))
    result = _sensor_tick(instance, source, store)
    assert isinstance(result, SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["alpha", "beta", "gamma"]
    assert all(isinstance(r, RunRequest) for r in result.run_requests)
    (request,) = result.dynamic_partitions_requests
    assert list(request.partition_keys) == ["alpha", "beta", "gamma"]
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, list(request.partition_keys))

    assert isinstance(_sensor_tick(instance, source, store), SkipReason)
    shutil.copy(text_dir / "alpha.txt", text_dir / "delta.txt")
    result = _sensor_tick(instance, source, store)
    assert [r.partition_key for r in result.run_requests] == ["delta"]


def test_a_file_replaced_in_the_inbox_is_cached_again(text_dir, store, tiny_hooked, tiny_model_dir):
    instance = DagsterInstance.ephemeral()
    source = TextSourceResource(pattern=str(text_dir / "*"))
    for text_file in source.files():
        cache_text_file(store, text_file, tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=32, batch_size=4))
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, ["alpha", "beta", "gamma"])
    assert isinstance(_sensor_tick(instance, source, store), SkipReason)

    (text_dir / "beta.txt").write_text("A different text, uploaded again under the same name. " * 40)
    assert changed_sources(store, source.stamps()) == ["beta"]
    result = _sensor_tick(instance, source, store)
    (request,) = result.run_requests
    assert request.partition_key == "beta" and request.run_key.startswith("activations:beta:")
    assert not result.dynamic_partitions_requests  # the partition exists: only a new caching run
    cache_text_file(store, source.file("beta"), tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=32,
                                                                                                 batch_size=4))
    assert changed_sources(store, source.stamps()) == []
    assert isinstance(_sensor_tick(instance, source, store), SkipReason)


def test_empty_inbox_is_a_skip_not_a_crash(tmp_path):
    source = TextSourceResource(pattern=str(tmp_path / "empty" / "*"))
    result = _sensor_tick(DagsterInstance.ephemeral(), source, ArtifactStore(str(tmp_path / "artifacts")))
    assert isinstance(result, SkipReason) and "matches no" in result.skip_message
