"""full_pipeline on dagster-celery's executor: the production topology on loopback.

A real Redis (the broker and result backend), two Celery workers started with dagster-celery's own
CLI from config/celery.yaml (``--pool solo``: a worker is one process, so a step's pid is its
worker's), the instance on PostgreSQL and the artifacts, inbox and holdout on moto's S3 server
(the servers: tests/servers.py). One run proves, from the instance's event log:

* steps ran in both worker processes (pids and Celery hostnames), none in the launching process;
* fanned-out steps overlapped in time on different workers;
* a worker SIGKILLed in the middle of training loses nothing: its task was not acknowledged, Redis
  gives it to the other worker after the visibility timeout, the step resumes from the last
  checkpoint there, and the run succeeds;
* the artifacts equal an in-process run's on the same inputs, bitwise where the in-process run is
  (a resumed training reaches the uninterrupted run's weights: tests/test_trainer.py);
* a re-launch completes, every shuffled row present exactly once (row-id checksum).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from conftest import TINY_SAE, stop_process_group, tiny_run_config
from test_stage import BATCHES, _same_artifacts

from jobs.definitions import build_definitions
from jobs.settings import Settings
from sae_platform.activations import open_partition
from sae_platform.catalog import checkpoint_name
from sae_platform.shuffled import iter_shuffled
from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Long enough for the kill to land mid-training, after a checkpoint: 60 steps of the tiny SAE (~0.1-0.2 s each).
TRAINING = {"token_budget": 256 * 60, "checkpoint_every_tokens": 256 * 20}
# Seconds before Redis hands an unacknowledged task to another worker (config/celery.yaml: a day;
# here short, so the killed step comes back quickly; every step here is far shorter).
VISIBILITY_TIMEOUT_S = 30


def _run_config(tiny_model_dir: Path, execution: dict) -> dict:
    config = yaml.safe_load(tiny_run_config(tiny_model_dir))
    config["resources"]["training"]["config"].update(TRAINING)
    return {**config, "execution": execution}


def _celery_execution() -> dict:
    execution = yaml.safe_load((REPO / "config" / "celery.yaml").read_text())["execution"]
    execution["config"]["config_source"]["broker_transport_options"]["visibility_timeout"] = VISIBILITY_TIMEOUT_S
    return execution


def _reference_run(tmp_path: Path, tiny_model_dir: Path, text_dir: Path) -> ArtifactStore:
    """The same inputs and settings, every step in one process (the in_process executor)."""
    from dagster import DagsterInstance

    root = tmp_path / "reference"
    (root / "inbox").mkdir(parents=True)
    (root / "holdout").mkdir()
    for batch in BATCHES:
        (root / "inbox" / f"{batch}.txt").write_bytes((text_dir / f"{batch}.txt").read_bytes())
    (root / "holdout" / "held.txt").write_bytes((text_dir / "beta.txt").read_bytes())
    run_config = root / "run.yaml"
    run_config.write_text(json.dumps(_run_config(tiny_model_dir, {"config": {"in_process": {}}})))
    settings = Settings(root_url=str(root / "artifacts"), data_dir=str(root), inbox=str(root / "inbox" / "*"),
                        s3_endpoint_url=None, holdout=str(root / "holdout" / "*"), run_config=str(run_config))
    result = build_definitions(settings).resolve_job_def("full_pipeline").execute_in_process(
        instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    return ArtifactStore(str(root / "artifacts"))


def _start_worker(name: str, env: dict, log: Path, config: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app",
                             "-y", str(config), "-q", "dagster", "-n", name,
                             "--", "--pool", "solo"],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait_ready(workers: dict, logs: dict, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not all(" ready." in logs[n].read_text() for n in workers):
        for name, proc in workers.items():
            assert proc.poll() is None, f"worker {name} exited:\n{logs[name].read_text()[-3000:]}"
        assert time.monotonic() < deadline, {n: logs[n].read_text()[-2000:] for n in workers}
        time.sleep(0.5)


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_full_pipeline_on_celery_workers_survives_a_killed_worker(
        pg_server, s3, s3_endpoint, redis_url, tiny_model_dir, text_dir, tmp_path, monkeypatch):
    from dagster import DagsterEventType, DagsterInstance

    client, bucket = s3
    for batch in BATCHES:
        client.put_object(Bucket=bucket, Key=f"inbox/{batch}.txt", Body=(text_dir / f"{batch}.txt").read_bytes())
    client.put_object(Bucket=bucket, Key="holdout/held.txt", Body=(text_dir / "beta.txt").read_bytes())
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "config" / "dagster-postgres.yaml").read_text())
    run_config = tmp_path / "run.yaml"
    run_config.write_text(json.dumps(_run_config(tiny_model_dir, _celery_execution())))
    env = {**os.environ, "DAGSTER_HOME": str(home), "SAE_PLATFORM_ROOT": f"s3://{bucket}/sae",
           "SAE_PLATFORM_INBOX": f"s3://{bucket}/inbox/*", "SAE_PLATFORM_HOLDOUT": f"s3://{bucket}/holdout/*",
           "SAE_PLATFORM_DATA": str(tmp_path), "SAE_PLATFORM_S3_ENDPOINT_URL": s3_endpoint,
           "SAE_PLATFORM_EXECUTOR": "celery", "SAE_PLATFORM_CELERY_BROKER": f"{redis_url}/0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), **pg_server.env()}
    for key in ("DAGSTER_HOME", *pg_server.env()):
        monkeypatch.setenv(key, env[key])

    celery_yaml = tmp_path / "celery.yaml"  # config/celery.yaml with the short visibility timeout
    celery_yaml.write_text(json.dumps({"execution": _celery_execution()}))
    # Once, before the first worker (as docs/operator.md#celery says): two processes meeting a fresh
    # database both create Dagster's schema, and one of them fails ("alembic_version already exists").
    subprocess.run([str(BIN / "dagster"), "instance", "migrate"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=180)
    logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2")}
    workers = {name: _start_worker(name, env, logs[name], celery_yaml) for name in logs}
    launched = None
    started = time.monotonic()
    try:
        _wait_ready(workers, logs)
        print(f"workers ready: {time.monotonic() - started:.0f} s")
        launched = subprocess.Popen([str(BIN / "dagster"), "job", "execute", "-m", "jobs.definitions",
                                     "-j", "full_pipeline", "-c", str(run_config)],
                                    cwd=REPO, env=env, stdout=(tmp_path / "run.log").open("w"),
                                    stderr=subprocess.STDOUT)
        killed = _kill_the_worker_that_trains(launched, workers, tmp_path)
        assert launched.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-5000:]
        print(f"celery run: {time.monotonic() - started:.0f} s")

        with DagsterInstance.get() as instance:
            run = instance.get_runs(limit=1)[0]
            records = instance.all_logs(run.run_id)
        starts = [r for r in records if r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_START]
        pids = {r.dagster_event.pid for r in starts}
        hosts = {r.dagster_event.event_specific_data.metadata["Celery worker"].value for r in records
                 if r.dagster_event and r.dagster_event.event_type == DagsterEventType.ENGINE_EVENT
                 and "in celery worker" in (r.dagster_event.message or "")}
        assert len(pids) >= 2 and launched.pid not in pids, pids
        assert {h.split("@")[0] for h in hosts} == {"w1", "w2"}, hosts
        assert all(_parent_pid_was_a_worker(pid, workers, killed) for pid in pids)

        # fanned-out steps overlapped on different workers
        intervals = {}
        for r in records:
            event = r.dagster_event
            if event and event.step_key and event.event_type in (DagsterEventType.STEP_START,
                                                                 DagsterEventType.STEP_SUCCESS):
                intervals.setdefault(event.step_key, {})[event.event_type] = (r.timestamp, event.pid)
        done = {k: (v[DagsterEventType.STEP_START][0], v[DagsterEventType.STEP_SUCCESS][0],
                    v[DagsterEventType.STEP_SUCCESS][1])
                for k, v in intervals.items() if len(v) == 2}
        assert any(_overlap(a[:2], b[:2]) and a[2] != b[2] for i, a in enumerate(done.values())
                   for b in list(done.values())[i + 1:]), done

        # the killed training step ran again, in the other worker, and resumed from its checkpoint
        train_starts = [r for r in starts if r.dagster_event.step_key.startswith("train_sae")]
        assert train_starts[0].dagster_event.pid == killed["pid"]
        assert len({r.dagster_event.pid for r in train_starts}) == 2, [r.dagster_event.pid for r in train_starts]
        assert any("resuming" in (r.user_message or "") for r in records)

        store = ArtifactStore(f"s3://{bucket}/sae", {"endpoint_url": s3_endpoint})
        pointer = store.pointer(checkpoint_name(TINY_SAE))
        assert pointer["final"] and pointer["tokens"] == TRAINING["token_budget"]
        _same_artifacts(_reference_run(tmp_path, tiny_model_dir, text_dir), store)
        print(f"in-process reference compared: {time.monotonic() - started:.0f} s")

        # a re-launch completes (everything up to date) and every cached row is in the store exactly once
        again = subprocess.run([str(BIN / "dagster"), "job", "execute", "-m", "jobs.definitions", "-j",
                                "full_pipeline", "-c", str(run_config)], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=600)
        assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
        with DagsterInstance.get() as instance:
            messages = [r.user_message or "" for r in instance.all_logs(instance.get_runs(limit=1)[0].run_id)]
        assert any(m.startswith("sae_checkpoint[") and "is up to date" in m for m in messages), messages
        print(f"re-launch: {time.monotonic() - started:.0f} s")
        ids = np.concatenate([i for i, _ in iter_shuffled(store, "main", batch_rows=512)])
        n_rows = sum(open_partition(store, batch).acts.shape[0] for batch in BATCHES)
        assert len(ids) == n_rows and np.array_equal(np.sort(ids), np.arange(n_rows)), "lost or duplicated rows"
        print(f"celery test: {time.monotonic() - started:.0f} s")
    finally:
        if launched is not None and launched.poll() is None:
            launched.kill()
            launched.wait()
        for proc in workers.values():
            stop_process_group(proc, timeout=10)


def _parent_pid_was_a_worker(pid: int, workers: dict, killed: dict) -> bool:
    """A step's pid is a celery worker started by one of our `dagster-celery worker start` processes."""
    if pid == killed["pid"]:
        return killed["parent"] in {p.pid for p in workers.values()}
    return _parent_pid(pid) in {p.pid for p in workers.values()}


def _kill_the_worker_that_trains(launched: subprocess.Popen, workers: dict, tmp_path: Path) -> dict:
    """Wait until training has committed a checkpoint, then SIGKILL the worker process running it."""
    from dagster import DagsterEventType, DagsterInstance

    deadline = time.monotonic() + 400
    with DagsterInstance.get() as instance:
        while True:
            assert launched.poll() is None, (tmp_path / "run.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "training never committed a checkpoint"
            runs = instance.get_runs(limit=1)
            records = instance.all_logs(runs[0].run_id) if runs else []
            start = next((r for r in records if r.dagster_event and r.step_key and r.step_key.startswith("train_sae")
                          and r.dagster_event.event_type == DagsterEventType.STEP_START), None)
            if start is not None and any(r.step_key == start.step_key and "checkpoint at step" in (r.user_message or "")
                                         for r in records):
                pid = start.dagster_event.pid
                assert not any(r.dagster_event and r.dagster_event.event_type == DagsterEventType.STEP_SUCCESS
                               and r.step_key == start.step_key for r in records), "training ended before the kill"
                parent = _parent_pid(pid)
                os.kill(pid, signal.SIGKILL)
                return {"pid": pid, "parent": parent}
            time.sleep(0.2)
