"""The Makefile's instance-config rule: a pulled config/dagster.yaml reaches an unedited
$DAGSTER_HOME, and never overwrites one the operator edited (PostgreSQL, S3 logs)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(repo: Path, home: Path) -> str:
    target = home / "dagster.yaml"
    if target.exists():  # the pulled file is newer than the copy, whatever the clock's resolution
        source = repo / "config" / "dagster.yaml"
        os.utime(source, (target.stat().st_mtime + 2, target.stat().st_mtime + 2))
    return subprocess.run(["make", "-s", f"DAGSTER_HOME={home}", str(target)], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def test_instance_config_follows_the_repo_unless_edited(tmp_path):
    repo = tmp_path / "repo"
    (repo / "config").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    source, home = repo / "config" / "dagster.yaml", tmp_path / "home"
    source.write_text("telemetry: {enabled: false}\n")
    assert "copied" in _make(repo, home)
    source.write_text("telemetry: {enabled: false}\nrun_monitoring: {enabled: true}\n")  # a pull changes it
    _make(repo, home)
    assert (home / "dagster.yaml").read_text() == source.read_text()  # unedited: follows the repo
    (home / "dagster.yaml").write_text("storage: {postgres: {}}\n")  # the operator's own instance
    source.write_text("telemetry: {enabled: true}\n")
    assert "has your edits" in _make(repo, home)
    assert (home / "dagster.yaml").read_text() == "storage: {postgres: {}}\n"
