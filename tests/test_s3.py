"""The same pipeline against a real S3 endpoint (moto's server mode): caching, shuffle, training, evaluation."""

import json

import pytest
from dagster import DagsterInstance, Definitions

from assets import ASSET_CHECKS, ASSETS
from assets.partitions import ACTIVATION_BATCHES, ALL_SHUFFLE_WORKERS_TAGS
from jobs.definitions import JOBS, build_resources
from jobs.settings import Settings
from resources import BaseModelResource, ShuffleResource
from sae_platform.storage import ArtifactStore

ENDPOINT_PORT = 5917


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=ENDPOINT_PORT)
    server.start()
    yield f"http://127.0.0.1:{ENDPOINT_PORT}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"sae-{len(client.list_buckets()['Buckets'])}"
    client.create_bucket(Bucket=bucket)
    return client, bucket


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


def test_pipeline_runs_on_s3_and_artifacts_read_back(s3, s3_endpoint, tiny_model_dir, text_dir):
    client, bucket = s3
    for i, path in enumerate(sorted(text_dir.glob("*.txt")) * 2):  # six batches
        client.put_object(Bucket=bucket, Key=f"inbox/{path.stem}{i}.txt", Body=path.read_bytes())
    client.put_object(Bucket=bucket, Key="holdout/held.txt", Body=(text_dir / "beta.txt").read_bytes())
    settings = Settings(root_url=f"s3://{bucket}/sae", data_dir=str(text_dir), inbox=f"s3://{bucket}/inbox/*",
                        s3_endpoint_url=s3_endpoint, holdout=f"s3://{bucket}/holdout/*")
    resources = build_resources(settings)
    resources["language_model"] = BaseModelResource(source=str(tiny_model_dir), layer=1, device="cpu")
    resources["shuffle"] = ShuffleResource(name="main", n_buckets=4, memory_budget_bytes=1 << 20)
    defs = Definitions(assets=ASSETS, asset_checks=ASSET_CHECKS, jobs=JOBS, resources=resources)
    instance = DagsterInstance.ephemeral()
    keys = [f.key for f in resources["text_source"].files()]
    instance.add_dynamic_partitions(ACTIVATION_BATCHES.name, keys)
    cache = defs.resolve_job_def("cache_activations")
    for key in keys:
        assert cache.execute_in_process(instance=instance, partition_key=key, run_config={
            "ops": {"activations": {"config": {"ctx_len": 32, "batch_size": 4}}}}).success
    assert defs.resolve_job_def("shuffle_activations").execute_in_process(
        instance=instance, tags=ALL_SHUFFLE_WORKERS_TAGS).success
    train = {"token_budget": 256 * 6, "batch_size": 256, "checkpoint_every_tokens": 512, "holdout_rows": 256}
    assert defs.resolve_job_def("train_saes").execute_in_process(
        instance=instance, partition_key="topk-4k-k32",
        run_config={"ops": {"sae_checkpoint": {"ops": {"train_sae_op": {"config": train}}},
                            "sae_eval": {"config": {"ce_contexts": 2, "ctx_len": 32}}}}).success

    listed = {o["Key"].split("/")[1] for o in client.list_objects_v2(Bucket=bucket, Prefix="sae/")["Contents"]}
    assert {"models", "activations", "shuffled", "sae", "eval", "saelens"} <= listed
    store = ArtifactStore(f"s3://{bucket}/sae", {"endpoint_url": s3_endpoint})
    report = json.loads(store.fs.cat_file(f"{store.resolve('eval/topk-4k-k32')}/report.json"))
    assert report["n_tokens"] == 256 and report["ce_n_contexts"] == 2
    assert json.loads(store.fs.cat_file(f"{store.resolve('saelens/topk-4k-k32')}/cfg.json"))["d_in"] == 32
