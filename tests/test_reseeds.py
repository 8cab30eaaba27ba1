"""Reseed error bars: a sweep entry's `seeds: S` becomes S partitions whose seed reaches the trainer;
mean ± sd, the minimum reliable difference and bootstrap intervals on inputs with known answers;
cross-seed decoder consistency; the comparison page's error-bar section."""

import tracemalloc

import numpy as np
import pytest
import torch

from resources import stage_resource
from sae_platform.catalog import eval_name, load_reseed_groups, load_sweep
from sae_platform.compare import SPREAD_KEYS, comparison_html, comparison_rows, reseeds_html, reseeds_table
from sae_platform.errors import PlatformError
from sae_platform.reseeds import (
    SeedSpread,
    bootstrap_ratio_interval,
    decoder_consistency,
    distinguishable,
    min_reliable_difference,
    not_distinguishable,
    pooled_noise,
    seed_consistency,
    seed_spread,
    sweep_units,
)
from sae_platform.sae import build_sae
from sae_platform.settings import SettingsError
from sae_platform.trainer import load_sae, train_sae
from tests.test_trainer import make_shuffled

TINY = {"batch_size": 256, "token_budget": 256 * 6, "checkpoint_every_tokens": 256 * 6, "holdout_rows": 512,
        "log_every_steps": 5, "dead_after_tokens": 256 * 8}


def _sweep(tmp_path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_seeds_expand_into_one_partition_per_seed_each_with_its_seed(tmp_path):
    path = _sweep(tmp_path, "topk-64: {variant: topk, n_latents: 64, k: 4, seeds: 3}\n"
                            "relu-64: {variant: relu, n_latents: 64, seeds: 2, seed: 7}\nlone: {variant: relu}\n")
    specs = load_sweep(path)
    assert list(specs) == ["topk-64-s0", "topk-64-s1", "topk-64-s2", "relu-64-s7", "relu-64-s8", "lone"]
    assert specs["topk-64-s2"] == {"variant": "topk", "n_latents": 64, "k": 4, "seed": 2}
    assert specs["relu-64-s8"]["seed"] == 8 and "seeds" not in specs["relu-64-s8"]
    assert {name: g.members for name, g in load_reseed_groups(path).items()} == {
        "topk-64": ["topk-64-s0", "topk-64-s1", "topk-64-s2"], "relu-64": ["relu-64-s7", "relu-64-s8"]}


@pytest.mark.parametrize(("entry", "named"), [
    ("a: {variant: topk, seeds: 0}", "seeds is 0"),
    ("a: {variant: topk, seeds: true}", "seeds is True"),
    ("a: {variant: topk, seeds: 2, seed: -1}", "seed is -1"),
    ("a: {variant: topk, seeds: 2, transcoder_set: {n_layers: 2}}", "both seeds and transcoder_set"),
    ("a: {variant: topk, seeds: 2}\na-s1: {variant: relu}", "a-s1"),
])
def test_a_bad_seeds_entry_is_refused_naming_the_entry_and_the_fix(tmp_path, entry, named):
    path = _sweep(tmp_path, entry + "\n")
    with pytest.raises(SettingsError) as error:
        load_sweep(path)
    assert named in str(error.value) and str(path) in str(error.value) and error.value.fix


def test_the_seed_of_each_partition_reaches_the_trainer(store, tmp_path):
    """Two seeds give different weights; the same seed twice gives equal weights (the resource's
    settings overridden by the expanded entry, as assets.training.settings_for does)."""
    make_shuffled(store)
    specs = load_sweep(_sweep(tmp_path, "t: {variant: topk, n_latents: 32, k: 4, seeds: 2}\n"))
    training = stage_resource("training", TINY)
    for name in ("t-s0", "t-s1"):
        train_sae(store, "main", name, training.settings(**specs[name]), log=lambda m: None)
    train_sae(store, "main", "t-s0-again", training.settings(**specs["t-s0"]), log=lambda m: None)
    weights = {name: load_sae(store, name)[0].W_dec.detach() for name in ("t-s0", "t-s1", "t-s0-again")}
    assert torch.equal(weights["t-s0"], weights["t-s0-again"])
    assert not torch.allclose(weights["t-s0"], weights["t-s1"])
    found = seed_consistency(store, ["t-s0", "t-s1", "never-trained"])
    assert found["pairs"] == 1 and 0 <= found["consistent_fraction"] <= 1


def test_mean_sd_and_pooled_noise_recover_known_parameters():
    rng = np.random.default_rng(0)
    groups = [rng.normal(mean, 0.02, size=5).tolist() for mean in (0.1, 0.2, 0.3, 0.4)]
    spreads = [seed_spread(values) for values in groups]
    assert [round(s.mean, 1) for s in spreads] == [0.1, 0.2, 0.3, 0.4]
    noise = pooled_noise(spreads)
    assert noise.df == 16 and 0.013 < noise.sd < 0.03  # sd 0.02, chi-square spread at 16 df
    assert seed_spread([0.5]).sd is None and pooled_noise([seed_spread([0.5])]) is None
    assert seed_spread([1.0, 2.0, 3.0]) == SeedSpread(2.0, 1.0, 3)
    with pytest.raises(PlatformError, match="no seed"):
        seed_spread([])


def test_not_distinguishable_below_the_minimum_reliable_difference():
    """Three seeds each, reseed sd 1 (pooled over two groups: df 4, t_0.975 = 2.776): the minimum
    reliable difference is 2.776 * sqrt(2/3) = 2.267; means 2.2 apart are not distinguishable, 2.4 are."""
    noise = pooled_noise([SeedSpread(0.0, 1.0, 3), SeedSpread(0.0, 1.0, 3)])
    assert min_reliable_difference(noise, 3, 3) == pytest.approx(2.7764451 * np.sqrt(2 / 3), rel=1e-6)
    assert distinguishable(SeedSpread(0.0, 1.0, 3), SeedSpread(2.2, 1.0, 3), noise) is False
    assert distinguishable(SeedSpread(0.0, 1.0, 3), SeedSpread(2.4, 1.0, 3), noise) is True
    assert distinguishable(SeedSpread(0.0, None, 1), SeedSpread(9.0, None, 1), None) is None
    rows = [{"sae": f"{g}-s{s}", "hook_point": "h", "fvu": value, "intervals": {}}
            for g, values in (("a", (0.0, 1.0, 2.0)), ("b", (1.8, 2.8, 3.8)), ("c", (9.0, 10.0, 11.0)))
            for s, value in enumerate(values)]
    units = sweep_units(rows, {g: [f"{g}-s{s}" for s in range(3)] for g in "abc"}, ("fvu",))
    assert [(u.sae, u.spreads["fvu"].mean, u.spreads["fvu"].sd) for u in units] == [
        ("a", 1.0, 1.0), ("b", pytest.approx(2.8), pytest.approx(1.0)), ("c", 10.0, 1.0)]
    marks = not_distinguishable(units, ("fvu",))  # pooled over 3 groups: df 6, MRD 2.447 * sqrt(2/3) = 1.998
    assert marks == {("a", "fvu"): ["b"], ("b", "fvu"): ["a"]}  # c is far from both


def test_the_bootstrap_interval_covers_the_true_ratio():
    """FVU-like ratio of sums over 4,000 units with true ratio 0.25: the 95% interval holds it and is narrow."""
    rng = np.random.default_rng(1)
    deviation = rng.exponential(1.0, 4000)
    error = 0.25 * deviation * rng.lognormal(0, 0.5, 4000) / np.exp(0.125)  # E[lognormal(0, .5)] = e^.125
    low, high = bootstrap_ratio_interval(error, deviation)
    assert low < 0.25 < high and high - low < 0.03
    low_c, high_c = bootstrap_ratio_interval(error, deviation, complement=True)
    assert (low_c, high_c) == pytest.approx((1 - high, 1 - low))
    with pytest.raises(PlatformError, match="paired units"):
        bootstrap_ratio_interval([1.0], [1.0])


@pytest.mark.parametrize("n_latents", [200, 5000])  # Hungarian, then blockwise greedy
def test_decoder_consistency_counts_the_latents_another_seed_found(n_latents):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((n_latents, 64))
    b = a[rng.permutation(n_latents)] * 3.0  # same directions, shuffled, other norms
    half = n_latents // 2
    b[:half] = rng.standard_normal((half, 64))  # half of them replaced by random directions
    tracemalloc.start()
    found = decoder_consistency(a, b)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    if n_latents > 4096:  # blockwise: one [1024, n] block at a time (the whole matrix would be 200 MB at 5k)
        assert peak < 150 * 2**20, f"{peak / 2**20:.0f} MiB"
    assert found["consistent_fraction"] == pytest.approx(0.5, abs=0.01)
    assert found["method"] == ("hungarian" if n_latents <= 4096 else "blockwise greedy")
    assert decoder_consistency(a, a)["consistent_fraction"] == 1.0
    with pytest.raises(PlatformError, match="cannot be matched"):
        decoder_consistency(a, a[:, :10])


def test_the_page_and_the_metadata_show_error_bars_and_marks(store):
    for name, fvu, interval in (("a-s0", 0.20, None), ("a-s1", 0.22, None), ("b-s0", 0.21, None),
                                ("b-s1", 0.23, None), ("lone", 0.5, [0.45, 0.55])):
        with store.writing(eval_name(name)) as version:
            store.write_json(f"{version}/report.json", {"run": name, "fvu": fvu, "l0": 8.0,
                                                        **({"fvu_interval": interval} if interval else {})})
    rows = comparison_rows(store, ["a-s0", "a-s1", "b-s0", "b-s1", "lone"])
    units = sweep_units(rows, {"a": ["a-s0", "a-s1"], "b": ["b-s0", "b-s1"]}, SPREAD_KEYS)
    marks = not_distinguishable(units, SPREAD_KEYS)
    section = reseeds_html(units, marks, {"a": {"consistent_fraction": 0.75, "threshold": 0.9, "mean_cosine": 0.8,
                                                "method": "hungarian", "n_latents": 64}})
    page = comparison_html(rows, sections=(section,))
    assert "0.21 ± 0.014 (n=2)" in page and "0.22 ± 0.014 (n=2)" in page
    assert "≈ b" in page and "≈ a" in page  # 0.01 apart with reseed sd 0.014: not distinguishable
    assert "95% CI [0.45, 0.55]" in page and "75.0% of latents" in page
    table = reseeds_table(units, marks)
    lone = next(r for r in table if r["sae"] == "lone" and r["figure"] == "fvu")
    assert (lone["ci_low"], lone["ci_high"], lone["seeds"]) == (0.45, 0.55, 1)
    assert next(r for r in table if r["sae"] == "a" and r["figure"] == "fvu")["not_distinguishable_from"] == "b"


def test_ground_truth_figures_get_error_bars_and_marks_over_reseeds(store):
    """Two seeds of two SAEs of synthetic activations: MCC, firing F1 and absorption get mean ± sd
    and "not distinguishable" marks like FVU (an MCC gap below the seeds' noise is no ranking), the
    chance MCC gets none (the same for every seed), and a page of SAEs of text shows no
    ground-truth columns in its error bars (only figures some SAE measured get one)."""
    figures = {"topk-s0": (0.80, 0.50), "topk-s1": (0.84, 0.52), "relu-s0": (0.81, 0.30), "relu-s1": (0.85, 0.32)}
    for name, (mcc, f1) in figures.items():
        with store.writing(eval_name(name)) as version:
            store.write_json(f"{version}/report.json", {"run": name, "fvu": 0.2, "gt_mcc": mcc, "gt_f1": f1,
                                                        "gt_absorption": 0.1, "gt_mcc_chance": 0.29})
    rows = comparison_rows(store, list(figures))
    units = sweep_units(rows, {"topk": ["topk-s0", "topk-s1"], "relu": ["relu-s0", "relu-s1"]}, SPREAD_KEYS)
    marks = not_distinguishable(units, SPREAD_KEYS)
    assert marks[("topk", "gt_mcc")] == ["relu"]  # 0.01 apart, seed sd 0.028
    assert ("topk", "gt_f1") not in marks  # 0.2 apart, seed sd 0.014
    assert "gt_mcc_chance" not in units[0].spreads
    section = reseeds_html(units, marks, {})
    assert "0.82 ± 0.028 (n=2)" in section and ">MCC ↑<" in section and ">firing F1 ↑<" in section
    text_only = sweep_units([{**r, **dict.fromkeys(("gt_mcc", "gt_f1", "gt_absorption"))} for r in rows],
                            {}, SPREAD_KEYS)
    assert "MCC" not in reseeds_html(text_only, {}, {})


def test_an_evaluation_gives_a_single_seed_its_bootstrap_intervals(tiny_hooked):
    """FVU and L0 over held-out rows, loss recovered over held-out contexts: each interval holds its
    point estimate and is computed from the same units (per-row and per-context sums)."""
    from sae_platform.evaluate import downstream_ce, reconstruction_intervals, reconstruction_metrics
    from tests.test_evaluate import contexts, heldout, rule

    torch.manual_seed(0)
    batches = heldout(sizes=(300, 200))
    sae = build_sae("topk", 16, 64, k=4)
    sae.calibrate_(torch.from_numpy(np.concatenate(batches).astype(np.float32)))
    metrics = reconstruction_metrics(sae, batches)
    assert {k: len(v) for k, v in metrics["per_row"].items()} == {"sq_error": 500, "sq_deviation": 500, "active": 500}
    intervals = reconstruction_intervals(metrics["per_row"])
    assert intervals["fvu_interval"][0] < metrics["fvu"] < intervals["fvu_interval"][1]
    assert intervals["l0_interval"] == [4.0, 4.0]  # TopK: every row has exactly k active latents
    torch.manual_seed(0)
    tokens = contexts(tiny_hooked, n_ctx=8, seed=3)
    noisy = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    noisy.calibrate_(tiny_hooked.residual(torch.from_numpy(tokens[:3]).long())[:, 1:].reshape(-1, tiny_hooked.d_model))
    got = downstream_ce(tiny_hooked, noisy, tokens, batch_size=3, rule=rule(tiny_hooked))
    low, high = got["loss_recovered_interval"]
    assert low <= got["loss_recovered"] <= high and low < high
