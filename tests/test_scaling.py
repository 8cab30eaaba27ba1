"""Gao et al.'s scaling laws from a sweep: the fits recover planted exponents within their intervals,
a sweep too small is refused naming what it has, and the `scaling_laws` asset and the comparison
page show the fit (a real Dagster run of the compare_sweep job)."""

import json
import math

import numpy as np
import pytest
from dagster import DagsterInstance

from sae_platform.catalog import eval_name
from sae_platform.plots import scaling_laws_png
from sae_platform.scaling import (
    JOINT_PARAMETERS,
    ScalingPoint,
    ScalingRefused,
    fit_fixed_k,
    fit_scaling_laws,
    scaling_html,
)

PLANTED = {"alpha": -0.5, "beta_k": 0.26, "beta_N": -0.05, "gamma": -0.04, "zeta": -1.3, "eta": -0.3}
WIDTHS, KS = (256, 512, 1024, 2048, 4096), (8, 16, 32, 64)


def joint_loss(n, k, p=PLANTED):
    return (math.exp(p["alpha"] + p["beta_k"] * math.log(k) + p["beta_N"] * math.log(n)
                     + p["gamma"] * math.log(k) * math.log(n)) + math.exp(p["zeta"] + p["eta"] * math.log(k)))


def grid(noise=0.005, seed=0, widths=WIDTHS, ks=KS):
    rng = np.random.default_rng(seed)
    return [ScalingPoint(f"n{n}-k{k}", n, k, joint_loss(n, k) * math.exp(rng.normal(0, noise)))
            for n in widths for k in ks]


def test_the_fixed_k_fit_recovers_a_planted_exponent_and_irreducible_loss_within_their_intervals():
    rng = np.random.default_rng(1)
    points = [ScalingPoint(f"n{n}", n, 32, (3.0 * n ** -0.35 + 0.05) * math.exp(rng.normal(0, 0.01)))
              for n in (128, 256, 512, 1024, 2048, 4096, 8192, 16384)]
    fit = fit_fixed_k(points)
    a, e = fit["parameters"]["a"], fit["parameters"]["e"]
    assert a["low"] < -0.35 < a["high"] and a["high"] - a["low"] < 0.2
    assert e["low"] < 0.05 < e["high"]
    assert fit["rms_log_residual"] < 0.02 and len(fit["residuals"]) == 8


def test_the_joint_fit_recovers_gaos_form_within_its_intervals():
    fit = fit_scaling_laws(grid())
    for name in JOINT_PARAMETERS:
        found = fit["joint"]["parameters"][name]
        assert found["low"] < PLANTED[name] < found["high"], (name, found)
    exponent_at_32 = fit["joint"]["n_exponent_at_k"][32]
    assert exponent_at_32 == pytest.approx(PLANTED["beta_N"] + PLANTED["gamma"] * math.log(32), abs=0.03)
    assert [one["k"] for one in fit["fixed_k"]] == list(KS) and fit["not_fitted"] == []
    assert scaling_laws_png(grid(), fit)[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_too_small_is_refused_naming_what_it_has_and_needs():
    with pytest.raises(ScalingRefused) as refused:
        fit_scaling_laws(grid(widths=(4096, 16384), ks=(32,)))
    assert "k = 32: widths [4096, 16384]" in str(refused.value) and "sweep-scaling.yaml" in refused.value.fix
    one_k = fit_scaling_laws(grid(ks=(32,)))  # widths enough for L(N), too few k for the joint form
    assert one_k["joint"] is None and "1 value(s) of k" in one_k["not_fitted"][0]
    assert "Not fitted" in scaling_html(None, None, str(refused.value))


def _evaluated(store, name, fvu):
    with store.writing(eval_name(name)) as version:
        store.write_json(f"{version}/report.json", {"run": name, "fvu": fvu, "l0": 8.0})


def test_the_asset_fits_the_sweep_and_the_page_shows_the_plot(store, tmp_path, monkeypatch):
    """A 5 x 4 grid of TopK entries evaluated (planted losses): compare_sweep materializes
    scaling_laws with the exponents, residuals and plot, writes the fit, and the page embeds it."""
    from assets.training import SAE_SWEEP_SPECS
    from jobs.definitions import build_definitions
    from tests.test_definitions import _settings

    for point in grid():
        monkeypatch.setitem(SAE_SWEEP_SPECS, point.sae, {"variant": "topk", "n_latents": point.n_latents,
                                                         "k": point.k})
        _evaluated(store, point.sae, point.loss)
    _evaluated(store, "relu-4k", 0.01)  # another variant: not a point of the fit
    result = build_definitions(_settings(tmp_path)).resolve_job_def("compare_sweep").execute_in_process(
        instance=DagsterInstance.ephemeral())
    assert result.success
    meta = {e.asset_key.to_user_string(): {k: v.value for k, v in e.materialization.metadata.items()}
            for e in result.get_asset_materialization_events()}
    fitted = meta["scaling_laws"]
    assert fitted["fitted"] is True and fitted["points"] == 20 and "data:image/png;base64" in fitted["plot"]
    rows = [r.data for r in fitted["exponents"].records]
    beta_n = next(r for r in rows if r["parameter"] == "beta_N")
    assert beta_n["low"] < PLANTED["beta_N"] < beta_n["high"]
    assert len(fitted["residuals"].records) == 20
    saved = json.loads(store.fs.cat_file(store.path("reports", "scaling_laws.json")))
    assert len(saved["points"]) == 20 and saved["joint"]["parameters"]["gamma"]["value"] < 0
    page = open(store.path("reports", "sweep_comparison.html")).read()
    assert "<h2>Scaling laws</h2>" in page and 'src="data:image/png;base64,' in page and "beta_N" in page
    assert "<h2>Error bars</h2>" in page
    exponents = [r.data for r in meta["sae_comparison"]["scaling_exponents"].records]  # the same table there
    assert [r["parameter"] for r in exponents] == [r["parameter"] for r in rows]


def test_the_asset_refuses_a_small_sweep_without_failing_the_run(store, tmp_path):
    from jobs.definitions import build_definitions
    from tests.test_definitions import _settings

    _evaluated(store, "topk-16k-k32", 0.2)
    _evaluated(store, "topk-4k-k32", 0.25)
    result = build_definitions(_settings(tmp_path)).resolve_job_def("compare_sweep").execute_in_process(
        instance=DagsterInstance.ephemeral())
    assert result.success
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "scaling_laws"]
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    assert meta["fitted"] is False and "k = 32: widths [4096, 16384]" in meta["refused"]
    assert not store.fs.exists(store.path("reports", "scaling_laws.json"))
    assert "Not fitted" in open(store.path("reports", "sweep_comparison.html")).read()
    (compared,) = [e for e in result.get_asset_materialization_events()
                   if e.asset_key.to_user_string() == "sae_comparison"]
    assert "k = 32: widths [4096, 16384]" in compared.materialization.metadata["scaling_laws"].value


def test_every_entry_fans_out_the_whole_sweep_and_refuses_a_double_choice():
    """config/scaling.yaml trains every grid entry through full_pipeline (ops.sae_sweep.config.every_entry)."""
    from dagster import build_op_context

    from assets.partitions import SAE_SWEEP_SPECS
    from jobs.full_pipeline import SweepConfig, sae_sweep
    from resources import stage_resource
    from sae_platform.errors import PlatformError

    context = build_op_context(resources={"features": stage_resource("features")})
    assert [out.value for out in sae_sweep(context, SweepConfig(every_entry=True))] == list(SAE_SWEEP_SPECS)
    with pytest.raises(PlatformError, match="both every_entry and sae_names"):
        list(sae_sweep(context, SweepConfig(every_entry=True, sae_names=["relu-4k"])))
