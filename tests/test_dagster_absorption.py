"""sae_absorption through Dagster on a tiny model: scored (bar chart, both result files), skipped when
unchanged, and a plain refusal with no score under SAEBench's 20-letter bar (its chart: the probe's F1
per letter against the bar)."""

import json

from dagster import DagsterInstance

from sae_platform.catalog import ABSORPTION_REPORT, SAEBENCH_ABSORPTION, absorption_name
from tests.test_absorption import tiny_position
from tests.test_dagster_training import TRAIN, _materializations, defs  # noqa: F401  (the fixture)

SAE = "topk-4k-k32"


def _absorb(defs, config: dict):  # noqa: F811
    return defs.resolve_job_def("absorption_eval").execute_in_process(
        instance=DagsterInstance.ephemeral(), partition_key=SAE,
        run_config={"resources": {"absorption": {"config": config}}})


def test_absorption_asset_scores_skips_and_refuses(defs, store, tiny_hooked):  # noqa: F811
    trained = defs.resolve_job_def("train_saes").execute_in_process(
        instance=DagsterInstance.ephemeral(), partition_key=SAE,
        run_config={"resources": {"training": {"config": TRAIN}, "evaluation": {"config": {"ce_contexts": 0,
                                                                                          "metric_contexts": 0}}}})
    assert trained.success
    lowered = {"prompt_token_pos": tiny_position(tiny_hooked), "min_GT_probe_f1": 0.0, "min_feats_for_eval": 1,
               "k_sparse_probe_num_epochs": 5}
    result = _absorb(defs, lowered)
    assert result.success
    meta = _materializations(result)["sae_absorption"]
    assert meta["scored"] is True and meta["hook_name"] == "blocks.1.hook_resid_post"
    assert 0 <= meta["mean_absorption_fraction_score"] <= 1 and meta["letters_counted"] >= 1
    assert "data:image/png;base64" in meta["absorption_by_letter"]
    folder = store.resolve(absorption_name(SAE))
    ours = json.loads(store.fs.cat_file(f"{folder}/{ABSORPTION_REPORT}"))
    saebench = json.loads(store.fs.cat_file(f"{folder}/{SAEBENCH_ABSORPTION}"))
    assert saebench["eval_type_id"] == "absorption_first_letter" and saebench["sae_lens_id"] == SAE
    assert [d["first_letter"] for d in saebench["eval_result_details"]] == [r["first_letter"] for r in ours["letters"]]
    assert saebench["sae_cfg_dict"]["d_sae"] == 4096  # the SAELens export's cfg.json
    again = _materializations(_absorb(defs, lowered))["sae_absorption"]
    assert again["up_to_date"] == "measured from the same checkpoint, base model and settings"
    refused = _absorb(defs, {"prompt_token_pos": lowered["prompt_token_pos"], "k_sparse_probe_num_epochs": 5})
    assert refused.success
    meta = _materializations(refused)["sae_absorption"]
    assert meta["scored"] is False and "of 26 letters" in meta["refusal"] and "no score" in meta["refusal"]
    assert "mean_absorption_fraction_score" not in meta
    assert "data:image/png;base64" in meta["absorption_by_letter"]  # the probe F1 per letter the refusal rests on
    assert not store.fs.exists(f"{store.resolve(absorption_name(SAE))}/{SAEBENCH_ABSORPTION}")
