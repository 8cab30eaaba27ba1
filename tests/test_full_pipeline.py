"""The whole chain as CI runs it: `dagster job execute -j full_pipeline` on the tiny model, with the
multiprocess executor (steps in separate worker processes, two at a time), then the run's own
event log shows which partitioned steps overlapped, and the asset catalog has every asset."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import TINY_SAE, deployment
from dagster import AssetKey, DagsterEventType, DagsterInstance, DagsterRunStatus, EventRecordsFilter

from sae_platform import contexts as ctx
from sae_platform.corpus import partition_key
from sae_platform.feature_merge import read_tables
from sae_platform.freshness import stale_reasons
from sae_platform.storage import ArtifactStore
from sae_platform.trainer import load_sae

REPO = Path(__file__).resolve().parents[1]
MULTIPROCESS = ("multiprocess: {max_concurrent: 2, "
                "start_method: {forkserver: {preload_modules: [jobs.definitions]}}}")
ASSETS = ["base_model", "activations", "shuffle_plan", "shuffle_pass_1", "shuffle_final", "shuffled_activations",
          "sae_checkpoint", "sae_eval", "sae_sparse_probing", "feature_codes", "feature_stats_partial", "feature_topk",
          "feature_context_windows", "feature_contexts", "feature_explanations", "feature_llm_explanations",
          "feature_browser", "sae_comparison", "scaling_laws"]
# The batches of these runs (and tests/test_refresh.py's first build): the smallest and the largest inbox
# file. Two are every multi-batch path (2 x 4 pass-1 jobs fan out beside the other steps); each batch
# more is 7 more steps per run (cache, encode, 4 pass-1 jobs, pass 3), under the multiprocess executor
# each a worker process.
BATCHES = ["alpha", "gamma"]


def execute_full_pipeline(env: dict, run_config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dagster"), "job", "execute", "-m", "jobs.definitions",
                           "-j", "full_pipeline", "-c", str(run_config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def step_intervals(instance: DagsterInstance, run_id: str) -> dict[str, tuple[float, float]]:
    """Per step: (start, end) of its compute, from the run's STEP_START / STEP_SUCCESS events."""
    spans: dict[str, list[float]] = {}
    for entry in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}):
        spans.setdefault(entry.step_key, []).append(entry.timestamp)
    return {step: (min(times), max(times)) for step, times in spans.items()}


def overlapping_pairs(spans: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    steps = sorted(spans, key=lambda s: spans[s][0])
    return [(a, b) for i, a in enumerate(steps) for b in steps[i + 1:] if spans[b][0] < spans[a][1]]


def test_full_pipeline_runs_end_to_end_with_parallel_steps(tmp_path, tiny_model_dir, text_dir):
    env = deployment(tmp_path, tiny_model_dir, text_dir, executor=MULTIPROCESS)
    inbox = Path(env["SAE_PLATFORM_INBOX"]).parent
    for batch in BATCHES:
        shutil.copy(text_dir / f"{batch}.txt", inbox / f"{batch}.txt")
    run = execute_full_pipeline(env, Path(env["SAE_PLATFORM_RUN_CONFIG"]))
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    # the explanation steps score on the held-out codes sae_eval stored: no base model per shard
    assert run.stderr.count("held-out contexts sae_eval encoded with this checkpoint") == 4, run.stderr[-5000:]

    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    (record,) = instance.get_runs()
    assert record.job_name == "full_pipeline" and record.status == DagsterRunStatus.SUCCESS
    spans = step_intervals(instance, record.run_id)
    pairs = overlapping_pairs(spans)
    partitioned = [(a, b) for a, b in pairs if "[" in a and "[" in b]
    assert partitioned, f"no two fanned-out steps overlapped: {json.dumps(spans, indent=1)}"
    ops = lambda a, b: {a.split("[")[0], b.split("[")[0]}  # noqa: E731
    assert not [p for p in pairs if ops(*p) == {"partial_stats", "merge_shard"}], "pass 2 overlapped pass 1"
    print(f"{len(spans)} steps, {len(partitioned)} overlapping pairs of partitioned steps, e.g. {partitioned[:3]}")

    for asset in ASSETS:  # each op logged its asset's materialization: the catalog and lineage are complete
        assert instance.get_latest_materialization_event(AssetKey(asset)) is not None, asset
    partials = instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION,
                                                             asset_key=AssetKey("feature_stats_partial")))
    # one job per (batch, shard group), after one encode per batch
    assert {r.partition_key for r in partials} == {f"{b}|f{g}" for b in BATCHES for g in range(4)}
    encodes = instance.get_event_records(EventRecordsFilter(DagsterEventType.ASSET_MATERIALIZATION,
                                                            asset_key=AssetKey("feature_codes")))
    assert sorted(r.partition_key for r in encodes) == BATCHES
    checks = {(e.asset_key.to_user_string(), e.check_name, e.partition): e.passed for e in (
        entry.dagster_event.event_specific_data for entry in instance.all_logs(
            record.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION))}
    assert checks[("shuffled_activations", "shuffle_is_a_permutation", None)]
    assert all(checks[("feature_topk", "matches_brute_force", f"f{i}")] for i in range(4))

    store = ArtifactStore(env["SAE_PLATFORM_ROOT"])
    assert stale_reasons(store, shuffle_name="main", sae_name=TINY_SAE, n_feature_shards=4) == []
    site = Path(env["SAE_PLATFORM_ROOT"]) / "browser" / TINY_SAE
    pointer = json.loads((site / "site.json").read_text())
    assert json.loads((site / pointer["data"] / "index.json").read_text())["n_features"] == 4096

    # A re-run skips what is up to date (in-process: nothing heavy is left to spread over workers).
    in_process = tmp_path / "in_process.yaml"
    in_process.write_text(Path(env["SAE_PLATFORM_RUN_CONFIG"]).read_text().replace(MULTIPROCESS, "in_process: {}"))
    again = execute_full_pipeline(env, in_process)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    for skipped in ("already cached", "already holds plan", "a finished checkpoint", "describe its current checkpoint"):
        assert skipped in again.stderr, skipped
    (rerun, _) = instance.get_runs()
    latest = instance.fetch_materializations(AssetKey("feature_browser"), limit=2).records
    assert latest[0].run_id == rerun.run_id and "up_to_date" in latest[0].asset_materialization.metadata, \
        "the re-run reports the browser as up to date, without rebuilding it"
    versions = [r.asset_materialization.tags.get("dagster/data_version") for r in latest]
    assert versions[0] == versions[1], "a skipped stage keeps its data version: nothing downstream turns stale"

    lineage = subprocess.run([str(Path(sys.executable).parent / "sae-platform"), "lineage", "--sae", TINY_SAE,
                              "--shard", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert lineage.returncode == 0, lineage.stderr[-3000:]
    for line in (f"feature tables {TINY_SAE} shard f2", f"dagster run {record.run_id}", "activations/alpha",
                 "activations/gamma", "base_model", "asset graph upstream of feature_topk", "shuffled_activations"):
        assert line in lineage.stdout, (line, lineage.stdout)


def test_executor_is_chosen_by_the_deployment_with_clear_errors():
    from jobs.full_pipeline import pipeline_executor
    from sae_platform.errors import PlatformError

    assert pipeline_executor("multiprocess").name == "multi_or_in_process_executor"
    with pytest.raises(PlatformError, match="use one of multiprocess, celery, k8s"):
        pipeline_executor("dask")
    try:
        import dagster_celery  # noqa: F401
    except ImportError:  # as on CI: the error names the package to install
        with pytest.raises(PlatformError, match="pip install 'dagster-celery"):
            pipeline_executor("celery")
    else:
        assert pipeline_executor("celery").name == "celery"


def test_bad_files_never_stop_the_pipeline(tmp_path, tiny_model_dir, text_dir):
    """Issue 12: two good files beside an empty one, a blank one, a latin-1 one, a macOS `._` file and
    links out of the inbox. full_pipeline caches, shuffles, trains and publishes the good batches,
    reports the failed ones (log, step metadata, `sae-platform status`), and reads nothing outside."""
    env = deployment(tmp_path, tiny_model_dir, text_dir)  # in-process executor
    inbox = Path(env["SAE_PLATFORM_INBOX"]).parent
    shutil.copy(text_dir / "alpha.txt", inbox / "alpha.txt")  # and the long-named one: two good batches
    long_name = "数据" + "l" * 245 + ".txt"  # 255 bytes: legal, and once broke every run (step output path)
    (inbox / long_name).write_text((text_dir / "gamma.txt").read_text() + " another batch")
    (inbox / "zz_empty.txt").write_bytes(b"")
    (inbox / "blank.txt").write_text("  \n \n")
    (inbox / "latin.txt").write_bytes(("caf\xe9 " + (text_dir / "beta.txt").read_text()).encode("latin-1"))
    (inbox / "._alpha.txt").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (inbox / "passwd.txt").symlink_to("/etc/passwd")
    (inbox / "environ.txt").symlink_to("/proc/self/environ")
    secret_env = {**env, "AWS_SECRET_ACCESS_KEY": "sekrit-value-that-must-not-leak"}
    run = execute_full_pipeline(secret_env, Path(env["SAE_PLATFORM_RUN_CONFIG"]))
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    assert "2 batch(es) failed to cache and are left out: blank: " in run.stderr
    assert "skipped " in run.stderr and "outside the inbox" in run.stderr

    store = ArtifactStore(env["SAE_PLATFORM_ROOT"])
    index = store.read_json(f"{store.resolve('shuffled/main')}/index.json")
    assert sorted(i["key"] for i in index["inputs"]) == sorted(["alpha", partition_key(long_name)])
    assert stale_reasons(store, shuffle_name="main", sae_name=TINY_SAE, n_feature_shards=4) == []
    root = Path(env["SAE_PLATFORM_ROOT"])
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"root:x:0:0" not in data and b"sekrit-value" not in data, path

    instance = DagsterInstance.from_config(env["DAGSTER_HOME"])
    (record,) = instance.get_runs()
    (plan,) = instance.fetch_materializations(AssetKey("shuffle_plan"), limit=1).records
    assert plan.run_id == record.run_id
    assert sorted(plan.asset_materialization.metadata["failed_batches"].value) == ["blank", "latin"]
    failed_steps = {e.step_key for e in instance.all_logs(record.run_id, of_type=DagsterEventType.STEP_OUTPUT)
                    if "failed" in e.dagster_event.event_specific_data.metadata}
    assert len(failed_steps) == 2 and all(step.startswith("cache_batch[") for step in failed_steps)

    status = subprocess.run([str(Path(sys.executable).parent / "sae-platform"), "status"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-3000:]
    for line in ("0 waiting to be cached", "skipped passwd.txt: a symbolic link",
                 "skipped environ.txt: a symbolic link",
                 "skipped ._alpha.txt: hidden", "skipped zz_empty.txt: empty (0 bytes)",
                 "failed blank: ", "holds no text", "failed latin: ", "byte 3 is 0xe9"):
        assert line in status.stdout, (line, status.stdout)


def site_index(store: ArtifactStore, sae_name: str) -> dict:
    site = store.path("browser", sae_name)
    return json.loads(open(f"{site}/{json.loads(open(f'{site}/site.json').read())['data']}/index.json").read())


def assert_tables_match_brute_force(store: ArtifactStore, sae_name: str, group: str) -> None:
    """The committed feature tables of ``sae_name`` against a dense encode of every row of hook-point
    store ``group`` of every pinned partition: counts and max of every feature, the top-k values,
    and each example's activation at its (partition, row)."""
    sae, _ = load_sae(store, sae_name)
    tables = [read_tables(store, sae_name, i) for i in range(4)]
    parts = tables[0].meta["partitions"]
    assert all(t.meta["group"] == group for t in tables)
    dense, offsets = [], {}
    for info in parts:
        offsets[info["key"]] = sum(len(d) for d in dense)
        acts = store.open_group(store.path("activations", info["key"], info["version"], group), mode="r")["acts"][:]
        assert len(acts) == info["n_tokens"]
        with torch.no_grad():
            dense.append(sae.encode_dense(torch.from_numpy(acts).float()).numpy())
    dense = np.concatenate(dense)
    stats = pl.concat([t.stats for t in tables]).sort("feature")
    examples = pl.concat([t.examples for t in tables])
    assert stats["feature"].to_list() == list(range(sae.n_latents))
    assert (stats["n_tokens_total"] == len(dense)).all()
    active = dense > 0
    assert np.abs(stats["count"].to_numpy() - active.sum(0)).max() <= 1  # a threshold tie may flip once
    np.testing.assert_allclose(stats["max"].to_numpy(), dense.max(0), rtol=1e-5, atol=1e-6)
    rows = np.array([offsets[p] for p in examples["partition"]]) + examples["row"].to_numpy()
    np.testing.assert_allclose(examples["activation"].to_numpy(), dense[rows, examples["feature"].to_numpy()],
                               rtol=1e-5, atol=1e-6)  # each example names the row of *this* store it came from
    top = tables[0].meta["top_k"]
    for feature in np.flatnonzero(active.sum(0) > 0)[:64].tolist():
        got = examples.filter((pl.col("feature") == feature) & (pl.col("kind") == "top")).sort("rank")
        want = np.sort(dense[:, feature])[::-1][:min(top, int(active[:, feature].sum()))]
        np.testing.assert_allclose(got["activation"].to_numpy(), want, rtol=1e-5, atol=1e-6)


def test_full_pipeline_with_several_hook_points_and_a_transcoder(tmp_path, tiny_model_dir, text_dir, monkeypatch):
    """config/demo-multihook.yaml's shape on the tiny model: three hook points and a transcoder pair
    cached in one pass per batch, one shuffled store each, one SAE per hook point plus a transcoder,
    each evaluated by splicing at its own hook point and exported under its own hook name. The
    feature tables and browser describe the SAE of the second hook point (full_pipeline) and the
    transcoder (`sae-platform features`), each read from its own store's rows."""
    env = deployment(tmp_path, tiny_model_dir, text_dir)
    for batch in BATCHES:
        shutil.copy(text_dir / f"{batch}.txt", Path(env["SAE_PLATFORM_INBOX"]).parent / f"{batch}.txt")
    hooks = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.hook_attn_out",
             "blocks.1.ln2.hook_normalized -> blocks.1.hook_mlp_out"]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
{TINY_SAE}: {{variant: topk, n_latents: 4096, k: 32}}
mlp1: {{variant: topk, n_latents: 256, k: 8, hook_point: blocks.1.hook_mlp_out}}
attn0: {{variant: matryoshka_batchtopk, n_latents: 256, k: 8, hook_point: blocks.0.hook_attn_out}}
transcoder1: {{variant: batchtopk, n_latents: 256, k: 8, hook_point: "{hooks[3]}"}}
""")
    run_config = Path(env["SAE_PLATFORM_RUN_CONFIG"])
    with_hooks = f"caching: {{config: {{ctx_len: 32, batch_size: 4, hook_points: {json.dumps(hooks)}}}}}"
    text = run_config.read_text().replace("caching: {config: {ctx_len: 32, batch_size: 4}}", with_hooks)
    assert "hook_points" in text
    text = text.replace("evaluation: {config: {ce_contexts: 2,",
                        "evaluation: {config: {max_fvu: 10.0, min_loss_recovered: -100.0, ce_contexts: 2,")
    text = text.replace(f"features: {{config: {{sae_name: {TINY_SAE},", "features: {config: {sae_name: mlp1,")
    assert "sae_name: mlp1" in text
    text += f"ops: {{sae_sweep: {{config: {{sae_names: [{TINY_SAE}, mlp1, attn0, transcoder1]}}}}}}\n"
    run_config.write_text(text)
    run = execute_full_pipeline({**env, "SAE_PLATFORM_SWEEP": str(sweep)}, run_config)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]

    store = ArtifactStore(env["SAE_PLATFORM_ROOT"])
    expect = {TINY_SAE: ("main", "blocks.1.hook_resid_post", None),
              "mlp1": ("main.h1", "blocks.1.hook_mlp_out", None),
              "attn0": ("main.h2", "blocks.0.hook_attn_out", None),
              "transcoder1": ("main.h3", "blocks.1.hook_mlp_out", "blocks.1.ln2.hook_normalized")}
    for name, (shuffled, hook_name, hook_in) in expect.items():
        for prefix in ("sae", "eval", "saelens"):
            assert store.resolve(f"{prefix}/{name}") is not None, (prefix, name, store.committed_names(prefix))
        cfg = json.loads(store.fs.cat_file(f"{store.resolve(f'sae/{name}')}/cfg.json"))
        assert cfg["data"]["shuffle"] == shuffled, name
        report = json.loads(store.fs.cat_file(f"{store.resolve(f'eval/{name}')}/report.json"))
        assert report["hook_name"] == hook_name and report["loss_recovered"] is not None, name
        assert report.get("hook_name_in") == hook_in, name
        # the feature metrics ran at the SAE's own hook point (tests/test_trainer.py checks their values)
        assert report["ablation_pairs"] > 0 and report["probe_loss_neurons"] is not None, name
        exported = json.loads(store.fs.cat_file(f"{store.resolve(f'saelens/{name}')}/cfg.json"))
        assert exported["hook_name"] == (hook_in or hook_name), name
        assert exported.get("hook_name_out") == (hook_name if hook_in else None), name
    assert json.loads(store.fs.cat_file(f"{store.resolve('sae/transcoder1')}/cfg.json"))["sae"]["d_out"] == 32

    # features of the second hook point's SAE, built by full_pipeline from hooks/1.zarr's rows
    assert_tables_match_brute_force(store, "mlp1", "hooks/1.zarr")
    index = site_index(store, "mlp1")
    assert index["hook_point"] == "blocks.1.hook_mlp_out" == index["lineage"]["base_model"]["hook_name"]
    assert index["n_features"] == 256
    assert stale_reasons(store, shuffle_name="main", sae_name="mlp1", n_feature_shards=4) == []
    assert stale_reasons(store, shuffle_name="main", sae_name="attn0", n_feature_shards=4) == [
        "feature tables f0 of 'attn0' were never built", "feature tables f1 of 'attn0' were never built",
        "feature tables f2 of 'attn0' were never built", "feature tables f3 of 'attn0' were never built"]

    # the transcoder's: paired rows [input | output] of hooks/3.zarr, the input half encoded
    for key, value in {**env, "SAE_PLATFORM_SWEEP": str(sweep)}.items():
        monkeypatch.setenv(key, value)
    from jobs.cli import build_features
    from jobs.definitions import build_definitions
    from jobs.settings import Settings

    assert build_features(DagsterInstance.from_config(env["DAGSTER_HOME"]), build_definitions(Settings.from_env()),
                          "transcoder1")
    assert_tables_match_brute_force(store, "transcoder1", "hooks/3.zarr")
    index = site_index(store, "transcoder1")
    assert index["hook_point"] == hooks[3]
    contexts = pl.concat([ctx.read_feature_contexts(store, "transcoder1", i) for i in range(4)])
    assert contexts.height > 0 and contexts["has_act"].list.any().all()


def test_full_pipeline_on_synthetic_activations(tmp_path, tiny_model_dir, text_dir):
    """resources.synthetic set: full_pipeline draws its partitions (synthetic-000, …) instead of caching
    the inbox, reads no base model, trains and evaluates the sweep with the figures against the known
    features, shows them on the comparison page, and builds feature tables and the browser whose
    tokens and logit effects name true features."""
    env = deployment(tmp_path, tiny_model_dir, text_dir)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"{TINY_SAE}: {{variant: topk, n_latents: 128, k: 6}}\n"
                     "syn-relu: {variant: relu, n_latents: 128}\n")
    run_config = Path(env["SAE_PLATFORM_RUN_CONFIG"])
    text = run_config.read_text().replace("evaluation: {config: {ce_contexts: 2,",
                                          "evaluation: {config: {ce_contexts: 0, metric_contexts: 0, max_fvu: 10.0,")
    synthetic = ("  synthetic: {config: {n_features: 128, d_model: 32, n_partitions: 2, contexts_per_partition: 24,"
                 " n_parents: 4, children_per_parent: 3, mean_l0: 6, heldout_rows: 512}}\n")
    text = text.replace("resources:\n", "resources:\n" + synthetic)
    text += f"ops: {{sae_sweep: {{config: {{sae_names: [{TINY_SAE}, syn-relu]}}}}}}\n"
    run_config.write_text(text)
    run = execute_full_pipeline({**env, "SAE_PLATFORM_SWEEP": str(sweep)}, run_config)
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]

    store = ArtifactStore(env["SAE_PLATFORM_ROOT"])
    assert sorted(store.committed_names("activations")) == ["activations/synthetic-000", "activations/synthetic-001"]
    assert store.committed_names("models") == []  # no base model was read or converted
    from sae_platform.catalog import ABSORPTION_REPORT, absorption_name  # absorption refuses: no model to prompt

    refused = json.loads(store.fs.cat_file(f"{store.resolve(absorption_name(TINY_SAE))}/{ABSORPTION_REPORT}"))
    assert not refused["scored"] and "synthetic activations" in refused["refusal"]
    for name in (TINY_SAE, "syn-relu"):
        report = json.loads(store.fs.cat_file(f"{store.resolve(f'eval/{name}')}/report.json"))
        assert 0 < report["gt_mcc"] <= 1 and report["gt_rows"] == 512 and report["gt_absorption_children"] > 0
    page = next(Path(env["SAE_PLATFORM_ROOT"], "reports").glob("*.html")).read_text()
    assert "id=ground-truth" in page and "syn-relu" in page[page.index("id=ground-truth"):]
    index = site_index(store, TINY_SAE)
    assert index["n_features"] == 128
    logits = pl.read_parquet(f"{store.resolve(f'features/{TINY_SAE}/logits/f0')}/logit_effects.parquet")
    assert logits["top_token_strs"].list.first().str.starts_with("f").all()  # true features, not words
