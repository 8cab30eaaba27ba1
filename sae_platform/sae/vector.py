"""A user-supplied direction as a one-latent dictionary (``variant: vector``): a probe, a steering
vector or a difference of means, read through the same feature stages as any SAE latent (the
"vector dashboards" of SAEDashboard and Neuronpedia).

Activation: a = ReLU(x · d̂ + b), d̂ = d / ||d|| the unit direction, x the raw activation, b the
user's bias (0 by default), in raw activation units: the projection of x on d̂, shifted. Why
ReLU and not the raw (signed) projection SAEDashboard shows: every feature table is defined on
non-negative activations (top-k keys, log-spaced histogram bins, density = share of tokens with
a > 0, the random sample of activating tokens), so the negative side of the projection is another
feature, the direction -d (add it as a second vector). The top examples are the same as the raw
projection's whenever any token projects above -b.

W_enc = W_dec = d̂ (so logit effects, W_dec · W_U, are the direction's), b_enc = b, b_pre = 0,
input_scale = 1 (normalised units are raw units). Nothing is trained: the trainer's settings do
not accept this variant (``sae_platform.vectors.add_vector`` commits one as a checkpoint).
"""

import torch
from torch import Tensor

from sae_platform.errors import PlatformError
from sae_platform.sae.dense import _DenseSAE


class VectorDictionary(_DenseSAE):
    """One latent whose encoder and decoder row are one unit direction: a = ReLU(x · d̂ + b_enc)
    for x [batch, d_model] raw, activations in raw units (input_scale 1, b_pre 0)."""

    variant = "vector"
    DEFAULTS: dict = {}
    COEFFS: dict = {}

    def __init__(self, d_model, n_latents=1, device=None, dtype=torch.float32, **hparams):
        if n_latents != 1 or hparams.get("d_out") is not None:
            raise PlatformError(f"a vector dictionary has exactly one latent and reads and writes one space "
                                f"(got n_latents {n_latents}, d_out {hparams.get('d_out')})",
                                "add each direction as its own vector (sae-platform vector add NAME FILE)")
        super().__init__(d_model, 1, device, dtype, **hparams)

    @classmethod
    @torch.no_grad()
    def from_direction(cls, direction: Tensor, bias: float = 0.0) -> "VectorDictionary":
        """The dictionary of ``direction`` [d_model] (any non-zero norm; it is normalised) with
        ``bias`` (raw units, added to the projection before the ReLU). Raises PlatformError for a
        zero or non-finite direction."""
        direction = direction.detach().to(torch.float32).reshape(-1)
        norm = float(direction.norm())
        if not norm > 0 or not torch.isfinite(direction).all():
            raise PlatformError(f"a vector dictionary needs a finite, non-zero direction (norm {norm})",
                                "pass the direction itself, e.g. a probe's weight or a difference of means")
        model = cls(direction.numel())
        model.W_enc.copy_(direction / norm)
        model.W_dec.copy_(direction / norm)
        model.b_enc.fill_(float(bias))
        model.b_pre.zero_()
        model.input_scale.fill_(1.0)
        return model

    def _activate(self, pre: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return pre.relu(), {}

    def _slice_activation(self, pre: Tensor, start: int, stop: int) -> Tensor:
        return pre.relu()
