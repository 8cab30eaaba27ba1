"""Operator commands that used to mislead: each says what is actually wrong (issue 13.9).

Every case runs the real CLI (``python -m jobs.cli``) in a subprocess with its own environment."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_platform.storage import ArtifactStore

REPO = Path(__file__).resolve().parents[1]
SAE = "topk-4k-k32"


def _cli(args, cwd, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("SAE_PLATFORM_") and k != "DAGSTER_HOME"}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO), base.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True,
                            env={**base, **env}, timeout=300, check=False)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def root_with_tables(tmp_path):
    """An artifact root holding feature tables of SAE and a trained SAE without tables."""
    store = ArtifactStore(str(tmp_path / "artifacts"))
    for shard in range(4):
        with store.writing(f"features/{SAE}/tables/f{shard}") as version:
            store.fs.pipe_file(f"{version}/meta.json", b"{}")
    with store.writing("sae/other-sae", step=1, tokens=1, final=True) as version:
        store.fs.pipe_file(f"{version}/cfg.json", b"{}")
    home = tmp_path / "dagster_home"
    home.mkdir()
    return {"SAE_PLATFORM_ROOT": store.root_url, "DAGSTER_HOME": str(home), "SAE_PLATFORM_DATA": str(tmp_path / "data")}


def test_lineage_of_a_misspelt_sae_names_the_known_ones(root_with_tables, tmp_path):
    code, out = _cli(["lineage", "--sae", "topk-4k-k3"], tmp_path, **root_with_tables)
    assert code != 0
    assert "no SAE named 'topk-4k-k3'" in out and f"known: {SAE}" in out and "other-sae" in out
    assert "materialize feature_topk first" not in out
    code, out = _cli(["lineage", "--sae", "other-sae"], tmp_path, **root_with_tables)
    assert code != 0 and "trained but has no feature tables" in out and "sae-platform features --sae other-sae" in out


def test_lineage_of_a_shard_that_does_not_exist(root_with_tables, tmp_path):
    for shard in ("7", "-1"):
        code, out = _cli(["lineage", "--sae", SAE, "--shard", shard], tmp_path, **root_with_tables)
        assert code != 0 and f"no feature shard {shard}: shards are 0–3" in out
        assert "materialize" not in out


def test_features_of_a_misspelt_sae(root_with_tables, tmp_path):
    code, out = _cli(["features", "--sae", "topk-4k-k3"], tmp_path, **root_with_tables)
    assert code != 0 and "no trained SAE named 'topk-4k-k3'" in out and "trained: other-sae" in out


def test_browse_from_another_folder_names_the_artifact_root(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    code, out = _cli(["browse"], elsewhere, DAGSTER_HOME=str(home))
    assert code != 0
    assert f"the artifact root {elsewhere / 'artifacts'} is missing" in out
    assert "SAE_PLATFORM_ROOT is unset" in out and str(elsewhere) in out
    assert "run `make demo`" not in out


def test_browse_of_a_misspelt_sae_lists_the_built_ones(tmp_path, root_with_tables):
    site = Path(root_with_tables["SAE_PLATFORM_ROOT"]) / "browser" / SAE
    site.mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html>")
    code, out = _cli(["browse", "--sae", "nope"], tmp_path, **root_with_tables)
    assert code != 0 and "no feature browser of SAE 'nope'" in out and f"browsers of: {SAE}" in out


def test_demo_with_a_missing_config_says_so_and_runs_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    data = tmp_path / "data"
    code, out = _cli(["demo", "--config", "config/nope.yaml"], tmp_path, DAGSTER_HOME=str(home),
                     SAE_PLATFORM_DATA=str(data), SAE_PLATFORM_ROOT=str(tmp_path / "artifacts"))
    assert code != 0
    assert "config/nope.yaml does not exist" in out and "nothing ran" in out
    assert "resumes" not in out and "re-running" not in out
    assert not data.exists() and not (tmp_path / "artifacts").exists() and not any(home.iterdir())
