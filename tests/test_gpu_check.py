"""`make gpu-check DEVICE=cpu`: the prepared GPU check runs, on tiny sizes, where a lent GPU machine
would run it: a Python without dagster, zarr or polars (a ``sitecustomize`` on PYTHONPATH refuses
to import them), and prints one JSON line per figure, also into ``$OUT/gpu_check.jsonl``."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINES = ("dagster", "zarr", "polars")
FIGURES = ("matmul_bf16_peak", "caching_forward_tokens_per_s", "topk_train_tokens_per_s", "topk_train_peak_fraction",
           "latent_sharded_train_tokens_per_s", "feature_pass1_tokens_per_s", "cuda_tests")


def gpu_machine_env(tmp_path: Path) -> dict:
    """The environment of a subprocess that cannot import what a lent GPU machine lacks."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        class _Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT_ON_GPU_MACHINES!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not on a lent GPU machine)", name=name)
                return None

        sys.meta_path.insert(0, _Absent())
    """))
    return {**os.environ, "PYTHONPATH": str(site), "OUT": str(tmp_path / "out"), "PYTHONUNBUFFERED": "1"}


def test_the_blocker_stands_in_for_the_gpu_machine(tmp_path):
    env = gpu_machine_env(tmp_path)
    for name in ABSENT_ON_GPU_MACHINES:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True)
        assert done.returncode != 0 and "not on a lent GPU machine" in done.stderr, name


def test_make_gpu_check_on_cpu_prints_every_figure_without_dagster_zarr_polars(tmp_path):
    env = gpu_machine_env(tmp_path)
    done = subprocess.run(["make", "-s", "gpu-check", "DEVICE=cpu", f"GPU_CHECK_PY={sys.executable}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()]
    assert printed == written
    lines = {line["metric"]: line for line in printed}
    assert set(FIGURES) <= set(lines), sorted(lines)
    assert all(line["device"] == "cpu" and "error" not in line for line in printed), printed
    for metric in ("matmul_bf16_peak", "caching_forward_tokens_per_s", "topk_train_tokens_per_s",
                   "feature_pass1_tokens_per_s"):
        assert lines[metric]["value"] > 0, lines[metric]
    for metric in ("caching_forward_tokens_per_s", "topk_train_tokens_per_s"):
        line = lines[metric]
        assert line["ratio"] == line["value"] / line["baseline"] or abs(line["ratio"] * line["baseline"] /
                                                                        line["value"] - 1) < 1e-9
    assert lines["topk_train_tokens_per_s"]["recon_max_abs_diff"] < 1e-3  # sparse decoder = dense one
    sharded = lines["latent_sharded_train_tokens_per_s"]  # 2 gloo ranks, each holding half the latents
    assert sharded["value"] > 0 and sharded["backend"] == "gloo" and sharded["ranks"] == 2, sharded
    assert abs(sharded["parameter_fraction"] - 0.5) < 0.01, sharded  # b_pre is replicated: a hair over 1/2
    tests = lines["cuda_tests"]  # the marked files import without dagster/zarr/polars; on a CPU cuda params skip
    assert "tests/test_sae.py" in tests["files"] and tests["counts"].get("failed", 0) == 0, tests
