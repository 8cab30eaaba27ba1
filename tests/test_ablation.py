"""Ablation sparsity: a single-direction logit change gives the minimum 1/(V·T), a uniform change
over every logit is no change at all, the maximum is 1; the model path runs and stays in range."""

import math

import numpy as np
import pytest
import torch

from sae_platform.ablation import ablation_sparsities, ablation_sparsity
from sae_platform.errors import PlatformError
from sae_platform.sae import build_sae


def test_single_logit_change_is_the_minimum():
    delta = torch.zeros(4, 100)
    delta[2, 17] = -3.0
    assert ablation_sparsity(delta) == pytest.approx(1 / 400)
    assert ablation_sparsity(np.eye(1, 50)[0] * 5) == pytest.approx(1 / 50)


def test_constant_shift_is_no_change_and_spread_change_is_dense():
    assert math.isnan(ablation_sparsity(torch.full((2, 10), 3.0)))
    alternating = torch.tensor([[1.0, -1.0] * 50])  # median 0 after subtraction: all |1| -> (L1/L2)^2 = n
    assert ablation_sparsity(alternating) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    dense = ablation_sparsity(rng.normal(size=(3, 1000)))
    assert 0.5 < dense < 1.0  # Gaussian: (E|x|)^2 / E[x^2] = 2/pi
    assert dense == pytest.approx(2 / math.pi, abs=0.05)
    with pytest.raises(PlatformError, match="vocab"):
        ablation_sparsity(torch.zeros(2, 1))


def test_ablation_on_a_model(tiny_hooked):
    torch.manual_seed(0)
    sae = build_sae("topk", tiny_hooked.d_model, 64, k=4)
    tokens = np.random.default_rng(0).integers(1, 200, size=(3, 16))
    out = ablation_sparsities(tiny_hooked, sae, tokens, n_tokens=4, horizon=3)
    assert out["ablation_pairs"] > 0
    assert out["ablation_sparsity_min_possible"] <= out["ablation_sparsity"] <= 1.0
    full = ablation_sparsities(tiny_hooked, sae, tokens, n_tokens=4, horizon=3, use_cache=False)
    assert full["ablation_pairs"] == out["ablation_pairs"]   # the prefix's cache: the same logits
    assert full["ablation_sparsity"] == pytest.approx(out["ablation_sparsity"], rel=1e-4)
    with pytest.raises(PlatformError, match="horizon"):
        ablation_sparsities(tiny_hooked, sae, tokens[:, :3], horizon=3)
