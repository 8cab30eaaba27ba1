"""The Dagster layer: full definitions load, the activations asset materializes, the sensor sees new files."""

import json
import shutil
from pathlib import Path

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
from dagster._core.instance.ref import InstanceRef

from assets import ASSET_BY_NAME, inbox_sensor
from assets.partitions import ACTIVATION_BATCHES
from jobs.definitions import build_definitions, build_resources
from jobs.settings import Settings
from resources import AutomationResource, BaseModelResource, StorageResource, TextSourceResource, stage_resource
from sae_platform.activations import CacheSettings, cache_text_file, open_partition
from sae_platform.catalog import list_partitions
from sae_platform.freshness import changed_sources
from sae_platform.inbox import inbox_report
from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


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


def _keys(request: RunRequest) -> list[str]:
    return request.run_config["ops"]["activation_batches"]["config"]["keys"]


def test_inbox_sensor_adds_partitions_and_requests_runs(text_dir, store):
    instance = DagsterInstance.ephemeral()
    source = TextSourceResource(pattern=str(text_dir / "*"))
    result = _sensor_tick(instance, source, store)
    assert isinstance(result, SensorResult)
    (run,) = result.run_requests  # one cache_inbox run for the three files
    assert isinstance(run, RunRequest) and _keys(run) == ["alpha", "beta", "gamma"]
    (request,) = result.dynamic_partitions_requests
    assert list(request.partition_keys) == ["alpha", "beta", "gamma"]
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, list(request.partition_keys))

    # registered and not cached yet, but no run is in flight here: the same versions give the same run key
    again = _sensor_tick(instance, source, store)
    assert [r.run_key for r in again.run_requests] == [run.run_key]
    (text_dir / "delta.txt").write_text((text_dir / "alpha.txt").read_text() + " and more")
    result = _sensor_tick(instance, source, store)
    assert [_keys(r) for r in result.run_requests] == [["alpha", "beta", "delta", "gamma"]]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["delta"]


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
    assert _keys(request) == ["beta"] and request.run_key.startswith("cache:")
    assert not result.dynamic_partitions_requests  # the partition exists: only a new caching run
    cache_text_file(store, source.file("beta"), tiny_hooked, str(tiny_model_dir), CacheSettings(ctx_len=32,
                                                                                                 batch_size=4))
    assert changed_sources(store, source.stamps()) == []
    assert isinstance(_sensor_tick(instance, source, store), SkipReason)


def test_empty_inbox_is_a_skip_not_a_crash(tmp_path):
    source = TextSourceResource(pattern=str(tmp_path / "empty" / "*"))
    result = _sensor_tick(DagsterInstance.ephemeral(), source, ArtifactStore(str(tmp_path / "artifacts")))
    assert isinstance(result, SkipReason) and "holds no readable file" in result.skip_message


# -- issue 12: an inbox that cannot be fooled -------------------------------------------------------

LONG = "l" * 251 + ".txt"  # a legal 255-byte file name


@pytest.fixture
def hostile_inbox(tmp_path, text_dir):
    """Good files whose names used to break keys, next to files that must never be read."""
    inbox = tmp_path / "hostile"
    inbox.mkdir()
    text = (text_dir / "gamma.txt").read_text()
    names = ["数据集一.txt", "数据集二.txt", "a b.txt", "a_b.txt", "x.txt", "alpha.txt", LONG]
    for i, name in enumerate(names):
        (inbox / name).write_text(f"{i} {text}")
    (inbox / "x.jsonl").write_text(json.dumps({"text": text.strip()}) + "\n")
    (inbox / "passwd.txt").symlink_to("/etc/passwd")
    (inbox / "environ.txt").symlink_to("/proc/self/environ")
    (inbox / "._alpha.txt").write_bytes(b"\x00\x05\x16\x07\x00")
    (inbox / "zz_empty.txt").write_bytes(b"")
    (inbox / "blank.txt").write_text("   \n\n  ")  # read, but holds no text: fails caching
    (inbox / "latin.txt").write_bytes(("caf\xe9 " + text).encode("latin-1"))  # fails caching
    return inbox


def test_sensor_registers_every_good_file_under_a_distinct_safe_key(hostile_inbox, store):
    instance = DagsterInstance.ephemeral()
    source = TextSourceResource(pattern=str(hostile_inbox / "*"))
    result = _sensor_tick(instance, source, store)
    (request,) = result.dynamic_partitions_requests
    keys = list(request.partition_keys)
    assert len(keys) == len(set(keys)) == 10  # 8 good files + blank + latin (they fail later, alone)
    assert {"数据集一", "数据集二", "a_b", "x", "alpha", "blank", "latin"} <= set(keys)
    assert all(len(k.encode()) <= 96 and not k.startswith(".") for k in keys)
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, keys)  # Dagster accepts every one of them
    assert set(instance.get_dynamic_partitions(ACTIVATION_BATCHES.name)) == set(keys)
    (run,) = result.run_requests
    assert sorted(_keys(run)) == sorted(keys)
    # the files not read are named with their reason (UI tick history and `sae-platform status`)
    listing = source.scan(store)
    reasons = {s.url.rsplit("/", 1)[-1]: s.reason for s in listing.skipped}
    assert set(reasons) == {"passwd.txt", "environ.txt", "._alpha.txt", "zz_empty.txt"}
    assert "outside the inbox" in reasons["passwd.txt"] and "outside the inbox" in reasons["environ.txt"]


def test_cache_inbox_run_caches_the_good_files_and_records_the_bad(hostile_inbox, tmp_path, tiny_model_dir):
    """One real cache_inbox run over every file: a 255-byte name, Unicode names and colliding names are
    cached; a blank and a latin-1 file fail alone, recorded with their stamp; nothing lands outside
    activations/<key>/. Then only a replaced failed file is retried by the sensor."""
    from sae_platform.inbox import failed_attempts, needs_caching

    settings = Settings(root_url=str(tmp_path / "artifacts"), data_dir=str(tmp_path),
                        inbox=str(hostile_inbox / "*"), s3_endpoint_url=None)
    defs = build_definitions(settings)
    instance = DagsterInstance.ephemeral()
    source = defs.resources["text_source"]
    store = defs.resources["storage"].store()
    keys = [f.key for f in source.files()]
    run_config = {"resources": {"language_model": {"config": {"source": str(tiny_model_dir), "layer": 1,
                                                               "device": "cpu"}},
                                "caching": {"config": {"ctx_len": 16, "batch_size": 4}}},
                  "ops": {"activation_batches": {"config": {"keys": keys}}}}
    result = defs.resolve_job_def("cache_inbox").execute_in_process(run_config=run_config, instance=instance)
    assert result.success
    cached = set(list_partitions(store))
    assert cached == set(keys) - {"blank", "latin"}
    materialized = {e.partition for e in result.get_asset_materialization_events()
                    if e.asset_key.to_user_string() == "activations"}
    assert materialized == cached
    failed = failed_attempts(store)
    assert set(failed) == {"blank", "latin"}
    assert "holds no text" in failed["blank"]["reason"] and "byte 3 is 0xe9" in failed["latin"]["reason"]
    # the activations, the base model and what each build showed (assets.stage's records): nothing else
    assert {p.name for p in Path(store.root).iterdir()} <= {"activations", "models", "stages"}
    assert {p.name for p in (Path(store.root) / "activations").iterdir()} == set(keys)

    # the sensor does not retry a failed version, but does as soon as the file is replaced
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, keys)
    sensor_source = TextSourceResource(pattern=str(hostile_inbox / "*"))
    assert isinstance(_sensor_tick(instance, sensor_source, store), SkipReason)
    (hostile_inbox / "latin.txt").write_text("café " + (hostile_inbox / "alpha.txt").read_text(), encoding="utf-8")
    assert needs_caching(store, sensor_source.scan(store).stamps) == ["latin"]
    (request,) = _sensor_tick(instance, sensor_source, store).run_requests
    assert _keys(request) == ["latin"]
    run_config["ops"]["activation_batches"]["config"]["keys"] = ["latin"]
    assert defs.resolve_job_def("cache_inbox").execute_in_process(run_config=run_config, instance=instance).success
    assert "latin" in list_partitions(store) and "latin" not in failed_attempts(store)


def test_two_hundred_files_are_a_few_runs(tmp_path, store, monkeypatch):
    from assets import sensors

    inbox = tmp_path / "many"
    inbox.mkdir()
    for i in range(200):
        (inbox / f"doc{i:03d}.txt").write_text(f"document number {i}")
    result = _sensor_tick(DagsterInstance.ephemeral(), TextSourceResource(pattern=str(inbox / "*")), store)
    assert len(result.run_requests) == 200 // sensors.FILES_PER_RUN == 8
    covered = [k for r in result.run_requests for k in _keys(r)]
    assert sorted(covered) == [f"doc{i:03d}" for i in range(200)]
    assert len({r.run_key for r in result.run_requests}) == 8


def test_the_run_queue_is_limited_for_a_small_machine():
    import yaml

    for name in ("dagster.yaml", "dagster-s3.yaml", "dagster-postgres.yaml"):
        config = yaml.safe_load((REPO / "config" / name).read_text())
        assert config["concurrency"]["runs"]["max_concurrent_runs"] == 2, name


def test_the_shipped_instance_configs_turn_the_first_visit_modal_off(tmp_path):
    """Dagster's own reading of config/dagster.yaml (its schema validated): nux_enabled is False,
    so the UI opens on the asset graph, not on a modal."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "config" / "dagster.yaml", home / "dagster.yaml")
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        assert instance.nux_enabled is False
    import yaml

    for name in ("dagster-s3.yaml", "dagster-postgres.yaml"):    # the other shipped instances: the same key
        assert yaml.safe_load((REPO / "config" / name).read_text())["nux"] == {"enabled": False}, name


def test_identical_content_under_another_name_is_not_cached_again(tmp_path, text_dir, tiny_hooked, tiny_model_dir):
    inbox = tmp_path / "dups"
    inbox.mkdir()
    shutil.copy(text_dir / "alpha.txt", inbox / "hamlet.txt")
    store = ArtifactStore(str(tmp_path / "artifacts"))
    source = TextSourceResource(pattern=str(inbox / "*"))
    cache_text_file(store, source.file("hamlet", store), tiny_hooked, str(tiny_model_dir),
                    CacheSettings(ctx_len=32, batch_size=4))
    shutil.copy(text_dir / "alpha.txt", inbox / "hamlet (1).txt")  # sorts before hamlet.txt, and is newer
    shutil.copy(text_dir / "beta.txt", inbox / "other.txt")
    inbox_state = source.scan(store)
    assert [f.key for f in inbox_state.files] == ["hamlet", "other"]
    (copy,) = inbox_state.skipped
    assert copy.url.endswith("hamlet (1).txt") and "identical content to hamlet.txt" in copy.reason
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, ["hamlet"])
    (request,) = _sensor_tick(instance, source, store).run_requests
    assert _keys(request) == ["other"]
    # overridable: copies are cached too
    keep = TextSourceResource(pattern=str(inbox / "*"), skip_duplicates=False)
    assert len(keep.scan(store).files) == 3 and not keep.scan(store).skipped
    # status names the copy, and a cached partition that no inbox file maps to any more
    (inbox / "hamlet.txt").unlink()  # a rename is recognized by content (test_inbox_edges); a removal is not
    (inbox / "hamlet (1).txt").unlink()
    report = "\n".join(inbox_report(source.scan(store), store))
    assert "cached hamlet: no inbox file has this key now" in report and "delete " in report
