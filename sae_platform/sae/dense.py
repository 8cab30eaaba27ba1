"""The variants whose activation is per latent, with dense codes and a dense decoder: ReLU + L1
and JumpReLU, and JumpReLU's straight-through estimators (``_JumpReLU``, ``_Step``:
rectangle-kernel pseudo-derivatives for the threshold).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_platform.sae.base import SAEOutput, SparseAutoencoder, _dense_stats

# ---------------------------------------------------------------------------------------------
# JumpReLU's straight-through estimators (Rajamanoharan et al. 2024, "Jumping Ahead").
# ---------------------------------------------------------------------------------------------

def _rectangle(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((pre - theta) / eps) with K the unit rectangle: which pre-activations sit near the jump."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); theta's gradient is the rectangle-kernel pseudo-derivative
    -(theta/eps) K(.), the only way a threshold learns from a loss that is flat almost everywhere."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_theta = -(threshold / eps) * (grad * _rectangle(pre, threshold, eps)).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta) for the L0 penalty; only theta gets a (pseudo-)gradient, -(1/eps) K(.)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        return None, -(grad * _rectangle(pre, threshold, eps)).sum(0) / eps, None


class _DenseSAE(SparseAutoencoder):
    """Shared path of the variants whose activation is per latent: dense codes, dense decode."""

    def _activate(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _slice_activation(self, pre: Tensor, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw -> SAEOutput, recon [batch, d_out] raw, dense codes
        [batch, n_latents] (``dense``), part "l1" (ReLU) or "l0" (JumpReLU). dead_mask and target
        are accepted for a uniform trainer and ignored: these variants have no AuxK and no loss
        part that needs the target. Raises PlatformError on a wrong width."""
        xc = self._centered(x)
        z, parts = self._activate(F.linear(xc, self.W_enc, self.b_enc))
        recon_n = z @ self.W_dec + self.b_out
        l0, fired = _dense_stats(z)
        return SAEOutput(self._to_raw(recon_n), l0, fired, parts, dense=z)

    @torch.no_grad()
    def encode_dense(self, x: Tensor) -> Tensor:
        """x [batch, d_model] raw -> [batch, n_latents] activations, normalised units."""
        return self._activate(F.linear(self._centered(x), self.W_enc, self.b_enc))[0]

    @torch.no_grad()
    def encode_slice(self, x: Tensor, start: int, stop: int) -> Tensor:
        """[batch, stop - start], multiplying only the slice's rows of W_enc. Raises PlatformError
        unless 0 <= start < stop <= n_latents."""
        self._check_slice(start, stop)
        pre = F.linear(self._centered(x), self.W_enc[start:stop], self.b_enc[start:stop])
        return self._slice_activation(pre, start, stop)


class ReLUSAE(_DenseSAE):
    """z = ReLU(W_enc (x - b_pre) + b_enc) with an L1 penalty weighted by decoder row norms
    (Bricken et al. 2023, "Towards Monosemanticity", and Conerly et al.'s April 2024 update): the
    weighting keeps the penalty honest if the trainer ever lets decoder norms float.

    l1_coeff defaults to Anthropic's lambda = 5 (on summed squared error) expressed for this
    module's per-element MSE: 5 / d_model."""

    variant = "relu"
    DEFAULTS = {"l1_coeff": None}
    COEFFS = {"l1": "l1_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        if self.hparams["l1_coeff"] is None:
            self.hparams["l1_coeff"] = 5.0 / d_model

    def _activate(self, pre):
        z = pre.relu()
        return z, {"l1": (z * self.W_dec.norm(dim=1)).sum(1).mean()}

    def _slice_activation(self, pre, start, stop):
        return pre.relu()


class JumpReLUSAE(_DenseSAE):
    """z = pre * H(pre - theta) with a learned per-latent threshold theta and an L0 penalty
    (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
    Sparse Autoencoders", §3). Both are piecewise constant in theta, so theta learns through
    straight-through pseudo-derivatives with a rectangle kernel of width `bandwidth` (§4).
    theta is stored as log theta, keeping it positive."""

    variant = "jumprelu"
    DEFAULTS = {"l0_coeff": 1e-3, "bandwidth": 1e-3, "init_threshold": 1e-3}
    COEFFS = {"l0": "l0_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        init = math.log(self.hparams["init_threshold"])
        self.log_threshold = nn.Parameter(torch.full((n_latents,), init, device=device, dtype=dtype))

    def _activate(self, pre):
        theta, eps = self.log_threshold.exp(), self.hparams["bandwidth"]
        z = _JumpReLU.apply(pre, theta, eps)
        return z, {"l0": _Step.apply(pre, theta, eps).sum(1).mean()}

    def _slice_activation(self, pre, start, stop):
        theta = self.log_threshold[start:stop].exp()
        return pre * (pre > theta)
