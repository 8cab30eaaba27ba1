"""The operator CLI answers at once: `--help` and `status` import neither Dagster nor torch."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules_after(code: str, env: dict | None = None) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, check=True, env=env)
    return set(out.stdout.split())


def test_help_loads_no_heavy_module():
    loaded = _modules_after("import jobs.cli\ntry:\n    jobs.cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert not {"torch", "dagster", "transformers", "polars"} & loaded


def test_status_reads_the_store_without_dagster_or_torch(tmp_path):
    env = {**os.environ, "SAE_PLATFORM_ROOT": str(tmp_path / "artifacts")}
    loaded = _modules_after("import jobs.cli\njobs.cli.main(['status'])", env)
    assert not {"torch", "dagster", "transformers"} & loaded


def test_cli_flags_default_to_the_deployment_settings():
    from jobs.cli import stage_settings

    assert stage_settings(training={"token_budget": None, "lr": None}) == {"resources": {}}
    assert stage_settings(training={"token_budget": 2048, "lr": None}, evaluation={"ce_contexts": None}) == {
        "resources": {"training": {"config": {"token_budget": 2048}}}}
