"""The Dagster instance on a real PostgreSQL server (config/dagster-postgres.yaml), through the real CLI.

A throwaway server is started for this module (the `pg_server` fixture, tests/servers.py). The server
binaries come from Debian's postgresql package: `.ci/install-postgres` (run by `make test`).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACTIVATIONS_KEY = json.dumps(["activations"])  # how the event log stores AssetKey("activations")


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def test_dagster_job_execute_stores_everything_in_postgres(pg_server, tiny_model_dir, text_dir, tmp_path,
                                                           monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "config" / "dagster-postgres.yaml", home / "dagster.yaml")
    artifacts = tmp_path / "artifacts"
    env = {**os.environ, "DAGSTER_HOME": str(home), "SAE_PLATFORM_ROOT": str(artifacts),
           "SAE_PLATFORM_INBOX": str(text_dir / "*"), "SAE_PLATFORM_DATA": str(tmp_path), **pg_server.env()}
    bin_dir = Path(sys.executable).parent

    # The dynamic partitions go to the instance, i.e. into PostgreSQL.
    reg = subprocess.run([str(bin_dir / "sae-platform"), "register"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert reg.returncode == 0, reg.stderr[-3000:]
    assert "3 partitions registered" in reg.stdout

    run_config = tmp_path / "run.yaml"
    run_config.write_text(json.dumps({
        "resources": {"language_model": {"config": {"source": str(tiny_model_dir), "layer": 1, "device": "cpu"}},
                      "caching": {"config": {"ctx_len": 32, "batch_size": 4}}},
    }))  # JSON is YAML
    started = time.time()
    run = subprocess.run([str(bin_dir / "dagster"), "job", "execute", "-m", "jobs.definitions",
                          "-j", "cache_activations", "-c", str(run_config),
                          "--tags", json.dumps({"dagster/partition": "alpha"})],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "RUN_SUCCESS" in run.stderr + run.stdout
    assert (artifacts / "activations").exists()

    # Read PostgreSQL itself.
    runs = pg_server.query("SELECT run_id, status, partition FROM runs WHERE pipeline_name = %s",
                           ("cache_activations",))
    assert len(runs) == 1 and runs[0][1:] == ("SUCCESS", "alpha"), runs
    run_id = runs[0][0]
    materializations = pg_server.query(
        "SELECT run_id, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
        "AND asset_key = %s", (ACTIVATIONS_KEY,))
    assert materializations == [(run_id, "alpha")]
    partitions = pg_server.query("SELECT partition FROM dynamic_partitions WHERE partitions_def_name = %s "
                                 "ORDER BY partition", ("activation_batches",))
    assert [p for (p,) in partitions] == ["alpha", "beta", "gamma"]

    # And through Dagster's own API, reading the same yaml from $DAGSTER_HOME.
    from dagster import AssetKey, DagsterInstance

    for key in ("DAGSTER_HOME", *pg_server.env()):
        monkeypatch.setenv(key, env[key])
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        event = instance.get_latest_materialization_event(AssetKey("activations"))
        assert event is not None and event.run_id == run_id
        assert event.asset_materialization.partition == "alpha"
        assert instance.get_dynamic_partitions("activation_batches") == ["alpha", "beta", "gamma"]

    # Nothing went to SQLite under $DAGSTER_HOME.
    files = [p for p in home.rglob("*") if p.is_file()]
    sqlite = [p for p in files if p.suffix in {".db", ".sqlite", ".sqlite3"} or _is_sqlite(p)]
    assert sqlite == [], sqlite
    assert not (home / "history").exists() and not (home / "schedules").exists()
    print(f"dagster job execute on postgres: {time.time() - started:.1f} s")

    # On a shared instance a process id means nothing: recover refuses unless told all runs ran here.
    refused = subprocess.run([str(bin_dir / "sae-platform"), "recover"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--all-runs-on-this-host" in refused.stderr, refused.stderr[-2000:]
    allowed = subprocess.run([str(bin_dir / "sae-platform"), "recover", "--all-runs-on-this-host"], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0 and "0 dead run(s)" in allowed.stdout, allowed.stdout + allowed.stderr
