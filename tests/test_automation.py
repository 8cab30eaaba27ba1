"""New data flows on its own, on a real Dagster daemon: a file dropped in the inbox becomes an
activation partition (inbox_sensor), then one full_pipeline run brings the shuffle, SAE, tables and
browser up to date (downstream_freshness_sensor); the nightly schedule catches what is left behind."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SAE as SAE
from conftest import deployment, stop_process_group
from dagster import DagsterInstance, DagsterRunStatus, RunRequest, build_schedule_context

from sae_platform.freshness import stale_reasons
from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def drop(source: Path, inbox: Path, name: str) -> None:
    """Arrive atomically, as an upload tool would: the sensor never sees half a file."""
    shutil.copy(source, inbox / f".{name}.part")
    os.replace(inbox / f".{name}.part", inbox / name)


def wait_for_runs(instance: DagsterInstance, job_name: str, count: int, log: Path) -> list:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert "Error while importing code" not in log.read_text(), log.read_text()[-4000:]
        runs = instance.get_runs()
        failed = [r for r in runs if r.status == DagsterRunStatus.FAILURE]
        assert not failed, f"{failed[0].job_name} run failed: " + _failure(instance, failed[0].run_id)
        done = [r for r in runs if r.job_name == job_name and r.status == DagsterRunStatus.SUCCESS]
        if len(done) >= count:
            return done
        time.sleep(1)
    pytest.fail(f"no {count} successful {job_name} run(s) after {TIMEOUT_S} s; daemon log:\n"
                + log.read_text()[-4000:])


def _failure(instance: DagsterInstance, run_id: str) -> str:
    events = instance.all_logs(run_id)
    return "\n".join(str(e.dagster_event.event_specific_data)[:2000] for e in events
                     if e.dagster_event and e.dagster_event.is_failure)[-4000:]


@pytest.fixture
def daemon(tmp_path, tiny_model_dir, text_dir):
    env = deployment(tmp_path, tiny_model_dir, text_dir)
    log = tmp_path / "daemon.log"
    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])  # creates the SQLite schema before the daemon
    instance.get_runs()
    with open(log, "w") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run",
                                    "-m", "jobs.definitions"], cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        stop_process_group(process)

    try:
        yield env, instance, log, stop
    finally:
        stop()


def test_new_files_flow_through_to_the_browser_on_their_own(daemon, text_dir):
    env, instance, log, _ = daemon
    inbox, store = Path(env["SAE_PLATFORM_INBOX"]).parent, ArtifactStore(env["SAE_PLATFORM_ROOT"])
    for name in ("alpha.txt", "gamma.txt"):
        drop(text_dir / name, inbox, name)

    wait_for_runs(instance, "full_pipeline", 1, log)
    cached = wait_for_runs(instance, "cache_inbox", 1, log)  # one run per sensor tick, covering both files
    assert sorted(k for r in cached for k in r.run_config["ops"]["activation_batches"]["config"]["keys"]) == [
        "alpha", "gamma"]
    index = store.read_json(f"{store.resolve('shuffled/main')}/index.json")
    assert sorted(i["key"] for i in index["inputs"]) == ["alpha", "gamma"]
    assert stale_reasons(store, shuffle_name="main", sae_name=SAE, n_feature_shards=4) == []
    assert (Path(env["SAE_PLATFORM_ROOT"]) / "browser" / SAE / "site.json").exists()

    drop(text_dir / "beta.txt", inbox, "delta.txt")  # a new batch, later
    runs = wait_for_runs(instance, "full_pipeline", 2, log)
    index = store.read_json(f"{store.resolve('shuffled/main')}/index.json")
    assert sorted(i["key"] for i in index["inputs"]) == ["alpha", "delta", "gamma"]
    assert stale_reasons(store, shuffle_name="main", sae_name=SAE, n_feature_shards=4) == []
    assert "new: delta" in runs[0].tags["sae_platform/why"]
    time.sleep(6)  # a few more sensor ticks: nothing is behind, so nothing more is launched
    assert len([r for r in instance.get_runs() if r.job_name == "full_pipeline"]) == 2


def test_nightly_schedule_launches_only_when_something_is_behind(daemon, text_dir, monkeypatch):
    env, instance, log, stop_daemon = daemon
    inbox = Path(env["SAE_PLATFORM_INBOX"]).parent
    for name in ("alpha.txt", "beta.txt"):  # enough rows for a held-out split and a few batches
        drop(text_dir / name, inbox, name)
    wait_for_runs(instance, "full_pipeline", 1, log)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from jobs.definitions import build_definitions
    from jobs.settings import Settings

    defs = build_definitions(Settings.from_env())
    schedule = defs.get_schedule_def("nightly_refresh")
    resources = {k: v for k, v in defs.resources.items()}

    def tick():
        with build_schedule_context(instance=instance, resources=resources) as context:
            return schedule.evaluate_tick(context)

    assert "everything is up to date" in tick().skip_message
    stop_daemon()  # a file arriving while no sensor watches: the nightly run must pick it up
    drop(text_dir / "gamma.txt", inbox, "late.txt")
    requests = tick().run_requests
    assert len(requests) == 1 and isinstance(requests[0], RunRequest)
    assert "1 inbox file(s) not cached: late" in requests[0].tags["sae_platform/why"]
    assert requests[0].run_config["resources"]["features"]["config"]["sae_name"] == SAE  # the deployment's config
