"""The training step made faster with the same results (issue 29): its small kernels pinned against
their textbook formulas, and its big tensors on huge pages."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae_platform import HUGE_PAGES_ENV
from sae_platform.sae import build_sae
from sae_platform.sae.kernels import ROW_DOT_BLOCK, row_dots

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


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# A fresh [16,384, 576] float32 tensor (a decoder gradient at the benchmark's shapes, 37.7 MB)
# written once: the page faults that cost (~9,200 on 4 KB pages; ~20 on 2 MB pages).
FRESH_TENSOR_FAULTS = (
    "import sae_platform, resource, torch\n"
    "torch.empty(1).fill_(0)\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "torch.empty(16384, 576).fill_(1.0)\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")


def fresh_tensor_faults(**env) -> int:
    root = Path(__file__).resolve().parents[1]
    environ = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    environ.update(PYTHONPATH=str(root), **env)
    done = subprocess.run([sys.executable, "-c", FRESH_TENSOR_FAULTS], env=environ, capture_output=True, text=True,
                          check=True, timeout=120)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not THP_SETTING.exists() or "[never]" in THP_SETTING.read_text(),
                    reason="this kernel has no transparent huge pages")
def test_a_fresh_big_tensor_is_faulted_in_as_huge_pages_and_the_environment_can_say_no():
    """Importing sae_platform before torch puts torch's big CPU tensors on 2 MB pages: the
    gradients a training step re-allocates every step no longer fault in 4 KB at a time."""
    assert fresh_tensor_faults() < 1_000
    assert fresh_tensor_faults(**{HUGE_PAGES_ENV: "0"}) > 5_000


def test_huge_pages_are_not_claimed_once_torch_is_loaded():
    import sae_platform

    assert "torch" in sys.modules  # imported above, as a program importing torch first would
    assert sae_platform.enable_huge_pages() is False


def test_row_dots_over_several_blocks_is_each_rows_dot_product():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2 * ROW_DOT_BLOCK + 5, 9, generator=g), torch.randn(2 * ROW_DOT_BLOCK + 5, 9, generator=g)
    want = torch.bmm(a.double().unsqueeze(1), b.double().unsqueeze(2)).view(-1)
    torch.testing.assert_close(row_dots(a, b).double(), want, atol=1e-5, rtol=1e-5)  # the last, short block too
