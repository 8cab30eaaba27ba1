"""The variants whose activation is per latent, with dense codes and a dense decoder: ReLU + L1
and JumpReLU, and JumpReLU's straight-through estimators (``_JumpReLU``, ``_Step``:
rectangle-kernel pseudo-derivatives for the threshold).

JumpReLU's sparsity control. The L0 penalty reaches the model only through the threshold θ's
pseudo-derivative, so L0 follows ``l0_coeff`` only if θ can move. Adam moves a parameter by about
its lr per step whatever the gradient's size, so θ is a plain parameter (as in the paper's
pseudocode), not exp(log θ): that moved θ by θ·lr per step (~2e-7 at its 1e-3 init), and every
coefficient gave the same run (SAELens #718/#719). The paper's hyper-parameters (ε = θ₀ = 0.001, the
lr of the whole model) are for inputs at E‖x‖² = 1; this module's inputs are at E‖x‖² = d_model,
√d_model times larger, so their defaults are the paper's scaled by √d_model, and θ's own Adam group
has lr · √d_model (``threshold_lr_scale``): the dynamics of the paper's units.
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
        """(codes [batch, n_latents], unweighted loss parts) of the pre-activations ``pre``."""
        z, sums = self._code(pre)
        return z, self._penalties(sums)

    def _code(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(codes, the penalties' sums over latents, scalars): sums over latents add up over any
        split of the latents, which is how a latent shard (sae_platform.latent_parallel) combines
        its shard's sums with the others' before ``_penalties``."""
        raise NotImplementedError

    def _penalties(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """The loss parts from the sums over *all* latents of ``_code``."""
        return sums

    def _slice_activation(self, pre: Tensor, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, target: Tensor | None = None) -> SAEOutput:
        """x [batch, d_model] raw -> SAEOutput, recon [batch, d_out] raw, dense codes
        [batch, n_latents] (``dense``), part "l1" (ReLU) or "l0" (JumpReLU). dead_mask and target
        are accepted for a uniform trainer and ignored: these variants have no AuxK and no loss
        part that needs the target. Raises PlatformError on a wrong width."""
        xs = self._normalize(x)
        z, parts = self._activate(F.linear(xs - self.b_pre, self.W_enc, self.b_enc))
        recon_n = z @ self.W_dec + self._offset(xs)
        active, fired = _dense_stats(z)
        return SAEOutput.counted(self._to_raw(recon_n), active, fired, parts, dense=z)

    @torch.no_grad()
    def encode_dense(self, x: Tensor) -> Tensor:
        """x [batch, d_model] raw -> [batch, n_latents] activations, normalised units."""
        return self._activate(F.linear(self._centered(x), self.W_enc, self.b_enc))[0]

    @torch.no_grad()
    def encode_slice(self, x: Tensor, start: int, stop: int) -> Tensor:
        """[batch, stop - start], multiplying only the slice's rows of W_enc. Raises PlatformError
        unless 0 <= start <= stop <= n_latents."""
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

    def _code(self, pre):
        z = pre.relu()
        return z, {"l1": (z * self.W_dec.norm(dim=1)).sum(1).mean()}

    def _slice_activation(self, pre, start, stop):
        return pre.relu()


# The paper's ε and θ₀ (Rajamanoharan et al. 2024, §5), for inputs at E‖x‖² = 1.
PAPER_BANDWIDTH = 1e-3
# Thresholds moving less than this fraction of the bandwidth between two checks are stalled.
STALL_FRACTION = 1e-3
# L0 further than this (relative) from target_l0 is "far from the target" for the stall warning.
FAR_FROM_TARGET = 0.5


class JumpReLUSAE(_DenseSAE):
    """z = ReLU(pre) * H(pre - θ) with a learned per-latent threshold θ [n_latents] (normalised
    units) and an L0 penalty (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
    Fidelity with JumpReLU Sparse Autoencoders", §3). Both are piecewise constant in θ, so θ learns
    through straight-through pseudo-derivatives with a rectangle kernel of width ``bandwidth`` (§4).

    Settings (``hparams``; None: the paper's value in this module's units, see the module docstring):

    - ``l0_coeff`` (1e-3): weight of the sparsity term; higher gives a lower L0. Per the paper's λ:
      the MSE term here is the paper's summed squared error.
    - ``target_l0`` (None): a target number of active latents per token. The sparsity term becomes
      ``l0_coeff · (L0 / target_l0 − 1)²`` (Gemma Scope 2; SAELens PR #732), pulling L0 toward the
      target from both sides instead of always down; ``l0_coeff`` ~1 holds it near the target.
    - ``bandwidth`` (None: 1e-3·√d_model): ε, the width of the rectangle kernel, normalised units.
    - ``init_threshold`` (None: 1e-3·√d_model): θ at init, normalised units.
    - ``threshold_lr_scale`` (None: √d_model): θ's Adam lr is the model's lr times this; 0 freezes θ."""

    variant = "jumprelu"
    DEFAULTS = {"l0_coeff": 1e-3, "target_l0": None, "bandwidth": None, "init_threshold": None,
                "threshold_lr_scale": None}
    COEFFS = {"l0": "l0_coeff"}

    def __init__(self, d_model, n_latents, device=None, dtype=torch.float32, **hparams):
        super().__init__(d_model, n_latents, device, dtype, **hparams)
        paper_units = math.sqrt(d_model)  # this module's normalised units per unit at E||x||^2 = 1
        for name in ("bandwidth", "init_threshold"):
            if self.hparams[name] is None:
                self.hparams[name] = PAPER_BANDWIDTH * paper_units
        if self.hparams["threshold_lr_scale"] is None:
            self.hparams["threshold_lr_scale"] = paper_units
        self.threshold = nn.Parameter(torch.full((n_latents,), float(self.hparams["init_threshold"]),
                                                 device=device, dtype=dtype))
        self._threshold_seen: Tensor | None = None
        self.register_load_state_dict_pre_hook(_threshold_from_log)

    def param_groups(self, lr: float) -> list[dict]:
        """θ in its own group, lr · threshold_lr_scale (see the module docstring)."""
        rest = [p for name, p in self.named_parameters() if name != "threshold"]
        return [{"params": rest, "lr": lr}, {"params": [self.threshold], "lr": lr * self.hparams["threshold_lr_scale"]}]

    def _code(self, pre):
        pre, theta, eps = pre.relu(), self.threshold, self.hparams["bandwidth"]
        return _JumpReLU.apply(pre, theta, eps), {"l0": _Step.apply(pre, theta, eps).sum(1).mean()}

    def _penalties(self, sums):
        target = self.hparams["target_l0"]
        return sums if target is None else {"l0": (sums["l0"] / target - 1).pow(2)}

    def _slice_activation(self, pre, start, stop):
        pre = pre.relu()
        return pre * (pre > self.threshold[start:stop])

    @torch.no_grad()
    def training_warning(self, l0: float) -> str | None:
        """Called by the trainer at every metrics row with the batch's L0 (mean active latents per
        token): a warning when no threshold moved by STALL_FRACTION of the bandwidth since the last
        call while L0 is far from ``target_l0`` (or, without a target, at all): the sparsity term
        then has no effect (θ frozen, e.g. threshold_lr_scale 0, or no pre-activation near θ)."""
        seen, self._threshold_seen = self._threshold_seen, self.threshold.detach().clone()
        if seen is None:
            return None
        moved = float((self.threshold - seen).abs().max())
        target = self.hparams["target_l0"]
        if moved >= STALL_FRACTION * self.hparams["bandwidth"] or (
                target is not None and abs(l0 / target - 1) <= FAR_FROM_TARGET):
            return None
        goal = f"target_l0 {target:g}" if target is not None else f"l0_coeff {self.hparams['l0_coeff']:g}"
        return (f"JumpReLU thresholds stopped moving (max |Δθ| {moved:.2g} since the last metrics row, bandwidth "
                f"{self.hparams['bandwidth']:.2g}) at L0 {l0:.1f}: the sparsity term ({goal}) has no effect. Raise "
                f"hparams.threshold_lr_scale (now {self.hparams['threshold_lr_scale']:g}) or the bandwidth")


def _threshold_from_log(module, state_dict, prefix, *args) -> None:
    """A checkpoint of an earlier version stores log θ (``log_threshold``): load it as θ."""
    old = state_dict.pop(prefix + "log_threshold", None)
    if old is not None and prefix + "threshold" not in state_dict:
        state_dict[prefix + "threshold"] = old.exp()
