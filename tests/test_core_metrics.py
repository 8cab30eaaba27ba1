"""SAEBench's core metrics (``sae_platform.core_metrics``): the explained-variance conventions
(about the mean vs the legacy about zero), the shrinkage and cosine figures against brute force,
the chunked latent similarities against the dense matrix, the consistent-activation heuristic,
the meta-SAE decoder check, and the SAEBench result file that ``sae_eval`` commits, validated by
SAEBench's own pydantic ``CoreEvalOutput`` in its venv."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_platform import catalog
from sae_platform.core_metrics import (
    consistent_activation,
    frequency_figures,
    geometry_figures,
    latent_geometry,
    max_cosine_to_others,
    measured_latents,
    meta_sae_decoder_fve,
)
from sae_platform.evaluate import evaluate_sae, reconstruction_metrics
from sae_platform.sae import build_sae
from sae_platform.trainer import train_sae
from tests.test_evaluate import heldout, identity_sae
from tests.test_trainer import SETTINGS, make_shuffled

SAEBENCH_PYTHON = Path("/work/venvs/sae-bench/bin/python")


def mean_predictor(x: np.ndarray):
    """A real ReLU SAE whose latents never fire: it reconstructs every row as the dataset mean."""
    sae = build_sae("relu", x.shape[1], 8)
    with torch.no_grad():
        sae.b_enc.fill_(-1e6)
        sae.input_scale.fill_(0.5)
        sae.b_pre.copy_(torch.from_numpy(x.mean(0) * 0.5).float())
    return sae


def large_mean_batches(offset: float = 20.0):
    """Activations like a residual stream: a large common mean and a small spread around it."""
    rng = np.random.default_rng(3)
    mean = rng.normal(size=16) * offset
    return [(rng.normal(size=(n, 16)) + mean).astype(np.float32) for n in (40, 60)]


def test_explained_variance_conventions_mean_prediction_scores_0_and_perfect_scores_1():
    batches = heldout(seed=1)
    x = np.concatenate(batches).astype(np.float64)
    mean_only = reconstruction_metrics(mean_predictor(x), batches)
    assert mean_only["explained_variance"] == pytest.approx(0.0, abs=1e-5)
    assert mean_only["fvu"] == pytest.approx(1.0, abs=1e-5)
    perfect = reconstruction_metrics(identity_sae(16), batches)
    assert perfect["explained_variance"] == 1.0 and perfect["fvu"] == 0.0
    assert perfect["explained_variance_about_zero"] == 1.0
    assert perfect["cossim"] == pytest.approx(1.0) and perfect["l2_ratio"] == pytest.approx(1.0)
    assert perfect["relative_reconstruction_bias"] == pytest.approx(1.0)


def test_the_about_zero_figure_reads_high_on_activations_with_a_large_mean():
    batches = large_mean_batches()
    x = np.concatenate(batches).astype(np.float64)
    got = reconstruction_metrics(mean_predictor(x), batches)
    assert got["explained_variance"] == pytest.approx(0.0, abs=1e-4)  # it explains nothing about the mean
    about_zero = 1 - ((x - x.mean(0)) ** 2).sum() / (x ** 2).sum()
    assert got["explained_variance_about_zero"] == pytest.approx(about_zero, rel=1e-6)
    assert got["explained_variance_about_zero"] > 0.99  # ... yet the legacy figure reads near-perfect


def test_shrinkage_cosine_and_l1_match_bruteforce():
    torch.manual_seed(0)
    batches = heldout()
    sae = build_sae("topk", 16, 64, k=4)
    sae.calibrate_(torch.from_numpy(np.concatenate(batches).astype(np.float32)))
    got = reconstruction_metrics(sae, batches)
    x = np.concatenate(batches).astype(np.float64)
    with torch.no_grad():
        z = sae.encode_dense(torch.from_numpy(x).float()).double().numpy()
    s = float(sae.input_scale)
    recon = (z @ sae.W_dec.detach().double().numpy() + sae.b_pre.detach().double().numpy()) / s
    n_in, n_out = np.linalg.norm(x, axis=1), np.linalg.norm(recon, axis=1)
    assert got["cossim"] == pytest.approx(np.mean((x * recon).sum(1) / (n_in * n_out)), rel=1e-5)
    assert got["l2_ratio"] == pytest.approx(np.mean(n_out / n_in), rel=1e-5)
    assert got["l2_norm_in"] == pytest.approx(n_in.mean(), rel=1e-5)
    assert got["relative_reconstruction_bias"] == pytest.approx((n_out ** 2).mean() / (x * recon).sum(1).mean(),
                                                                rel=1e-5)
    assert got["l1"] == pytest.approx(z.sum(1).mean(), rel=1e-5)
    assert got["explained_variance"] == pytest.approx(1 - got["fvu"])


def test_max_cosine_in_blocks_equals_the_dense_matrix():
    torch.manual_seed(1)
    w = torch.randn(50, 8)
    w[7] = 3 * w[3]  # a duplicate direction at another scale: cosine 1
    unit = w / w.norm(dim=1, keepdim=True)
    dense = unit @ unit.t()
    dense.fill_diagonal_(-float("inf"))
    for chunk in (50, 60, 1000, 50 * 50):  # one row per block, a few rows, all rows
        np.testing.assert_allclose(max_cosine_to_others(w, chunk).numpy(), dense.max(1).values.numpy(), atol=1e-6)
    assert max_cosine_to_others(w, 50)[3] == pytest.approx(1.0, abs=1e-6)

    sae = build_sae("relu", 8, 50)
    geometry = latent_geometry(sae, chunk_elements=100)
    assert np.allclose(geometry["encoder_decoder_cosine"], 1.0, atol=1e-6)  # tied init: W_enc = W_dec
    np.testing.assert_allclose(geometry["max_encoder_cosine"], geometry["max_decoder_cosine"], atol=1e-6)


def test_a_wide_dictionary_measures_the_max_cosines_of_a_seeded_sample_against_every_latent():
    """All n_latents x n_latents cosines are hours at 2^20 latents (docs/results.md, the 2^20 run): past
    max_latents, a seeded sample is measured, each against every latent, exactly as the full figure."""
    torch.manual_seed(2)
    sae = build_sae("relu", 8, 300)
    full = latent_geometry(sae)
    sampled = latent_geometry(sae, chunk_elements=700, max_latents=40)
    picked = measured_latents(300, 40)
    assert picked is not None and len(picked) == 40 and torch.equal(picked, measured_latents(300, 40))  # seeded
    for key in ("max_encoder_cosine", "max_decoder_cosine"):
        measured = np.isfinite(sampled[key])
        assert measured.sum() == 40 and np.array_equal(np.flatnonzero(measured), picked.numpy())
        np.testing.assert_allclose(sampled[key][measured], full[key][measured], atol=1e-6)
    np.testing.assert_allclose(sampled["encoder_decoder_cosine"], full["encoder_decoder_cosine"])  # linear: all
    figures = geometry_figures(sampled)
    assert figures["max_cosine_latents_measured"] == 40
    assert figures["average_max_decoder_cosine"] == pytest.approx(float(full["max_decoder_cosine"][picked].mean()))
    assert "max_cosine_latents_measured" not in geometry_figures(full)
    assert measured_latents(300, 300) is None
    assert np.isfinite(latent_geometry(sae, max_latents=300)["max_decoder_cosine"]).all()
    assert "max_decoder_cosine" not in latent_geometry(sae, max_latents=0)


def test_consistent_activation_heuristic_is_tokens_per_context_it_fires_in():
    # latent 0 fires on 3 tokens of context 0 and 1 of context 2; latent 2 on one token; latent 1 never
    contexts = np.array([0, 0, 0, 2, 1])
    features = np.array([0, 0, 0, 0, 2])
    cah = consistent_activation(contexts, features, 3)
    assert cah[0] == 2.0 and cah[2] == 1.0 and np.isnan(cah[1])


def test_frequency_figures():
    figures = frequency_figures(np.array([0.0, 0.005, 0.02, 0.5]))
    assert figures["frac_alive"] == 0.75
    assert figures["freq_over_1_percent"] == 0.5 and figures["freq_over_10_percent"] == 0.25
    assert figures["normalized_freq_over_10_percent"] == pytest.approx(0.5 / 0.525)


def test_meta_sae_explains_composed_decoder_rows_and_is_seeded():
    rng = np.random.default_rng(0)
    parts = rng.normal(size=(16, 64))
    # decoder rows that are sparse combinations of 16 shared parts: a meta-SAE of 64 latents (0.25 x 256) finds them
    combos = (rng.random((256, 16)) < 0.15) * rng.random((256, 16))
    combos[np.arange(256), rng.integers(0, 16, 256)] += 1
    rows = torch.from_numpy(combos @ parts).float()
    rows /= rows.norm(dim=1, keepdim=True)
    composed = meta_sae_decoder_fve(rows, steps=150, batch_size=128, lr=3e-3)
    again = meta_sae_decoder_fve(rows, steps=150, batch_size=128, lr=3e-3)
    assert composed == again and composed["meta_sae_width"] == 64 and composed["meta_sae_k"] == 4
    random_rows = torch.randn(256, 64)
    unstructured = meta_sae_decoder_fve(random_rows, steps=150, batch_size=128, lr=3e-3)
    assert composed["meta_sae_fve"] > 0.6 and composed["meta_sae_fve"] > unstructured["meta_sae_fve"] + 0.2


def _validate_with_saebench(path: Path) -> str:
    """Validate the result file at ``path`` with sae-bench's own ``CoreEvalOutput``, in its venv."""
    script = ("import json, sys\nfrom pydantic import TypeAdapter\n"
              "from sae_bench.evals.core.eval_output import CoreEvalOutput\n"
              "out = TypeAdapter(CoreEvalOutput).validate_python(json.load(open(sys.argv[1])))\n"
              "quality = out.eval_result_metrics.reconstruction_quality\n"
              "print(len(out.eval_result_details), quality.explained_variance)\n")
    done = subprocess.run([str(SAEBENCH_PYTHON), "-c", script, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not SAEBENCH_PYTHON.exists(), reason="sae-bench's venv (/work/venvs/sae-bench, "
                    "`pip install sae-bench==0.6.0` there) is absent: SAEBench's schema cannot be checked")
def test_sae_eval_commits_a_core_result_file_that_saebench_validates(store, tmp_path):
    make_shuffled(store, attrs={"hook_name": "blocks.1.hook_resid_post", "model": "tiny-llama", "ctx_len": 16})
    train_sae(store, "main", "run", SETTINGS, log=lambda m: None)
    report, density = evaluate_sae(store, "main", "run", None, None, torch.device("cpu"), ablation_tokens=0,
                                   meta_sae_steps=20)
    assert 0 <= report["meta_sae_fve"] <= 1 and report["meta_sae_width"] == 16
    for key in ("explained_variance", "explained_variance_about_zero", "cossim", "l2_ratio", "l1", "frac_alive",
                "average_max_decoder_cosine", "mean_encoder_decoder_cosine"):
        assert isinstance(report[key], float) and np.isfinite(report[key]), key
    path = f"{store.resolve(catalog.eval_name('run'))}/{catalog.saebench_result_file('core')}"
    result = json.loads(store.fs.cat_file(path))
    assert result["eval_type_id"] == "core" and len(result["eval_result_details"]) == 64
    assert result["eval_result_metrics"]["reconstruction_quality"]["explained_variance"] == report[
        "explained_variance"]
    assert result["eval_result_metrics"]["model_behavior_preservation"]["kl_div_score"] == -1  # not measured
    np.testing.assert_allclose([d["feature_density"] for d in result["eval_result_details"]], density, atol=1e-9)
    assert result["sae_cfg_dict"]["d_sae"] == 64 and result["sae_cfg_dict"]["hook_name"] == "blocks.1.hook_resid_post"
    assert result["sae_cfg_dict"]["model_name"] == result["eval_config"]["model_name"] == "tiny-llama"
    local = tmp_path / "saebench_core.json"
    local.write_bytes(store.fs.cat_file(path))
    count, explained = _validate_with_saebench(local).split()
    assert int(count) == 64 and float(explained) == pytest.approx(report["explained_variance"])
