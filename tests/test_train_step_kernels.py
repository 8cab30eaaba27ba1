"""The training step's small kernels pinned against their textbook formulas (issue 29: a faster
TopK step with the same results)."""

import pytest
import torch

from sae_platform.sae import build_sae
from sae_platform.sae.kernels import row_dots

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="no CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
def test_row_dots_is_the_row_wise_dot_product(device):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 37, generator=g), torch.randn(300, 37, generator=g)
    a, b = a.to(device), b.to(device)
    torch.testing.assert_close(row_dots(a, b), (a * b).sum(1))
    strided = torch.randn(37, 300, generator=g).to(device).t()  # a transposed (non-contiguous) operand
    torch.testing.assert_close(row_dots(strided, b), (strided * b).sum(1))


@pytest.mark.parametrize("device", DEVICES)
def test_remove_parallel_grad_matches_the_projection_formula_for_rows_of_any_norm(device):
    """grad[i] - (grad[i] . w[i]) / |w[i]|^2 * w[i] for every row, on rows far from unit norm
    (a model before its first normalize_decoder_, or one loaded unnormalised) and a zero row,
    whose gradient stays as it is."""
    torch.manual_seed(0)
    sae = build_sae("topk", 24, 96, k=4, device=device)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(96, 1, device=device) * 5 + 0.1)
        sae.W_dec[7] = 0
    grad = torch.randn(96, 24, device=device)
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grad_()
    w = sae.W_dec.detach()
    expected = grad - (grad * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-12) * w
    torch.testing.assert_close(sae.W_dec.grad, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sae.W_dec.grad[7], grad[7])
