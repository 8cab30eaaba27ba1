"""Training and evaluation through Dagster on a tiny model: sweep partition, checkpoint, eval, SAELens export."""

import json

import pytest
from conftest import cache_and_shuffle, tiny_definitions
from dagster import DagsterInstance

from sae_platform.shuffled import open_shuffled

TRAIN = {"token_budget": 256 * 12, "batch_size": 256, "checkpoint_every_tokens": 256 * 4, "holdout_rows": 256,
         "dead_after_tokens": 256 * 6}


@pytest.fixture
def defs(store, tiny_model_dir, tiny_hooked, text_dir, tmp_path):
    for name in ("delta", "epsilon"):
        (text_dir / f"{name}.txt").write_text((text_dir / "gamma.txt").read_text())
    cache_and_shuffle(store, tiny_model_dir, tiny_hooked, text_dir)
    return tiny_definitions(store, tiny_model_dir, text_dir, tmp_path)


def _materializations(result) -> dict:
    return {e.asset_key.to_user_string():
            {k: v.value for k, v in e.event_specific_data.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}


def test_train_and_evaluate_one_sweep_entry(defs, store):
    result = defs.resolve_job_def("train_saes").execute_in_process(
        instance=DagsterInstance.ephemeral(), partition_key="topk-4k-k32",
        run_config={"resources": {"training": {"config": TRAIN},
                                  "evaluation": {"config": {"ce_contexts": 4, "ctx_len": 32}}}})
    assert result.success
    meta = _materializations(result)
    ckpt, ev = meta["sae_checkpoint"], meta["sae_eval"]
    assert ckpt["steps"] == 12 and ckpt["variant"] == "topk" and ckpt["n_latents"] == 4096
    assert "data:image/png;base64" in ckpt["training_curves"]
    assert 0 < ev["fvu"] < float("inf") and ev["l0"] <= 32 and 0 <= ev["dead_fraction"] <= 1
    assert ev["ce_clean"] > 0 and ev["ce_zero"] > 0 and ev["ce_n_contexts"] == 4
    assert "data:image/png;base64" in ev["latent_density"]
    # a single seed's error bars: 95% bootstrap intervals over held-out rows (FVU, L0) and contexts (loss recovered)
    assert all("(95% bootstrap)" in ev[f"{key}_interval"] for key in ("fvu", "l0", "loss_recovered"))
    # the feature metrics of Gao et al., next to FVU and loss recovered
    assert 0 <= ev["n2g_precision"] <= 1 and 0 <= ev["n2g_recall"] <= 1 and ev["n2g_features_scored"] > 0
    assert ev["ablation_sparsity_min_possible"] <= ev["ablation_sparsity"] <= 1 and ev["ablation_pairs"] > 0
    assert ev["probe_properties"] >= 1 and 0 <= ev["probe_loss"] <= ev["probe_loss_base_rate"] + 1e-6
    assert ev["probe_loss_neurons"] <= ev["probe_loss_base_rate"] + 1e-6
    report = json.loads(store.fs.cat_file(f"{store.resolve('eval/topk-4k-k32')}/report.json"))
    assert report["n2g_recall"] == pytest.approx(ev["n2g_recall"], rel=1e-3)  # metadata: 4 digits
    probes = json.loads(store.fs.cat_file(f"{store.resolve('eval/topk-4k-k32')}/probes.json"))
    assert len(probes) >= 8 and {p["property"] for p in probes} >= {"number", "start_of_line", "end_of_sentence"}
    # the sweep side by side: this SAE's row carries the same figures
    compared = defs.resolve_job_def("compare_sweep").execute_in_process(instance=DagsterInstance.ephemeral())
    table = _materializations(compared)["sae_comparison"]
    assert table["evaluated"] == 1
    (row,) = [r.data for r in table["comparison"].records]
    assert row["sae"] == "topk-4k-k32" and row["n2g_recall"] == pytest.approx(report["n2g_recall"])
    assert "topk-4k-k32" in open(store.path("reports", "sweep_comparison.html")).read()
    assert table["page_in_browser"] == "http://127.0.0.1:8000/reports/sweep_comparison.html"   # served by browse
    # the figures grouped like a report: one Markdown table per group, each figure with unit, direction, definition
    groups = [k for k in ev if k in ("reconstruction", "sparsity", "downstream", "feature quality")]
    assert groups == ["reconstruction", "sparsity", "downstream", "feature quality"]
    assert list(ev).index("reconstruction") < list(ev).index("fvu")            # the tables first, numbers after
    assert "| FVU | " in ev["reconstruction"] and "↓ lower" in ev["reconstruction"]
    assert "| loss recovered |" in ev["downstream"] and "↑ higher" in ev["downstream"]
    assert "Gao §4.1" in ev["downstream"]
    assert "| N2G precision |" in ev["feature quality"] and "| L0 |" in ev["sparsity"]
    cfg = json.loads(store.fs.cat_file(f"{store.resolve('saelens/topk-4k-k32')}/cfg.json"))
    assert cfg["architecture"] == "topk" and cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["d_sae"] == 4096


def test_switch_entry_trains_without_saelens_export(defs, store):
    result = defs.resolve_job_def("train_saes").execute_in_process(
        instance=DagsterInstance.ephemeral(), partition_key="switch8-16k-k32",
        run_config={"resources": {"training": {"config": TRAIN}, "evaluation": {"config": {"ce_contexts": 0}}}})
    assert result.success
    assert _materializations(result)["sae_checkpoint"]["saelens_export"] == "n/a (no SAELens equivalent)"
    assert store.resolve("saelens/switch8-16k-k32") is None


def test_eval_reports_dead_latents_over_every_cached_token_and_checks_thresholds(defs, store):
    result = defs.resolve_job_def("train_saes").execute_in_process(
        instance=DagsterInstance.ephemeral(), partition_key="relu-4k",
        run_config={"resources": {"training": {"config": TRAIN},
                                  "evaluation": {"config": {"ce_contexts": 0, "max_fvu": 1e-9}}}})
    assert result.success  # the thresholds are checks, not failures: the catalog shows pass/fail
    ev = _materializations(result)["sae_eval"]
    n_rows = open_shuffled(store, "main").n_rows
    assert ev["dead_window_tokens"] == n_rows and ev["heldout_tokens"] == TRAIN["holdout_rows"]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert set(checks) == {"fvu_below", "dead_fraction_below", "loss_recovered_above"}
    assert not checks["fvu_below"].passed and checks["fvu_below"].metadata["threshold"].value == 1e-9
    assert checks["loss_recovered_above"].passed  # not measured (ce_contexts 0): nothing to fail


def test_eval_is_skipped_while_its_inputs_are_unchanged_and_shows_its_figures_again(defs, store, tmp_path):
    def train_and_evaluate(**evaluation):
        result = defs.resolve_job_def("train_saes").execute_in_process(
            instance=DagsterInstance.ephemeral(), partition_key="relu-4k",
            run_config={"resources": {"training": {"config": TRAIN}, "evaluation": {"config": {
                "ce_contexts": 2, "ctx_len": 16, "metric_contexts": 0, "max_fvu": 1e9, "min_loss_recovered": -1e9,
                **evaluation}}}})
        assert result.success
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        return _materializations(result)["sae_eval"], store.pointer("eval/relu-4k")["version"], checks

    built, version, checks = train_and_evaluate()
    assert "up_to_date" not in built and checks["fvu_below"]
    # the same inputs: skipped, same version, the page shows the figures of the build again
    again, same, _ = train_and_evaluate()
    assert "same checkpoint" in again["up_to_date"] and same == version
    assert again["fvu"] == built["fvu"] and "data:image/png;base64" in again["latent_density"]
    # a threshold is not an input of the report: still skipped, but the check is evaluated again
    tighter, same, checks = train_and_evaluate(max_fvu=1e-9)
    assert "up_to_date" in tighter and same == version and not checks["fvu_below"]
    # each input of the report makes it run again: a setting, then the held-out text
    _, changed, _ = train_and_evaluate(ctx_len=12)
    assert changed != version
    (tmp_path / "holdout" / "more.txt").write_text("More held-out text, never trained on. " * 20)
    rerun, newer, _ = train_and_evaluate(ctx_len=12)
    assert "up_to_date" not in rerun and newer != changed


def test_bad_training_setting_fails_before_anything_is_written(defs, store):
    result = defs.resolve_job_def("train_saes").execute_in_process(
        instance=DagsterInstance.ephemeral(), partition_key="relu-4k", raise_on_error=False,
        run_config={"resources": {"training": {"config": {**TRAIN, "batch_size": 0}}}})
    assert not result.success
    message = result.failure_data_for_node("sae_checkpoint").error.cause.message
    assert "resources.training.config.batch_size = 0" in message and "an integer >= 1" in message
    assert store.pointer("sae/relu-4k") is None


def test_world_size_2_trains_data_parallel_through_torchrun(defs, store):
    """The training step launches torchrun (2 gloo ranks on CPU) and records the result like one process."""
    instance = DagsterInstance.ephemeral()
    result = defs.resolve_job_def("train_saes").execute_in_process(
        instance=instance, partition_key="topk-4k-k32",
        run_config={"resources": {"training": {"config": {**TRAIN, "world_size": 2, "device": "cpu"}},
                                  "evaluation": {"config": {"ce_contexts": 0}}}})
    assert result.success
    ckpt = _materializations(result)["sae_checkpoint"]
    assert ckpt["steps"] == 12 and ckpt["tokens"] == 12 * 256 and ckpt["device"] == "2 data-parallel ranks (cpu)"
    # the ranks' progress reaches the run's log as one process's does, and each rank's peak memory its metadata
    logged = [record.user_message or "" for record in instance.all_logs(result.run_id)]
    assert any("step 12/12: 3,072 tokens" in message for message in logged)
    peaks = [float(p) for p in ckpt["peak_memory_gib_per_rank"].split(", ")]
    assert len(peaks) == 2 and all(0.05 < p < 16 for p in peaks)
    pointer = store.pointer("sae/topk-4k-k32")
    assert pointer["final"] and "world_size" not in pointer["settings"]


def test_a_rerun_over_a_non_finite_finished_checkpoint_fails_instead_of_keeping_it(defs, store):
    """Issue 31.4: a re-run found the finished checkpoint "up to date" and exited 0 although its
    weights held NaN (its evaluation then reported NaN metrics)."""
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    config = {"resources": {"training": {"config": TRAIN}, "evaluation": {"config": {"ce_contexts": 0}}}}
    job = defs.resolve_job_def("train_saes")
    assert job.execute_in_process(instance=DagsterInstance.ephemeral(), partition_key="topk-4k-k32",
                                  run_config=config).success
    path = store.resolve("sae/topk-4k-k32")
    weights = load_st(store.fs.cat_file(f"{path}/sae_weights.safetensors"))
    weights["b_enc"][3] = float("inf")
    store.fs.pipe_file(f"{path}/sae_weights.safetensors", save_st(weights))
    evaluated = store.pointer("eval/topk-4k-k32")
    result = job.execute_in_process(instance=DagsterInstance.ephemeral(), partition_key="topk-4k-k32",
                                    run_config=config, raise_on_error=False)
    assert not result.success
    message = result.failure_data_for_node("sae_checkpoint").error.cause.message
    assert "holds NaN/inf in b_enc (sae_weights.safetensors)" in message and "refused" in message
    assert "sae_eval" not in _materializations(result)
    assert store.pointer("eval/topk-4k-k32") == evaluated
