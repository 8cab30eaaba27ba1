"""benchmarks/dashboards_vs_saedashboard.py without sae-dashboard's venv: it says why and how to build it,
and runs nothing (the comparison itself needs the venv: `make sae-dashboard-venv`, then run the script)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "dashboards_vs_saedashboard.py"


def test_the_benchmark_skips_naming_the_make_target_when_the_peer_venv_is_absent(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    env = {**os.environ, "SAE_DASHBOARD_PYTHON": str(missing)}
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path / "out.jsonl")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    message, line = run.stdout.strip().splitlines()
    assert "`make sae-dashboard-venv`" in message and str(missing) in message and "SAE_DASHBOARD_PYTHON" in message
    skipped = json.loads(line)
    assert skipped["peer"] == "sae-dashboard" and skipped["peer_version"] == "0.8.0"
    assert skipped["skipped"] == message
    assert not (tmp_path / "out.jsonl").exists()  # nothing measured, nothing written
