"""The same pipeline against a real S3 endpoint (moto's server mode), launched through Dagster's CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_SAE, tiny_run_config

from sae_platform.errors import StorageError
from sae_platform.feature_merge import read_tables
from sae_platform.freshness import stale_reasons
from sae_platform.shuffled import open_shuffled
from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]


def test_storage_commit_protocol_on_s3(s3, s3_endpoint):
    _, bucket = s3
    store = ArtifactStore(f"s3://{bucket}/root", {"endpoint_url": s3_endpoint})
    with store.writing("things/a") as version:
        store.fs.pipe_file(f"{version}/x.txt", b"one")
    with pytest.raises(RuntimeError):
        with store.writing("things/a") as version:
            store.fs.pipe_file(f"{version}/x.txt", b"half")
            raise RuntimeError
    fresh = ArtifactStore(f"s3://{bucket}/root", {"endpoint_url": s3_endpoint})
    assert fresh.fs.cat_file(f"{fresh.resolve('things/a')}/x.txt") == b"one"
    assert fresh.committed_names("things") == ["things/a"]
    # a superseded version stays readable for the grace period, marked; with grace 0 the next commit removes it
    first = fresh.resolve("things/a")
    with fresh.writing("things/a") as version:
        fresh.fs.pipe_file(f"{version}/x.txt", b"two")
    assert fresh.fs.cat_file(f"{first}/x.txt") == b"one" and fresh.fs.exists(f"{first}/.superseded.json")
    quick = ArtifactStore(f"s3://{bucket}/root", {"endpoint_url": s3_endpoint}, grace_s=0)
    with quick.writing("things/a") as version:
        quick.fs.pipe_file(f"{version}/x.txt", b"three")
    assert not quick.fs.exists(f"{first}/x.txt")
    with pytest.raises(StorageError, match="has been removed"):
        quick.check_version("things/a", first.rsplit("/", 1)[-1])


def _buckets(client) -> set[str]:
    return {b["Name"] for b in client.list_buckets()["Buckets"]}


def test_a_misspelt_bucket_fails_instead_of_being_created(s3, s3_endpoint, tmp_path, monkeypatch):
    from sae_platform.errors import StorageError

    client, _ = s3
    monkeypatch.delenv("SAE_PLATFORM_CREATE_BUCKET", raising=False)
    with pytest.raises(StorageError) as error:
        ArtifactStore("s3://nosuchbucket/root", {"endpoint_url": s3_endpoint})
    assert "bucket 'nosuchbucket' does not exist" in str(error.value)
    assert "SAE_PLATFORM_CREATE_BUCKET=1" in str(error.value)
    assert "nosuchbucket" not in _buckets(client)

    # the operator's command says the same and exits 2, and still creates nothing
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "SAE_PLATFORM_ROOT": "s3://nosuchbucket/root",
           "SAE_PLATFORM_S3_ENDPOINT_URL": s3_endpoint, "SAE_PLATFORM_INBOX": str(tmp_path / "inbox" / "*")}
    status = subprocess.run([str(Path(sys.executable).parent / "sae-platform"), "status"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 2 and "bucket 'nosuchbucket' does not exist" in status.stderr, status.stderr[-2000:]
    assert "nosuchbucket" not in _buckets(client)

    # asked for explicitly: created (the setting, or the environment variable)
    store = ArtifactStore("s3://createdbucket/root", {"endpoint_url": s3_endpoint}, create_bucket=True)
    with store.writing("things/a") as version:
        store.fs.pipe_file(f"{version}/x.txt", b"one")
    monkeypatch.setenv("SAE_PLATFORM_CREATE_BUCKET", "1")
    ArtifactStore("s3://envbucket/root", {"endpoint_url": s3_endpoint})
    assert {"createdbucket", "envbucket"} <= _buckets(client)


def test_full_pipeline_runs_on_s3_and_artifacts_read_back(s3, s3_endpoint, tiny_model_dir, text_dir, tmp_path):
    """`dagster job execute -j full_pipeline` with the inbox, holdout, artifacts and the instance's step
    logs (dagster-aws S3ComputeLogManager, config/dagster-s3.yaml) all in one bucket."""
    client, bucket = s3
    for path in sorted(text_dir.glob("*.txt")):  # three batches: every stage fans out over S3 (7 steps a batch)
        client.put_object(Bucket=bucket, Key=f"inbox/{path.name}", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="holdout/held.txt", Body=(text_dir / "beta.txt").read_bytes())
    home = tmp_path / "dagster_home"
    home.mkdir()
    instance_yaml = (REPO / "config" / "dagster-s3.yaml").read_text()
    (home / "dagster.yaml").write_text(instance_yaml.replace("# endpoint_url:", "endpoint_url:"))
    run_config = tmp_path / "run.yaml"
    run_config.write_text(tiny_run_config(tiny_model_dir))
    env = {**os.environ, "DAGSTER_HOME": str(home), "SAE_PLATFORM_ROOT": f"s3://{bucket}/sae",
           "SAE_PLATFORM_INBOX": f"s3://{bucket}/inbox/*", "SAE_PLATFORM_HOLDOUT": f"s3://{bucket}/holdout/*",
           "SAE_PLATFORM_DATA": str(tmp_path), "SAE_PLATFORM_S3_ENDPOINT_URL": s3_endpoint,
           "DAGSTER_S3_LOG_BUCKET": bucket}
    run = subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "jobs.definitions",
                          "-j", "full_pipeline", "-c", str(run_config)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]

    listed = {o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
              for o in page.get("Contents", [])}
    assert {"models", "activations", "shuffled", "sae", "eval", "saelens", "features", "browser"} <= {
        k.split("/")[1] for k in listed if k.startswith("sae/")}
    assert not [k for k in listed if k.startswith("sae/") and "/.writer.json" in k], "a writer mark was left"
    assert [k for k in listed if k.startswith("dagster-compute-logs/")], "step logs were not uploaded to S3"
    store = ArtifactStore(f"s3://{bucket}/sae", {"endpoint_url": s3_endpoint})
    assert sorted(store.committed_names("activations")) == ["activations/alpha", "activations/beta",
                                                           "activations/gamma"]
    report = json.loads(store.fs.cat_file(f"{store.resolve(f'eval/{TINY_SAE}')}/report.json"))
    assert report["n_tokens"] == 256 and report["ce_n_contexts"] == 2
    assert json.loads(store.fs.cat_file(f"{store.resolve(f'saelens/{TINY_SAE}')}/cfg.json"))["d_in"] == 32
    tables = read_tables(store, TINY_SAE, 0)
    assert tables.meta["n_tokens_total"] == open_shuffled(store, "main").n_rows
    site = json.loads(store.fs.cat_file(f"{store.root}/browser/{TINY_SAE}/site.json"))
    index = json.loads(store.fs.cat_file(f"{store.root}/browser/{TINY_SAE}/{site['data']}/index.json"))
    assert index["n_features"] == 4096 and index["lineage"]["sae_checkpoint"]["name"] == TINY_SAE
    assert stale_reasons(store, shuffle_name="main", sae_name=TINY_SAE, n_feature_shards=4) == []


# -- listings seen afresh: a long-lived process (Dagster's code server) sees what others change ------

def _in_another_process(code: str) -> None:
    """Run ``code`` in a new Python process (a caching run beside the code server), in this environment."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def _commit_inbox_in_another_process(pattern: str, root: str, endpoint: str) -> None:
    """What a cache_inbox run commits: each inbox file's partition pointer with the file's stamp, taken
    as caching takes it (``source_stamp``: the object's own HEAD, not the sensor's listing)."""
    _in_another_process(f"""
from sae_platform.catalog import partition_name
from sae_platform.corpus import list_source, source_stamp
from sae_platform.storage import ArtifactStore
options = {{"endpoint_url": {endpoint!r}}}
store = ArtifactStore({root!r}, options)
for text_file in list_source({pattern!r}, options):
    with store.writing(partition_name(text_file.key), source_stamp=source_stamp(text_file, options)):
        pass
""")


def test_the_inbox_sensor_sees_new_and_replaced_s3_files_in_one_process(s3, s3_endpoint, tmp_path):
    """One process ticks the sensor (as Dagster's long-lived code server does): a file added to the
    S3 inbox and a file replaced under its name (new ETag, same size) are both seen at the next tick."""
    from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context

    from assets import inbox_sensor
    from assets.partitions import ACTIVATION_BATCHES
    from resources import AutomationResource, StorageResource, TextSourceResource

    client, bucket = s3
    for name, text in (("alpha", "The first batch of text. " * 20), ("beta", "The second batch of text. " * 20)):
        client.put_object(Bucket=bucket, Key=f"inbox/{name}.txt", Body=text.encode())
    pattern, root = f"s3://{bucket}/inbox/*", f"s3://{bucket}/sae"
    resources = {"text_source": TextSourceResource(pattern=pattern, endpoint_url=s3_endpoint),
                 "storage": StorageResource(root_url=root, endpoint_url=s3_endpoint),
                 "automation": AutomationResource()}
    (tmp_path / "dagster_home").mkdir()
    instance = DagsterInstance.local_temp(str(tmp_path / "dagster_home"))

    def tick():
        return inbox_sensor(build_sensor_context(instance=instance, resources=resources))

    first = tick()
    assert isinstance(first, SensorResult)
    assert [r.run_config["ops"]["activation_batches"]["config"]["keys"] for r in first.run_requests] == [
        ["alpha", "beta"]]
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, ["alpha", "beta"])
    _commit_inbox_in_another_process(pattern, root, s3_endpoint)  # the caching run, in its own process
    assert isinstance(tick(), SkipReason)

    client.put_object(Bucket=bucket, Key="inbox/gamma.txt", Body=b"A third batch, arrived later. " * 20)
    client.put_object(Bucket=bucket, Key="inbox/beta.txt", Body=b"The second batch, re-uploaded. " * 20)
    result = tick()
    assert isinstance(result, SensorResult), result
    assert [r.run_config["ops"]["activation_batches"]["config"]["keys"] for r in result.run_requests] == [
        ["beta", "gamma"]]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["gamma"]


def test_the_store_lists_what_another_process_committed(s3, s3_endpoint):
    """Partitions committed or deleted, and failed attempts recorded, by another process are seen by
    this process's listings after it listed them once."""
    from sae_platform.catalog import list_partitions, partition_name
    from sae_platform.freshness import cached_versions
    from sae_platform.inbox import failed_attempts

    _, bucket = s3
    root = f"s3://{bucket}/sae"
    store = ArtifactStore(root, {"endpoint_url": s3_endpoint})
    for key in ("alpha", "beta"):
        with store.writing(partition_name(key)):
            pass
    assert list_partitions(store) == ["alpha", "beta"] and failed_attempts(store) == {}
    _in_another_process(f"""
from sae_platform.catalog import partition_name
from sae_platform.inbox import record_failed_attempt
from sae_platform.storage import ArtifactStore
store = ArtifactStore({root!r}, {{"endpoint_url": {s3_endpoint!r}}})
with store.writing(partition_name("gamma")):
    pass
store.delete(partition_name("alpha"))
record_failed_attempt(store, "delta", "12:etag", "not UTF-8")
""")
    assert list_partitions(store) == ["beta", "gamma"]
    assert sorted(cached_versions(store)) == ["beta", "gamma"]
    assert list(failed_attempts(store)) == ["delta"]
